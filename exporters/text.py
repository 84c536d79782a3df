"""Plain-text summary of a :class:`Report`: what the CLI prints after a run.

Two rules shape the output:

* Honesty.  Bytes charged to a task by the ``inferred`` route (no context link, a guess)
  are never folded silently into its other bytes: the task tables show them in a column of
  their own as ``~1.2 MiB (c=0.40)`` (live and peak, which cannot be split by route and so
  include them, are marked ``~`` too), and a confidence below 1 is printed with two decimals
  (rounded down, so 0.999 never reads as certain).  In sampled mode every byte and
  allocation count is an estimate and is printed with a leading ``~``.
* Determinism.  Same report, same text: ties are broken by id or key, the output is plain
  ASCII (other characters are backslash-escaped) and lines carry no trailing spaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..attribution.report import Hotspot, Report, TaskReport, ThreadReport

__all__ = ["render_text"]

_INDENT = "  "  # per level of task lineage
_GAP = "  "  # between table columns
_MIN_FLEX = 12  # a shrinkable column is never narrower than this


def render_text(report: Report, *, top: int = 15, width: int = 100) -> str:
    """The per-task summary of ``report`` as one string ending in a newline.

    ``top`` is the number of rows in each ranked table (tasks, threads, leak suspects).
    ``width`` is the target line width in characters: name, coroutine and file columns are
    shortened to fit; numbers never are, so a very small width can still be exceeded.
    Sizes are binary (B, KiB, MiB, GiB, one decimal).

    Raises ``ValueError`` if ``top`` < 1 or ``width`` < 40.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if width < 40:
        raise ValueError(f"width must be at least 40 characters, got {width}")
    fmt = _Numbers(estimated=report.run.estimated)
    sections = [
        _header(report, fmt),
        _task_table(report, fmt, "Top tasks by live bytes", lambda t: t.live_bytes, top, width),
        _task_table(report, fmt, "Top tasks by allocated bytes", lambda t: t.allocated_bytes, top, width,
                    ranked_by_total=True),
        _unattributed(report, fmt, top, width),
    ]
    if report.leak_suspects:
        sections.append(_leak_suspects(report, fmt, top, width))
    if report.threads:
        sections.append(_threads(report, fmt, top, width))
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


# -- numbers ---------------------------------------------------------------------------


def format_size(n: int) -> str:
    """Binary units with one decimal; the unit is chosen after rounding so that 1048575
    bytes reads ``1.0 MiB`` rather than ``1024.0 KiB``."""
    if abs(n) < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if abs(round(value, 1)) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _confidence(c: float) -> str:
    if not math.isfinite(c):
        return "?"
    if c >= 1.0:
        return "1"
    # Round down: claiming more certainty than we have is the one error we must not make.
    # The epsilon keeps float noise (0.29 * 100 == 28.999...) from costing a whole step.
    return f"{math.floor(c * 100 + 1e-9) / 100:.2f}"


@dataclass(frozen=True)
class _Numbers:
    """Formats bytes and counts, marking every one as approximate in sampled mode."""

    estimated: bool

    @property
    def mark(self) -> str:
        return "~" if self.estimated else ""

    def size(self, n: int) -> str:
        return self.mark + format_size(n)

    def count(self, n: int) -> str:
        return f"{self.mark}{n}"


# -- text helpers ----------------------------------------------------------------------


