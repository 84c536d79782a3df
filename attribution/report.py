"""The report: plain, frozen data describing one profiled run (schema version 1).

A :class:`Report` is built by :mod:`memscope_async.attribution.aggregate` from the flat
records the profiler keeps, and is consumed by the exporters.  It holds no reference to
the C core, to a loop or to a task object, so it can be saved, loaded and re-rendered.

Units everywhere: sizes are integer bytes, times are float seconds since the profiler
started (``run.started_at`` is the wall-clock start, ISO 8601, UTC).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import orjson

SCHEMA_VERSION = 1

__all__ = [
    "SCHEMA_VERSION",
    "AttributionShare",
    "Distribution",
    "Frame",
    "FrozenMap",
    "Group",
    "Hotspot",
    "LeakSuspect",
    "Migration",
    "Report",
    "ReportError",
    "RunInfo",
    "SubtreeCounters",
    "TaskReport",
    "ThreadReport",
    "Totals",
    "Unattributed",
    "UnattributedThread",
]


class ReportError(ValueError):
    """A report file or document is not a valid memscope-async report."""


class FrozenMap(dict):
    """A report's labels and tool: a dict (json, ``==`` and ``isinstance`` as any dict)
    that cannot be changed, so a Report is frozen all the way down, and hashable."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("report data cannot be changed (labels and tool are frozen)")

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple:
        return (FrozenMap, (dict(self),))

    def __repr__(self) -> str:
        return dict.__repr__(self)


_GET_CORO_UNSAFE = sys.version_info[:2] == (3, 12)


def _same_task(task: Any, t: "TaskReport") -> bool:
    """Whether report entry t can be this task object.  Entries are found by the object's
    address, and a folded task leaves no entry: an older task kept in the report may have
    lived at the same address.  Its coroutine or its name then tells them apart (default
    names are unique in a process)."""
    try:
        # (CPython 3.12's get_coro() crashes on an eager task that finished in create_task:
        # there a finished task is told apart by its name alone)
        coro = None if _GET_CORO_UNSAFE and task.done() else task.get_coro()
        qualname = getattr(coro, "__qualname__", None) if coro is not None else None
        if qualname is not None and t.coro is not None and qualname != t.coro:
            return False
        name = task.get_name()
        return t.name is None or name == t.name
    except Exception:  # not a Task after all: nothing contradicts the address
        return True


def _freeze(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, FrozenMap):
        object.__setattr__(obj, name, FrozenMap(value or {}))


@dataclass(frozen=True, slots=True)
class Frame:
    """One source location: ``file``, 1-based ``line`` (0 if unknown) and ``function``."""

    file: str
    line: int
    function: str


@dataclass(frozen=True, slots=True)
class Hotspot:
    """An allocation site: where bytes were allocated and how many of them are still live.

    ``stack`` is innermost first and runs through the task's await chain.  When
    ``Report.run.stacks_sampled`` is true (exact mode) a task's counts are exact and its
    hotspots split them over sites in proportion to sampled stacks; in sampled mode
    (``Report.run.estimated``) every number is an unbiased estimate from the samples.
    """

    file: str
    line: int
    function: str
    bytes: int
    allocations: int
    live_bytes: int
    stack: tuple[Frame, ...] = ()


@dataclass(frozen=True, slots=True)
class AttributionShare:
    """Bytes charged to a task through one route on one thread, and how sure we are."""

    route: str
    thread_id: int | None
    bytes: int
    allocations: int
    confidence: float


@dataclass(frozen=True, slots=True)
class Migration:
    """A task's work seen on another thread (or handed back to its loop thread)."""

    route: str
    from_thread: int | None
    to_thread: int | None
    first_at: float
    last_at: float
    allocated_bytes: int
    allocations: int
    confidence: float


@dataclass(frozen=True, slots=True)
class SubtreeCounters:
    """Counters summed over a task and all its descendants."""

    allocated_bytes: int
    allocations: int
    freed_bytes: int
    live_bytes: int
    tasks: int


