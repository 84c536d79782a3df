"""The configurations a workload is measured under: no profiler, memscope-async, peers.

A config is entered in the child process before the clock starts and left after it stops,
so only the workload itself is timed; what entering and leaving cost is reported apart.
Every optional tool is imported inside its own ``session`` so a config that is not run
never loads it (a plain run must not pay for importing memray).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["CONFIGS", "Config", "Session", "import_memscope", "rss_bytes"]

SAMPLE_INTERVAL = 512 * 1024  # bytes; Go's MemProfileRate, the budget's sampled mode


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def import_memscope() -> Any:
    """Import the installed ``memscope_async`` rather than the source folder of that name.

    ``python -m benches.run`` puts the repository root first on ``sys.path``, and the root
    holds a ``memscope_async/`` folder that is only part of the package the build
    assembles.  Drop that entry (``benches`` is already imported, so it is not needed) and
    measure what users install."""
    root = str(Path(__file__).resolve().parent.parent)
    if sys.path and os.path.realpath(sys.path[0] or os.getcwd()) == root:
        del sys.path[0]
    return importlib.import_module("memscope_async")


@dataclass
class Session:
    """What a config hands the child while it is active.

    ``loop_factory`` goes to ``asyncio.Runner`` (``None``: asyncio's default loop).
    ``probe()`` returns point-in-time memory numbers (RSS, and the tracker's stats when
    there is one).  ``after_workload()`` runs right after the clock stops, while the loop
    still exists; ``extras`` collects what the session learned (stats, timings of stop and
    snapshot, errors that did not stop the measurement)."""

    loop_factory: Callable[[], Any] | None = None
    probe: Callable[[], dict[str, Any]] = lambda: {"rss": rss_bytes()}
    after_workload: Callable[[], None] = lambda: None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """One way of running a workload.

    ``baseline`` is the config its ratio is taken against; ``needs`` the optional modules it
    imports (it is skipped, with a note, when one is missing)."""

    name: str
    baseline: str
    needs: tuple[str, ...]
    session: Callable[["RunContext"], contextlib.AbstractContextManager[Session]]
    note: str = ""


@dataclass(frozen=True)
class RunContext:
    tmpdir: Path
    first_repeat: bool
    seed: int = 0  # memscope's sampling seed; 0 draws one (benches.instructions fixes it)


# -- session builders ---------------------------------------------------------------------
def _uvloop_factory() -> Callable[[], Any]:
    import uvloop

    return uvloop.new_event_loop


@contextlib.contextmanager
def _plain(ctx: RunContext, *, uvloop: bool = False) -> Iterator[Session]:
    yield Session(loop_factory=_uvloop_factory() if uvloop else None)


@contextlib.contextmanager
def _memscope(ctx: RunContext, *, mode: str, threads: bool = True, uvloop: bool = False) -> Iterator[Session]:
    ms = import_memscope()
    kwargs: dict[str, Any] = {"mode": mode, "threads": threads}
    if mode == "sampled":
        kwargs["sample_interval"] = SAMPLE_INTERVAL
    if ctx.seed:
        kwargs["seed"] = ctx.seed
    profiler = ms.Profiler(**kwargs)
    session = Session()

    def probe() -> dict[str, Any]:
        return {"rss": rss_bytes(), "stats": dict(profiler.stats())}

    def after_workload() -> None:
        session.extras["stats_after_workload"] = dict(profiler.stats())

    session.probe = probe
    session.after_workload = after_workload
    t0 = time.perf_counter()
    profiler.start()
    session.extras["start_s"] = time.perf_counter() - t0
    try:
        base = _uvloop_factory() if uvloop else None
        session.loop_factory = ms.loop_factory(base, profiler=profiler)
        yield session
    finally:
        t0 = time.perf_counter()
        profiler.stop()
        session.extras["stop_s"] = time.perf_counter() - t0
    # The report is built once per (workload, config), on the first repeat: it is not part
    # of the timed run, but a profiler whose report breaks on a workload must say so.
    if ctx.first_repeat:
        t0 = time.perf_counter()
        report = profiler.snapshot()
        session.extras["snapshot_s"] = time.perf_counter() - t0
        totals = getattr(report, "totals", None)
        if totals is not None:
            session.extras["report_tasks"] = getattr(totals, "tasks", None)
            session.extras["report_folded_tasks"] = getattr(totals, "folded_tasks", None)
            session.extras["report_allocations"] = getattr(totals, "allocations", None)
            session.extras["report_allocated_bytes"] = getattr(totals, "allocated_bytes", None)
            session.extras["report_unattributed_bytes"] = getattr(totals, "unattributed_bytes", None)


@contextlib.contextmanager
def _tracemalloc(ctx: RunContext, *, frames: int) -> Iterator[Session]:
    session = Session()
    session.probe = lambda: {"rss": rss_bytes(), "tracemalloc_bytes": tracemalloc.get_tracemalloc_memory()}
    tracemalloc.start(frames)
    try:
        yield session
    finally:
        session.extras["tracemalloc_memory_bytes"] = tracemalloc.get_tracemalloc_memory()
        tracemalloc.stop()


@contextlib.contextmanager
def _memray(ctx: RunContext, *, python_allocators: bool) -> Iterator[Session]:
    import memray

    path = ctx.tmpdir / "memray.bin"
    session = Session()
    kwargs = {"trace_python_allocators": True} if python_allocators else {}
    t0 = time.perf_counter()
    with memray.Tracker(path, **kwargs):
        session.extras["start_s"] = time.perf_counter() - t0
        yield session
        t0 = time.perf_counter()
    # leaving the tracker flushes and compresses the capture file
    session.extras["stop_s"] = time.perf_counter() - t0
    session.extras["capture_file_bytes"] = path.stat().st_size if path.exists() else None


def _cfg(name: str, baseline: str, needs: tuple[str, ...], builder: Callable[..., Any], note: str = "", **kw: Any) -> Config:
    return Config(name, baseline, needs, lambda ctx: builder(ctx, **kw), note)


MS = ("memscope_async",)
CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        _cfg("plain", "plain", (), _plain),
        _cfg("memscope-exact", "plain", MS, _memscope, mode="exact"),
        _cfg("memscope-sampled", "plain", MS, _memscope, mode="sampled", note="512 KiB"),
        _cfg("memscope-exact-nothreads", "plain", MS, _memscope, mode="exact", threads=False, note="threads=False"),
        _cfg("tracemalloc-1", "plain", (), _tracemalloc, frames=1),
        _cfg("tracemalloc-16", "plain", (), _tracemalloc, frames=16),
        _cfg("memray", "plain", ("memray",), _memray, python_allocators=False),
        _cfg("memray-pyalloc", "plain", ("memray",), _memray, python_allocators=True, note="trace_python_allocators=True"),
        _cfg("plain-uvloop", "plain", ("uvloop",), _plain, uvloop=True),
        _cfg("memscope-exact-uvloop", "plain-uvloop", MS + ("uvloop",), _memscope, mode="exact", uvloop=True),
    ]
}