def _ascii(text: str) -> str:
    """Printable ASCII only: anything else (non-ASCII, newlines, tabs) is escaped, so a
    strange task name can neither break the layout nor the terminal."""
    return "".join(ch if " " <= ch <= "~" else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _clip(text: str, width: int, *, keep_end: bool) -> str:
    if len(text) <= width:
        return text
    if keep_end:  # file paths: the tail names the file
        return "..." + text[len(text) - width + 3 :]
    return text[: width - 3] + "..."


@dataclass(frozen=True)
class _Column:
    title: str
    numeric: bool = False  # right-aligned
    flex: bool = False  # shrinks when the table is wider than the target width
    keep_end: bool = False  # when shrunk, clip the start instead of the end


def _table(columns: Sequence[_Column], rows: Iterable[Sequence[str]], width: int) -> list[str]:
    cells = [[_ascii(c) for c in row] for row in rows]
    widths = [max([len(col.title)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    excess = sum(widths) + len(_GAP) * (len(columns) - 1) - width
    for i in reversed(range(len(columns))):
        if excess <= 0:
            break
        if columns[i].flex and widths[i] > _MIN_FLEX:
            cut = min(excess, widths[i] - _MIN_FLEX)
            widths[i] -= cut
            excess -= cut

    def line(values: Sequence[str]) -> str:
        parts = []
        for col, w, v in zip(columns, widths, values):
            v = _clip(v, w, keep_end=col.keep_end)
            parts.append(v.rjust(w) if col.numeric else v.ljust(w))
        return _GAP.join(parts).rstrip()

    out = [line([c.title for c in columns]), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return out


def _ranked(items: Sequence, key: Callable, top: int, noun: str) -> tuple[list, list[str]]:
    """The first ``top`` of ``items`` in ``key`` order, and a '... N more' line if cut."""
    ordered = sorted(items, key=key)
    rest = len(ordered) - top
    return ordered[:top], ([f"... and {rest} more {noun}"] if rest > 0 else [])


# -- sections --------------------------------------------------------------------------


def _header(report: Report, fmt: _Numbers) -> list[str]:
    run, totals = report.run, report.totals
    lines = [
        f"memscope-async report (schema v{report.schema_version})",
        f"loop: {_ascii(run.loop)}   mode: {_ascii(run.mode)}   duration: {run.duration_s:.2f} s",
    ]
    if run.estimated:
        interval = f" (mean sample interval {format_size(run.sample_interval)})" if run.sample_interval else ""
        lines.append(f"sampled mode: numbers are estimates{interval}")
    lines.append(
        f"allocated: {fmt.size(totals.allocated_bytes)}   live: {fmt.size(totals.live_bytes)}   "
        f"unattributed: {fmt.size(totals.unattributed_bytes)}"
    )
    lines.append(f"tasks: {totals.tasks} ({totals.folded_tasks} folded into groups)")
    lines.append("(id, parent: the report's task ids, not asyncio's Task-N; indented by depth in the lineage)")
    return lines


def _inferred(task: TaskReport) -> tuple[int, float] | None:
    """Bytes charged through the inferred route and their byte-weighted confidence."""
    shares = [a for a in task.attribution if a.route == "inferred" and a.bytes > 0]
    if not shares:
        return None
    total = sum(a.bytes for a in shares)
    return total, sum(a.bytes * a.confidence for a in shares) / total


def _partly_guessed(fmt: _Numbers, n: int, guessed: bool) -> str:
    """A size that may hold inferred bytes (live, peak: not split by route), marked "~"."""
    return "~" + format_size(n) if guessed and n and not fmt.estimated else fmt.size(n)


def _task_label(task: TaskReport) -> str:
    if task.name and task.coro:
        label = f"{task.name} ({task.coro})"
    else:
        label = task.name or task.coro or f"task {task.id}"
    # Lineage holds the chain of ids down to the task itself, so a root has depth 0.
    return _INDENT * max(len(task.lineage) - 1, 0) + label


def _task_table(report: Report, fmt: _Numbers, title: str, metric: Callable[[TaskReport], int],
                top: int, width: int, *, ranked_by_total: bool = False) -> list[str]:
    if not report.tasks:
        return [title, "(no tasks)"]
    shown, more = _ranked(report.tasks, lambda t: (-metric(t), t.id), top, "tasks")
    inferred = {t.id: _inferred(t) for t in shown}
    with_inferred = any(v is not None for v in inferred.values())

    columns = [
        _Column("id", numeric=True),
        _Column("parent", numeric=True),
        _Column("task", flex=True),
        _Column("state"),
        _Column("allocated", numeric=True),
        _Column("live", numeric=True),
        _Column("peak", numeric=True),
        _Column("confidence", numeric=True),
    ]
    if with_inferred:
        columns.append(_Column("inferred", numeric=True))
    rows = []
    for t in shown:
        guess = inferred[t.id]
        guessed_bytes = guess[0] if guess else 0
        row = [
            str(t.id),
            "-" if t.parent_id is None else str(t.parent_id),
            _task_label(t),
            t.state,
            fmt.size(max(t.allocated_bytes - guessed_bytes, 0)),
            # live and peak cannot be split by route: with inferred bytes among them they
            # are partly guessed, and marked so in the cell itself
            _partly_guessed(fmt, t.live_bytes, guess is not None),
            _partly_guessed(fmt, t.peak_live_bytes, guess is not None),
            _confidence(t.confidence),
        ]
        if with_inferred:
            # Always "~": an inferred byte is a guess even when the count itself is exact.
            row.append(f"~{format_size(guess[0])} (c={_confidence(guess[1])})" if guess else "-")
        rows.append(row)

    lines = [title, *_table(columns, rows, width), *more]
    if with_inferred:
        lines.append("inferred: bytes guessed without a context link (c = confidence),")
        lines.append("not counted in allocated; live and peak include them (marked ~).")
        if ranked_by_total:
            lines.append("rows are ranked by allocated + inferred.")
    return lines


def _thread_names(threads: Sequence[ThreadReport]) -> dict[int, str]:
    """Thread id -> name; an id that several threads had in turn (the OS reuses them)
    names them all, as the unattributed bytes of that id are theirs together."""
    names: dict[int, list[str]] = {}
    for t in threads:
        seen = names.setdefault(t.id, [])
        if (t.name or "") not in seen:
            seen.append(t.name or "")
    return {ident: " / ".join(n for n in ns if n) for ident, ns in names.items()}


def _unattributed(report: Report, fmt: _Numbers, top: int, width: int) -> list[str]:
    u = report.unattributed
    lines = [
        "Unattributed",
        f"allocated: {fmt.size(u.allocated_bytes)}   live: {fmt.size(u.live_bytes)}   "
        f"allocations: {fmt.count(u.allocations)}",
    ]
    if not u.by_thread:
        return lines
    names = _thread_names(report.threads)
    shown, more = _ranked(
        u.by_thread,
        lambda b: (-b.allocated_bytes, b.thread_id is None, b.thread_id or 0),
        top,
        "threads",
    )
    columns = [
        _Column("thread", numeric=True),
        _Column("name", flex=True),
        _Column("allocated", numeric=True),
        _Column("live", numeric=True),
        _Column("allocations", numeric=True),
    ]
    rows = [
        [
            "?" if b.thread_id is None else str(b.thread_id),
            names.get(b.thread_id, "") if b.thread_id is not None else "(unknown)",
            fmt.size(b.allocated_bytes),
            fmt.size(b.live_bytes),
            fmt.count(b.allocations),
        ]
        for b in shown
    ]
    return lines + _table(columns, rows, width) + more


def _top_hotspot(hotspots: Sequence[Hotspot]) -> str:
    if not hotspots:
        return "-"
    # For a leak, the site still holding the most bytes matters; the first one wins ties.
    best = max(hotspots, key=lambda h: (h.live_bytes, h.bytes))
    return f"{best.file}:{best.line}"


def _leak_suspects(report: Report, fmt: _Numbers, top: int, width: int) -> list[str]:
    shown, more = _ranked(report.leak_suspects, lambda s: (-s.retained_bytes, s.key), top, "suspects")
    with_inferred = any(s.inferred_bytes for s in shown)
    columns = [
        _Column("group", flex=True),
        _Column("tasks", numeric=True),
        _Column("retained", numeric=True),
    ]
    if with_inferred:
        columns.append(_Column("of it inferred", numeric=True))
    columns.append(_Column("top hotspot", flex=True, keep_end=True))
    rows = []
    for s in shown:
        # the group's key: its coroutine (with where it is, if another one has its name)
        # and labels, which tell apart suspects of one coroutine (one per route, say)
        row = [s.key, str(s.tasks), fmt.size(s.retained_bytes)]
        if with_inferred:
            # as in the task tables: a guessed byte always carries "~" and the confidence
            row.append(f"~{format_size(s.inferred_bytes)} (c={_confidence(s.confidence)})" if s.inferred_bytes else "-")
        row.append(_top_hotspot(s.hotspots))
        rows.append(row)
    lines = ["Leak suspects", *_table(columns, rows, width), *more]
    if with_inferred:
        lines.append("of it inferred: retained bytes guessed without a context link")
        lines.append("(c = confidence of all the retained bytes).")
    return lines


def _threads(report: Report, fmt: _Numbers, top: int, width: int) -> list[str]:
    shown, more = _ranked(
        report.threads, lambda t: (-(t.attributed_bytes + t.unattributed_bytes), t.id), top, "threads"
    )
    # what of each thread's attributed bytes was inferred (a thread a task started), with
    # the confidence of those bytes: a guessed byte always carries "~" and the confidence
    per_thread = any(t.inferred_confidence is not None for t in report.threads)
    by_ident: dict[int | None, list[float]] = {}
    if not per_thread:
        # a report written before threads said so themselves: from the tasks' shares,
        # which name a thread by its id only (only threads of role "other" are inferred;
        # an id may have been an executor's or a loop's too, one after the other)
        for task in report.tasks:
            for share in task.attribution:
                if share.route == "inferred" and share.bytes:
                    got = by_ident.setdefault(share.thread_id, [0, 0.0])
                    got[0] += share.bytes
                    got[1] += share.bytes * share.confidence

    def inferred_of(t: ThreadReport) -> list[float] | None:
        if per_thread:
            if not t.inferred_bytes or t.inferred_confidence is None:
                return None
            return [t.inferred_bytes, t.inferred_confidence]
        got = by_ident.get(t.id) if t.role == "other" else None
        return [min(got[0], t.attributed_bytes), got[1] / got[0]] if got and t.attributed_bytes else None

    with_inferred = any(inferred_of(t) for t in shown)
    columns = [
        _Column("id", numeric=True),
        _Column("name", flex=True),
        _Column("role"),
        _Column("attributed", numeric=True),
    ]
    if with_inferred:
        columns.append(_Column("of it inferred", numeric=True))
    columns += [_Column("unattributed", numeric=True), _Column("allocations", numeric=True)]
    rows = []
    for t in shown:
        row = [str(t.id), t.name or "", t.role, fmt.size(t.attributed_bytes)]
        if with_inferred:
            got = inferred_of(t)
            row.append(f"~{format_size(int(got[0]))} (c={_confidence(got[1])})" if got else "-")
        rows.append(row + [fmt.size(t.unattributed_bytes), fmt.count(t.allocations)])
    lines = ["Threads", *_table(columns, rows, width), *more]
    if with_inferred:
        lines.append("of it inferred: attributed bytes guessed without a context link (a thread a task")
        lines.append("started), c = their confidence.")
    return lines