@dataclass(frozen=True, slots=True)
class TaskReport:
    """Everything known about one task.  Own counters never include its children's bytes;
    ``subtree`` does."""

    id: int
    name: str | None
    coro: str | None
    parent_id: int | None
    lineage: tuple[int, ...]
    labels: Mapping[str, str]
    thread_id: int | None
    loop_id: int | None
    created_at: float
    finished_at: float | None
    state: str
    allocated_bytes: int
    allocations: int
    freed_bytes: int
    live_bytes: int
    peak_live_bytes: int
    retained_after_done_bytes: int
    subtree: SubtreeCounters
    attribution: tuple[AttributionShare, ...] = ()
    confidence: float = 1.0
    migrations: tuple[Migration, ...] = ()
    cross_task_frees: int = 0
    cross_task_freed_bytes: int = 0
    hotspots: tuple[Hotspot, ...] = ()
    live_hotspots: tuple[Hotspot, ...] = ()
    via_factory: bool = True
    cross_thread_parent: bool = False

    def __post_init__(self) -> None:
        _freeze(self, "labels")


@dataclass(frozen=True, slots=True)
class Distribution:
    """Per-task distribution of one counter inside a group."""

    sum: int
    p50: int
    p95: int
    max: int


@dataclass(frozen=True, slots=True)
class Group:
    """Tasks sharing a coroutine (and labels)."""

    key: str
    coro: str | None
    labels: Mapping[str, str]
    tasks: int
    folded_tasks: int
    allocated_bytes: Distribution
    allocations: int
    live_bytes: int
    retained_after_done_bytes: int
    hotspots: tuple[Hotspot, ...] = ()
    live_hotspots: tuple[Hotspot, ...] = ()

    def __post_init__(self) -> None:
        _freeze(self, "labels")


@dataclass(frozen=True, slots=True)
class LeakSuspect:
    """A group of finished tasks whose memory outlives them, with the sites still holding it.

    ``hotspots`` rank the sites by what they still hold, and each one's ``bytes`` is that
    (equal to its ``live_bytes``); ``allocations`` counts all the site made."""

    key: str
    coro: str | None
    labels: Mapping[str, str]
    tasks: int
    retained_bytes: int
    hotspots: tuple[Hotspot, ...] = ()
    # How sure the attribution of the retained bytes is (weighted by them, as a task's
    # confidence is by its allocated bytes), and how many of them were only inferred (a
    # thread the task started, with no context link): a guess is never shown as a fact.
    confidence: float = 1.0
    inferred_bytes: int = 0

    def __post_init__(self) -> None:
        _freeze(self, "labels")


@dataclass(frozen=True, slots=True)
class ThreadReport:
    """A thread that allocated while the profiler ran."""

    id: int
    native_id: int | None
    name: str | None
    role: str
    attributed_bytes: int
    unattributed_bytes: int
    allocations: int
    # of attributed_bytes, those inferred (a thread a task started), and their byte-weighted
    # confidence (None: none inferred); per thread, where tasks' shares name only its id
    inferred_bytes: int = 0
    inferred_confidence: float | None = None


@dataclass(frozen=True, slots=True)
class UnattributedThread:
    thread_id: int | None
    allocated_bytes: int
    allocations: int
    freed_bytes: int
    live_bytes: int


@dataclass(frozen=True, slots=True)
class Unattributed:
    """Bytes allocated outside any task: loop internals, start-up, unrelated threads."""

    allocated_bytes: int
    allocations: int
    freed_bytes: int
    live_bytes: int
    by_thread: tuple[UnattributedThread, ...] = ()


@dataclass(frozen=True, slots=True)
class Totals:
    allocated_bytes: int
    allocations: int
    freed_bytes: int
    live_bytes: int
    attributed_bytes: int
    unattributed_bytes: int
    tasks: int
    folded_tasks: int


@dataclass(frozen=True, slots=True)
class RunInfo:
    python: str
    platform: str
    loop: str
    mode: str
    sample_interval: int | None
    stack_depth: int
    started_at: str
    duration_s: float
    pid: int
    estimated: bool
    stacks_sampled: bool
    tracker_bytes: int = 0


