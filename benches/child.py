"""The child side: one measurement in a fresh interpreter, one JSON line on stdout.

The parent starts ``python -m benches.run --child --workload W --config C [--quick]``;
this module enters the config, runs the workload once under ``asyncio.Runner`` and prints
``@@BENCH@@ {json}``.  Only ``runner.run(main())`` is inside the clock: interpreter
start-up, imports, starting and stopping the tracer, loop creation and loop shutdown
(executor joins, async generator finalisation) are all outside it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .configs import CONFIGS, RunContext, import_memscope
from .memory import MEMORY_WORKLOADS
from .workloads import WORKLOADS

__all__ = ["MARK", "child_main", "probe_main"]

MARK = "@@BENCH@@ "


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(doc, default=repr) + "\n")
    sys.stdout.flush()


def _settle_malloc() -> None:
    """Raise glibc's dynamic mmap threshold the way a long-running program does, by
    freeing one large mapped block, so every config serves large blocks alike.

    glibc maps a block above its threshold (128 KiB at first) unless its heap has a free
    chunk that fits, and raises the threshold only when a mapped block is freed at full
    size.  The loopback server's 256 KiB receive buffer is shrunk with realloc before it is
    freed, which never raises it; so whether each buffer is one more mmap + page fault +
    mremap + munmap (8,000 of each per run) or a reuse of heap memory was decided by where
    the heap's free space happened to be when the first one came, and that moved with
    anything imported beforehand: in session 10's traces the plain run landed on the heap
    and both memscope runs on mmap (and a plain run with different imports on mmap too),
    ~3% of the run and more in runs where the page faults piled up.  One 1 MiB block,
    mapped and freed here before anything is timed, puts every config in the state a
    server reaches on its own once it frees any large block.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(1 << 20)
    if block:
        libc.free(block)


def _timed(workload: str, config: str, quick: bool, warmup: bool, ctx: RunContext) -> dict[str, Any]:
    w = WORKLOADS[workload]
    params = w.params(quick)
    with CONFIGS[config].session(ctx) as session:
        with asyncio.Runner(loop_factory=session.loop_factory) as runner:
            runner.get_loop()
            _settle_malloc()
            if warmup:
                # One small run first, under the same config and on the same loop, so the
                # timed run sees a steady state (caches, specialised bytecode, the
                # tracker's tables grown; glibc's large blocks: _settle_malloc).
                t0 = time.perf_counter()
                runner.run(w.main(**w.params(True)))
                session.extras["warmup_s"] = time.perf_counter() - t0
            gc.collect()
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            value = runner.run(w.main(**params))
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            session.after_workload()
    return {
        "wall_s": wall,
        # CPU time of the whole process (every thread) over the same span: user and kernel
        # apart, since a loopback server spends much of its time in the kernel, where a
        # profiler's hooks add nothing.
        "cpu_user_s": r1.ru_utime - r0.ru_utime,
        "cpu_sys_s": r1.ru_stime - r0.ru_stime,
        "value": value,
        "expected": w.expected(**params),
        "params": params,
        "extras": session.extras,
    }


def _memory(workload: str, config: str, quick: bool, ctx: RunContext) -> dict[str, Any]:
    w = MEMORY_WORKLOADS[workload]
    params = w.params(quick)
    with CONFIGS[config].session(ctx) as session:
        with asyncio.Runner(loop_factory=session.loop_factory) as runner:
            gc.collect()
            readings = runner.run(w.main(probe=session.probe, **params))
    return {"memory": readings, "params": params, "extras": session.extras}


def child_main(workload: str, config: str, quick: bool, first_repeat: bool, warmup: bool = True) -> int:
    """Run one measurement and print its result line.  Exceptions propagate (the parent
    shows the traceback and the command that reproduces it)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="memscope-bench-"))
    try:
        ctx = RunContext(tmpdir=tmpdir, first_repeat=first_repeat)
        if workload in MEMORY_WORKLOADS:
            doc = _memory(workload, config, quick, ctx)
        else:
            doc = _timed(workload, config, quick, warmup, ctx)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    _emit(doc)
    return 0


def _probe_module(name: str) -> dict[str, Any]:
    try:
        if name == "memscope_async":
            mod = import_memscope()
            missing = [a for a in ("Profiler", "loop_factory") if not hasattr(mod, a)]
            if missing:
                return {"ok": False, "error": f"memscope_async at {mod.__file__} has no {', '.join(missing)} yet"}
        else:
            mod = __import__(name)
    except Exception as exc:  # any import failure means "skip with a note"
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as _v

            version = _v(name.replace("_", "-"))
        except Exception:
            version = "?"
    return {"ok": True, "version": str(version), "file": getattr(mod, "__file__", None)}


def probe_main() -> int:
    """Report which optional tools this interpreter can import, as the children will."""
    import platform

    _emit(
        {
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "executable": sys.executable,
            "modules": {m: _probe_module(m) for m in ("memscope_async", "memray", "uvloop")},
        }
    )
    return 0
