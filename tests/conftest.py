"""Shared fixtures.  Every test must leave the process as it found it: no allocator hook,
no profiler, no wrapped policy, no patched threading (pyinstrument's conftest habit)."""

from __future__ import annotations

import asyncio
import queue
import threading
import warnings

import pytest

from memscope_async.attribution import _core

MiB = 1024 * 1024
KiB = 1024

try:
    import uvloop  # noqa: F401

    LOOPS = ["asyncio", "uvloop"]
except ImportError:  # pragma: no cover - uvloop is in the test extra
    LOOPS = ["asyncio"]


def _policy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return asyncio.get_event_loop_policy()


@pytest.fixture(autouse=True)
def _leaves_nothing_behind():
    start_policy = type(_policy())
    start = threading.Thread.start
    queue_get = queue.Queue.get
    runner_init = asyncio.runners.Runner.__init__
    set_policy = asyncio.set_event_loop_policy
    yield
    leaked = []
    if asyncio.runners.Runner.__init__ is not runner_init or asyncio.set_event_loop_policy is not set_policy:
        leaked.append("asyncio.Runner.__init__ or set_event_loop_policy still patched")
    if _core.is_active():
        leaked.append("allocator hooks still installed")
        _core.stop()
    if threading.Thread.start is not start:
        leaked.append("threading.Thread.start still patched")
    if queue.Queue.get is not queue_get:
        leaked.append("queue.Queue.get still patched")
    from memscope_async.loop_hooks import instrument, policy

    if type(_policy()) is not start_policy or policy._patches:
        leaked.append(f"event-loop policy left as {type(_policy()).__name__}, patched: {sorted(f'{c.__qualname__}.{n}' for c, n in policy._patches)}")
        import memscope_async as ms

        ms.uninstall_policy()

    if instrument._patches:
        leaked.append(f"loop methods still patched: {sorted(f'{c.__qualname__}.{n}' for c, n in instrument._patches)}")
    if leaked:
        pytest.fail("test left state behind: " + "; ".join(leaked))


@pytest.fixture(params=LOOPS)
def loop_kind(request):
    """Run the test on the stdlib loop and on uvloop."""
    return request.param


def base_loop(kind: str):
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_profiled(main_fn, kind: str = "asyncio", **options):
    """Run ``main_fn()`` under a fresh profiler on the given loop kind; return
    (result, report)."""
    import memscope_async as ms

    prof = ms.Profiler(**options).start()
    try:
        with asyncio.Runner(loop_factory=prof.loop_factory(base_loop(kind))) as runner:
            result = runner.run(main_fn())
    finally:
        prof.stop()
    report = prof.snapshot()
    prof.close()
    return result, report


def close_to(actual: int, expected: int, rel: float = 0.01, abs_: int = 64 * KiB) -> bool:
    """Within 1% or 64 KiB of the truth, whichever is larger (the issue's tolerance)."""
    return abs(actual - expected) <= max(abs(expected) * rel, abs_)