@dataclass(frozen=True)
class Report:
    """One profiled run.  Build it with ``Profiler.snapshot()`` or :meth:`Report.load`."""

    run: RunInfo
    totals: Totals
    tasks: tuple[TaskReport, ...]
    unattributed: Unattributed
    groups: tuple[Group, ...] = ()
    leak_suspects: tuple[LeakSuspect, ...] = ()
    threads: tuple[ThreadReport, ...] = ()
    schema_version: int = SCHEMA_VERSION
    tool: Mapping[str, str] = field(default_factory=lambda: {"name": "memscope-async"})
    # id(task) -> task id for the task objects of this run; never serialised.
    _objects: Mapping[int, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _freeze(self, "tool")

    # -- lookups -------------------------------------------------------------------------
    def task(self, task_or_id: Any) -> TaskReport:
        """The report of one task, given its report id, the ``asyncio.Task`` itself, or a
        :class:`TaskReport` of it (e.g. from another snapshot of the same run).

        Raises ``KeyError`` if the report does not know that task.  A task object is
        matched by its address, its coroutine and its name when it finished (an address
        can be a later task's), so one renamed after it finished is found by its id.
        """
        index = self._index()
        if isinstance(task_or_id, TaskReport):
            task_or_id = task_or_id.id
        if isinstance(task_or_id, int) and not isinstance(task_or_id, bool):
            try:
                return index[task_or_id]
            except KeyError:
                raise KeyError(f"no task with id {task_or_id} in this report") from None
        tid = self._objects.get(id(task_or_id))
        if tid is not None and tid in index and _same_task(task_or_id, index[tid]):
            return index[tid]
        if not self._objects and self.tasks:  # read back from JSON: no task objects behind it
            raise KeyError(f"task {task_or_id!r}: a report read back from JSON finds tasks by id "
                           "(or report.find(name=..., coro=...)), not by task object")
        raise KeyError(f"task {task_or_id!r} is not in this report")

    def find(self, name: str | None = None, coro: str | None = None, **labels: str) -> list[TaskReport]:
        """Tasks matching every given criterion.  ``coro`` matches the qualified name or its
        last dotted part (``"worker"`` matches ``"Service.worker"``)."""
        out = []
        for t in self.tasks:
            if name is not None and t.name != name:
                continue
            if coro is not None and t.coro != coro and (t.coro or "").rsplit(".", 1)[-1] != coro:
                continue
            if any(t.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(t)
        return out

    def children(self, task_or_id: Any) -> list[TaskReport]:
        """Direct children of a task (tasks whose ``parent_id`` is it)."""
        tid = self.task(task_or_id).id
        return [t for t in self.tasks if t.parent_id == tid]

    def walk(self) -> Iterator[tuple[int, TaskReport]]:
        """(depth, task) pairs in lineage order: each root followed by its descendants."""
        kids: dict[int | None, list[TaskReport]] = {}
        known = {t.id for t in self.tasks}
        for t in self.tasks:
            parent = t.parent_id if t.parent_id in known else None
            kids.setdefault(parent, []).append(t)
        stack = [(0, t) for t in reversed(kids.get(None, []))]
        while stack:
            depth, t = stack.pop()
            yield depth, t
            stack.extend((depth + 1, c) for c in reversed(kids.get(t.id, [])))

    def _index(self) -> dict[int, TaskReport]:
        index = self.__dict__.get("_task_index")
        if index is None:
            index = {t.id: t for t in self.tasks}
            object.__setattr__(self, "_task_index", index)  # a cache, not state
        return index

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready plain data (the schema-v1 document)."""
        doc = {
            "schema_version": self.schema_version,
            "tool": dict(self.tool),
            "run": dataclasses.asdict(self.run),
            "totals": dataclasses.asdict(self.totals),
            "tasks": [_task_dict(t) for t in self.tasks],
            "groups": [dataclasses.asdict(g) for g in self.groups],
            "leak_suspects": [dataclasses.asdict(s) for s in self.leak_suspects],
            "threads": [dataclasses.asdict(t) for t in self.threads],
            "unattributed": dataclasses.asdict(self.unattributed),
        }
        return doc

    def to_json(self, *, indent: bool = False) -> str:
        """The schema-v1 JSON document, as a str (like ``json.dumps``)."""
        return self.to_json_bytes(indent=indent).decode()

    def to_json_bytes(self, *, indent: bool = False) -> bytes:
        """The schema-v1 JSON document, as UTF-8 bytes (what the exporters write)."""
        opts = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
        doc = self.to_dict()
        try:
            return orjson.dumps(doc, option=opts)
        except TypeError:
            # A lone surrogate (a name or label from os.fsdecode of bytes that are not
            # UTF-8, a file name in a stack) cannot be written as UTF-8: such a string is
            # written with that character as a \uXXXX escape in its text, not lost.
            return orjson.dumps(_without_surrogates(doc), option=opts)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "Report":
        """Rebuild a report from its plain-data form.  Raises :class:`ReportError`."""
        report = cls._from_dict(doc)
        _check_tasks(report.tasks)
        return report

    @classmethod
    def _from_dict(cls, doc: Mapping[str, Any]) -> "Report":
        try:
            version = doc["schema_version"]
            if type(version) is not int or version != SCHEMA_VERSION:
                raise ReportError(f"unsupported report schema_version {version!r} (expected {SCHEMA_VERSION})")
            return cls(
                schema_version=version,
                tool=dict(doc.get("tool", {})),
                run=_build(RunInfo, doc["run"]),
                totals=_build(Totals, doc["totals"]),
                tasks=tuple(_task_from(t) for t in _list(doc["tasks"], "tasks")),
                groups=tuple(_group_from(g) for g in _list(doc.get("groups", ()), "groups")),
                leak_suspects=tuple(_leak_from(s) for s in _list(doc.get("leak_suspects", ()), "leak_suspects")),
                threads=tuple(_build(ThreadReport, t) for t in _list(doc.get("threads", ()), "threads")),
                unattributed=_build(Unattributed, {
                    **{k: v for k, v in doc["unattributed"].items() if k != "by_thread"},
                    "by_thread": tuple(_build(UnattributedThread, u) for u in doc["unattributed"].get("by_thread", ())),
                }),
            )
        except ReportError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ReportError(f"not a memscope-async report: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_json(cls, data: bytes | str) -> "Report":
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ReportError(f"not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ReportError("not a memscope-async report: top level is not an object")
        return cls.from_dict(doc)

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """Read a report written by ``Profiler.export``.  Raises ``OSError`` (a file that
        cannot be read) or :class:`ReportError` (one that is not a report; the message
        starts with the path)."""
        data = Path(path).read_bytes()
        try:
            return cls.from_json(data)
        except ReportError as exc:
            raise ReportError(f"{os.fspath(path)}: {exc}") from None


_STATES = frozenset({"pending", "done", "cancelled", "failed"})


def _check_tasks(tasks: tuple[TaskReport, ...]) -> None:
    """What a report's tasks must be for its lineage to mean anything (every lookup and
    walk relies on it): one task per id, a known state, and parents that never lead back
    to the task itself.  A parent that is not listed (folded) is fine."""
    parents: dict[int, int | None] = {}
    for t in tasks:
        if t.id in parents:
            raise ReportError(f"not a consistent memscope-async report: task id {t.id} appears twice")
        if t.state not in _STATES:
            raise ReportError(f"not a consistent memscope-async report: task {t.id} has state {t.state!r}")
        parents[t.id] = t.parent_id
    done: set[int] = set()  # ids whose parent chains are known to end
    for tid in parents:
        seen: set[int] = set()
        node: int | None = tid
        while node is not None and node in parents and node not in done:
            if node in seen:
                raise ReportError(f"not a consistent memscope-async report: task {node} is its own ancestor")
            seen.add(node)
            node = parents[node]
        done.update(seen)


def _without_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_surrogates(v) for v in value]
    return value


def _task_dict(t: TaskReport) -> dict[str, Any]:
    d = dataclasses.asdict(t)
    d["lineage"] = list(t.lineage)
    d["labels"] = dict(t.labels)
    return d


def _list(v: Any, what: str) -> Any:
    if not isinstance(v, (list, tuple)):
        raise ReportError(f"not a memscope-async report: {what} is {type(v).__name__}, not a list")
    return v


_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}


@functools.cache
def _scalar_fields(cls: type) -> dict[str, tuple[type, ...]]:
    """cls's fields whose annotation is a scalar (or a union of them): the types a value
    read back may have.  (Annotations are strings here: from __future__ import annotations.)"""
    out = {}
    for f in dataclasses.fields(cls):
        parts = [p.strip() for p in str(f.type).split("|")]
        if all(p in _SCALARS for p in parts):
            out[f.name] = tuple(t for p in parts for t in _SCALARS[p])
    return out


def _build(cls: type, d: Mapping[str, Any]) -> Any:
    """cls(**d), once every scalar field present has a value of its type (a bool is not a
    number): a report read back from JSON that passes is one its readers can use."""
    if not isinstance(d, Mapping):
        raise ReportError(f"not a memscope-async report: a {cls.__name__} is {type(d).__name__}, not an object")
    for name, types in _scalar_fields(cls).items():
        if name not in d:
            continue  # (the class says what is required)
        v = d[name]
        if not isinstance(v, types) or (type(v) is bool and bool not in types):
            names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
            wanted = " or ".join(names[t] for t in types if not (t is int and float in types))
            raise ReportError(f"not a memscope-async report: {cls.__name__}.{name} is {v!r}, not {wanted}")
    return cls(**d)


def _labels(v: Any) -> dict[str, str]:
    labels = dict(v or {})
    if not all(type(k) is str and type(x) is str for k, x in labels.items()):
        raise ReportError("not a memscope-async report: labels map names to strings")
    return labels


def _ints(v: Any, what: str) -> tuple[int, ...]:
    out = tuple(v)
    if not all(type(i) is int for i in out):
        raise ReportError(f"not a memscope-async report: {what} holds task ids (integers)")
    return out


def _frames(stack: Iterable[Mapping[str, Any]]) -> tuple[Frame, ...]:
    return tuple(_build(Frame, f) for f in stack)


def _hotspots(items: Iterable[Mapping[str, Any]]) -> tuple[Hotspot, ...]:
    return tuple(_build(Hotspot, {**h, "stack": _frames(h.get("stack", ()))}) for h in items)


def _task_from(d: Mapping[str, Any]) -> TaskReport:
    d = dict(d)
    d["lineage"] = _ints(d["lineage"], "lineage")
    d["labels"] = _labels(d.get("labels"))
    d["subtree"] = _build(SubtreeCounters, d["subtree"])
    d["attribution"] = tuple(_build(AttributionShare, a) for a in d.get("attribution", ()))
    d["migrations"] = tuple(_build(Migration, m) for m in d.get("migrations", ()))
    d["hotspots"] = _hotspots(d.get("hotspots", ()))
    d["live_hotspots"] = _hotspots(d.get("live_hotspots", ()))
    return _build(TaskReport, d)


def _group_from(d: Mapping[str, Any]) -> Group:
    d = dict(d)
    d["allocated_bytes"] = _build(Distribution, d["allocated_bytes"])
    d["labels"] = _labels(d.get("labels"))
    d["hotspots"] = _hotspots(d.get("hotspots", ()))
    d["live_hotspots"] = _hotspots(d.get("live_hotspots", ()))
    return _build(Group, d)


def _leak_from(d: Mapping[str, Any]) -> LeakSuspect:
    d = dict(d)
    d["labels"] = _labels(d.get("labels"))
    d["hotspots"] = _hotspots(d.get("hotspots", ()))
    return _build(LeakSuspect, d)
