"""The profiler and tracemalloc in one process, started and stopped in any order.

Both hook CPython's allocators by wrapping what is installed.  Each program runs in its
own interpreter: a mistake here is a crash or a hang, not a failed assertion."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

MiB = 1 << 20

PRELUDE = """
import asyncio, sys, tracemalloc, warnings
import memscope_async as ms

MODE = sys.argv[1]
OTHER = "sampled" if MODE == "exact" else "exact"

async def five():
    global kept
    kept = bytearray(5 << 20)

def session(mode=MODE):
    prof = ms.install_policy(mode=mode)
    try:
        asyncio.run(five())
    finally:
        ms.uninstall_policy()
    return prof.snapshot().find(coro="five")[0].allocated_bytes

def traced_growth():
    before = tracemalloc.get_traced_memory()[0]
    junk = [bytearray(1000) for _ in range(2000)]
    return tracemalloc.get_traced_memory()[0] - before
"""


def run(body: str, mode: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", PRELUDE + textwrap.dedent(body), mode],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def five_mib(value: str) -> bool:
    return abs(int(value) - 5 * MiB) <= 4096


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_tracemalloc_started_while_profiling_keeps_working_after_the_profiler_stops(mode: str) -> None:
    out = run("""
        prof = ms.install_policy(mode=MODE)
        tracemalloc.start()
        asyncio.run(five())
        ms.uninstall_policy()
        print(prof.snapshot().find(coro="five")[0].allocated_bytes)
        prof.close()
        print(traced_growth())          # tracemalloc still sees every allocation
        tracemalloc.stop()
        junk = [bytearray(100) for _ in range(10000)]
        print(session())                # the profiler's hooks are on top again: a fresh start
        print(session(OTHER))           # in the other mode too
    """, mode)
    assert five_mib(out[0]), out
    assert int(out[1]) >= 2000 * 1000, out
    assert five_mib(out[2]) and five_mib(out[3]), out


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_a_session_under_a_tracemalloc_still_running_records_and_the_other_mode_is_refused(mode: str) -> None:
    out = run("""
        prof = ms.install_policy(mode=MODE)
        tracemalloc.start()
        asyncio.run(five())
        ms.uninstall_policy()
        print(session())                # our hooks, still under tracemalloc's, record again
        print(traced_growth())
        try:
            session(OTHER)
        except ms.ProfilerError as e:
            print("refused:", e)
        tracemalloc.stop()
        print(session(OTHER))
    """, mode)
    assert five_mib(out[0]), out
    assert int(out[1]) >= 2000 * 1000, out
    text = " ".join(out)
    assert "refused: another allocator hook (tracemalloc?)" in text and "tracemalloc.stop()" in text, out
    assert five_mib(out[-1]), out


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_tracemalloc_stopped_while_profiling_is_reported_and_both_start_again(mode: str) -> None:
    out = run("""
        tracemalloc.start()
        prof = ms.install_policy(mode=MODE)
        tracemalloc.stop()              # puts back the allocator it found, taking ours out
        asyncio.run(five())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ms.uninstall_policy()
        print(len(caught), caught[0].filename == "<string>" if caught else "-")
        print("taken" in str(caught[0].message) if caught else "-")
        tracemalloc.start()
        print(traced_growth())
        print(session())
        print(traced_growth())
        tracemalloc.stop()
        print(session(OTHER))
    """, mode)
    assert out[:3] == ["1", "True", "True"], out  # one warning, at the program's line
    assert int(out[3]) >= 2000 * 1000 and int(out[5]) >= 2000 * 1000, out
    assert five_mib(out[4]) and five_mib(out[6]), out


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_a_profiler_started_under_tracemalloc_restores_it(mode: str) -> None:
    out = run("""
        tracemalloc.start()
        print(session())
        print(traced_growth())
        tracemalloc.stop()
        print(session())
    """, mode)
    assert five_mib(out[0]) and five_mib(out[2]), out
    assert int(out[1]) >= 2000 * 1000, out


@pytest.mark.skipif(sys.version_info < (3, 12), reason="pymalloc's raw-block count is found on 3.12+")
def test_our_objects_go_to_the_raw_allocator_only_where_pymalloc_is_under_the_hooks() -> None:
    """Tag mappings come from the raw allocator only when pymalloc itself is the object
    allocator under our hooks: from the first session on, and not under tracemalloc
    (whose traces they would bypass).  It was decided from the allocator of the session
    before (none in the first)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import contextvars, tracemalloc
        from memscope_async.attribution import _core
        v = contextvars.ContextVar("t")
        for _ in range(2):
            _core.start(v, 0, 1.0, 0.0, 8, 0.0, 1)
            print(_core.stats()["own_objects_raw"])
            _core.stop(); _core.clear()
        tracemalloc.start()
        _core.start(v, 0, 1.0, 0.0, 8, 0.0, 1)
        print(_core.stats()["own_objects_raw"])
        _core.stop(); _core.clear()
    """)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1", "0"], proc.stdout
