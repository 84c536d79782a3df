"""pytest plugin (entry point ``pytest11``): profile a test per asyncio task, and fail it
when a task holds or allocates more than allowed.

* The ``memscope`` fixture yields a running :class:`memscope_async.Profiler`.  Every event
  loop the test makes (``asyncio.run`` in a sync test, pytest-asyncio's loop) is
  instrumented until the test's teardown.  ``memscope.snapshot()`` inside the test, or in
  the teardown of a fixture that depends on ``memscope``, gives the report so far.
* The ``memscope`` marker profiles the test too (no need to ask for the fixture) and checks
  limits once the test body has passed::

      @pytest.mark.memscope(max_live_bytes="1 MiB")           # per task
      @pytest.mark.memscope(max_allocated_bytes=50_000_000, per_task=False)  # whole test
      @pytest.mark.memscope(mode="sampled", sample_interval="64 KiB")      # profiler options

  The marker also takes the profiler's options (``mode``, ``sample_interval``,
  ``stack_interval``, ``stack_depth``, ``max_finished_tasks``, ``threads``), as every other
  entry point does; the intervals may be strings like the limits.

The limits apply to the tasks the test body makes (with ``per_task=False``, to what the
body allocates and holds): what a fixture's setup made after the profiler started, in a
task of its own or not, is not the test's.  (A task a fixture started before it, which
the profiler first sees when that task next runs, in the body, counts as the body's.)
In sampled mode the numbers checked are estimates (the failure says so): a limit well
under the sample interval fails by chance.

Tests that use neither do not touch the profiler: no hook, no policy.  (The outermost
session loads the package at configure, ~30 ms: see pytest_configure.)  Only one
profiler can run in a process; a test that cannot get it
errors at setup and says why (under ``memscope-async run``, whose profiler runs for the
whole session, every such test does).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Iterator

import pytest

if TYPE_CHECKING:  # (for annotations only)
    from .attribution.report import Report, TaskReport, Totals
    from .profiler import Profiler

__all__ = ["memscope"]

_MARKER = "memscope"
_MARKER_HELP = (
    "memscope(max_live_bytes=None, max_allocated_bytes=None, per_task=True, **options): profile "
    "the test with memscope-async and fail it if any asyncio task (or, with per_task=False, the "
    "whole test body) holds more than max_live_bytes at its end or allocated more than "
    "max_allocated_bytes. Limits are bytes or strings like '512KiB', '1 MiB'. options: the "
    "profiler's (mode, sample_interval, stack_interval, stack_depth, max_finished_tasks, threads)."
)
# the profiler options the marker passes on (the intervals may be given as sizes)
_OPTIONS = ("mode", "sample_interval", "stack_interval", "stack_depth", "max_finished_tasks", "threads")
_SIZE_OPTIONS = ("sample_interval", "stack_interval")
_TABLE_ROWS = 5


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_HELP)
    # The outermost session loads the whole package (and orjson) now, before pytester's
    # in-process inner sessions take their sys.modules snapshots: what is first imported
    # inside one is dropped after it, and orjson 3.13.0 crashes when imported again.  An
    # inner session loads nothing more until its tests use the fixture or the marker, so
    # a suite that runs pytester with this plugin disabled outside (-p no:memscope_async)
    # never imports orjson through us.
    if not _inside_a_test():
        from . import Profiler  # noqa: F401 - the first use of an export loads them all


def _inside_a_test() -> bool:
    """Is this session run from inside another session's test, in this process (pytester's
    inline runs)?  Then pytest's runner is on the stack.  (Not PYTEST_CURRENT_TEST: an
    inner session deletes it when its own first test ends.)"""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__") == "_pytest.runner":
            return True
        frame = frame.f_back
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A marked test gets the fixture, so the marker alone is enough.
    for item in items:
        names = getattr(item, "fixturenames", None)
        if names is not None and _MARKER not in names and item.get_closest_marker(_MARKER) is not None:
            names.append(_MARKER)


@pytest.fixture
def memscope(request: pytest.FixtureRequest) -> Iterator["Profiler"]:
    """A running memscope-async profiler for this test; every event loop the test makes
    is instrumented (``memscope.snapshot()`` returns the report so far).  Stopped, and
    loops un-instrumented, at teardown; its data stays readable afterwards."""
    limits = _Limits.from_item(request.node)
    from . import api
    from .profiler import Profiler, ProfilerError, current_profiler

    problem = None
    running = current_profiler()
    try:
        Profiler(**limits.options)  # the marker's options alone: what it refuses is the marker's
    except (ProfilerError, ValueError, TypeError) as exc:
        problem = f"memscope marker: {exc}"
    if problem is None:
        try:
            if running is not None and running.active and running.ambient:
                # (install_policy() would join it: a profile of the whole session, not of this test)
                raise ProfilerError("memscope-async run's profiler runs for the whole session, and one profiler "
                                    "runs per process; run pytest on its own to profile single tests")
            profiler = api.install_policy(**limits.options)
        except ProfilerError as exc:
            problem = f"memscope: cannot profile this test: {exc}"
    if problem is not None:  # (outside the except: one message, not two chained)
        pytest.fail(problem, pytrace=False)
    run = _Run(profiler, limits)
    request.node.stash[_RUN] = run
    try:
        yield profiler
    finally:
        del request.node.stash[_RUN]
        api.uninstall_policy()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    run = item.stash.get(_RUN, None)
    if run is not None:
        run.before_body(item)
    outcome = yield
    if run is None:
        return
    run.after_body()
    if outcome.excinfo is None and hasattr(outcome, "force_exception"):
        # A limit exceeded fails the test's call itself, as an assertion in it would: so
        # pytest's own outcomes apply (xfail, --pdb, ...), not a report changed afterwards.
        failure = run.check()
        run.checked = True
        if failure is not None:
            outcome.force_exception(pytest.fail.Exception(failure, pytrace=False))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    run = item.stash.get(_RUN, None)
    if run is None or call.when != "call" or run.checked:
        return
    report = outcome.get_result()  # (pluggy before 1.1: no force_exception)
    if report.passed:
        failure = run.check()
        if failure is not None:
            report.outcome = "failed"
            report.longrepr = failure


# -- limits ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Limits:
    max_live_bytes: int | None = None
    max_allocated_bytes: int | None = None
    per_task: bool = True
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the profiler's

    @property
    def any(self) -> bool:
        return self.max_live_bytes is not None or self.max_allocated_bytes is not None

    @classmethod
    def from_item(cls, item: pytest.Item) -> "_Limits":
        """The limits of the item's closest ``memscope`` marker; fails the test (at setup)
        if the marker is malformed."""
        marker = item.get_closest_marker(_MARKER)
        if marker is None:
            return cls()
        if marker.args:
            pytest.fail("memscope marker: give limits by keyword, e.g. memscope(max_live_bytes='1 MiB')",
                        pytrace=False)
        kwargs = dict(marker.kwargs)
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        for k in _SIZE_OPTIONS:
            if isinstance(options.get(k), str):
                options[k] = _limit(k, options[k])
        unknown = set(kwargs) - {"max_live_bytes", "max_allocated_bytes", "per_task"}
        if unknown:
            pytest.fail(f"memscope marker: unknown argument(s) {', '.join(sorted(unknown))}; "
                        f"expected {_MARKER_HELP.split(':', 1)[0]} with options {', '.join(_OPTIONS)}",
                        pytrace=False)
        per_task = kwargs.pop("per_task", True)
        if not isinstance(per_task, bool):
            pytest.fail(f"memscope marker: per_task must be True or False, not {per_task!r}", pytrace=False)
        return cls(per_task=per_task, options=options, **{k: _limit(k, v) for k, v in kwargs.items()})


def _limit(name: str, value: Any) -> int | None:
    if value is None:
        return None
    from .cli import parse_size

    try:
        # 0 ("nothing at all", or no stack samples) is legitimate, as an int or a string
        return parse_size(value, allow_zero=True)
    except (ValueError, TypeError) as exc:
        problem = str(exc)
    pytest.fail(f"memscope marker: {name}: {problem}", pytrace=False)  # (outside the except: one message)


# -- one profiled test -------------------------------------------------------------------


class _Run:
    """The profiler of one test and what the limits are checked against."""

    def __init__(self, profiler: "Profiler", limits: _Limits) -> None:
        self.profiler = profiler
        self.limits = limits
        self.baseline: "Totals | None" = None
        self.report: "Report | None" = None
        self.first_task_id = 0  # the body's tasks have this id or more
        self.problem: str | None = None  # why the limits could not be checked
        self.checked = False  # the limits were checked in the call itself

    def before_body(self, item: pytest.Item) -> None:
        # pytest-asyncio makes its loop under the event-loop policy it saw at session
        # start, not under ours, and a loop of a wider scope predates this test anyway:
        # instrument every loop the test was handed (runner or loop fixtures).
        for value in list(getattr(item, "funcargs", {}).values()):
            loop = _loop_of(value)
            if loop is not None and not loop.is_closed():
                self.profiler.instrument_loop(loop)
        from .attribution import _core

        self.first_task_id = _core.next_task_id()
        if self.limits.any and not self.limits.per_task:
            self.baseline = self.profiler.snapshot().totals

    def after_body(self) -> None:
        if self.limits.any:
            try:
                self.report = self.profiler.snapshot()
            except Exception as exc:  # (the test closed its profiler: memscope.close())
                self.problem = f"memscope: cannot check this test's limits: {exc}"

    def check(self) -> str | None:
        """The failure message if a limit is exceeded, else None."""
        if self.problem is not None:
            return self.problem
        if self.report is None:
            return None
        if self.limits.per_task:
            return _check_tasks(self.report, self.limits, self.first_task_id)
        return _check_total(self.report, self.baseline, self.limits)


def _loop_of(value: Any) -> Any:
    """The event loop behind a fixture value (a loop or an asyncio.Runner), or None."""
    import asyncio

    if isinstance(value, asyncio.AbstractEventLoop):
        return value
    if isinstance(value, asyncio.Runner):
        try:
            return value.get_loop()
        except RuntimeError:  # closed runner
            return None
    return None


def _check_tasks(report: "Report", limits: _Limits, first_id: int = 0) -> str | None:
    lines: list[str] = []
    body = [t for t in report.tasks if t.id >= first_id]  # the test body's tasks, not its fixtures'
    estimated = _estimated(report)
    checks = (
        (limits.max_live_bytes, "live", "holds", lambda t: t.live_bytes),
        (limits.max_allocated_bytes, "allocated", "allocated", lambda t: t.allocated_bytes),
    )
    worst_metric = None
    for limit, what, verb, metric in checks:
        if limit is None:
            continue
        over = sorted((t for t in body if metric(t) > limit), key=lambda t: (-metric(t), t.id))
        if not over:
            continue
        worst = over[0]
        more = f" (and {len(over) - 1} more task{'s' if len(over) > 2 else ''} over the limit)" if len(over) > 1 else ""
        lines.append(f"memscope: limited to {_format_size(limit)} {what} per task, task {_task_name(worst)!r} "
                     f"(id {worst.id}) {verb} {_format_size(metric(worst))}{estimated}{more}")
        worst_metric = worst_metric or metric
    if not lines:
        return None
    return "\n".join([*lines, "", *_task_table(report, worst_metric)])


def _check_total(report: "Report", baseline: "Totals | None", limits: _Limits) -> str | None:
    totals = report.totals
    base_allocated = baseline.allocated_bytes if baseline else 0
    base_live = baseline.live_bytes if baseline else 0
    measured = (
        (limits.max_live_bytes, "live", "holds", totals.live_bytes - base_live),
        (limits.max_allocated_bytes, "allocated", "allocated", totals.allocated_bytes - base_allocated),
    )
    estimated = _estimated(report)
    lines = [
        f"memscope: limited to {_format_size(limit)} {what} in total, the test {verb} {_format_size(value)}{estimated}"
        for limit, what, verb, value in measured
        if limit is not None and value > limit
    ]
    if not lines:
        return None
    metric = (lambda t: t.live_bytes) if "live" in lines[0] else (lambda t: t.allocated_bytes)
    return "\n".join([*lines, "", *_task_table(report, metric)])


def _estimated(report: "Report") -> str:
    """What a failure adds to its numbers when they are sampled mode's estimates."""
    return " (estimated: sampled mode)" if report.run.estimated else ""


def _task_name(task: "TaskReport") -> str:
    """The user's name for a task, else its coroutine: "Task-7" says nothing."""
    auto = task.name is None or (task.name.startswith("Task-") and task.name[5:].isdigit())
    return (task.coro or task.name or f"task {task.id}") if auto else task.name


def _task_table(report: "Report", metric) -> list[str]:
    if not report.tasks:
        return ["(no asyncio task ran)"]
    tasks = sorted(report.tasks, key=lambda t: (-metric(t), t.id))[:_TABLE_ROWS]
    rows = [("id", "task", "state", "allocated", "live", "peak")]
    rows += [(str(t.id), _task_name(t), t.state, _format_size(t.allocated_bytes), _format_size(t.live_bytes),
              _format_size(t.peak_live_bytes)) for t in tasks]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = {1, 2}  # text columns; the numbers are right-aligned
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    if len(report.tasks) > _TABLE_ROWS:
        out.append(f"... and {len(report.tasks) - _TABLE_ROWS} more tasks")
    return out




_RUN = pytest.StashKey[_Run]()


def _format_size(n: int) -> str:
    # imported on use: the plugin module itself must stay cheap to import
    from .exporters.text import format_size

    return format_size(n)
