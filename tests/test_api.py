"""One profiler per process, and what the entry points do when one is already running."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

import memscope_async as ms
from conftest import MiB, base_loop, close_to


def test_a_second_concurrent_start_is_refused_clearly():
    first = ms.Profiler().start()
    try:
        with pytest.raises(ms.ProfilerError, match="already running"):
            ms.Profiler().start()
        assert first.active
    finally:
        first.stop()
    second = ms.Profiler().start()  # once the first has stopped, another may start
    second.stop()


def test_run_refused_leaves_no_unawaited_coroutine():
    async def main():
        return 1

    first = ms.Profiler().start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ms.ProfilerError, match="already running"):
                ms.run(main())
            gc.collect()
    finally:
        first.stop()
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]


def test_run_inside_a_running_loop_is_refused_as_asyncio_run_refuses():
    """As asyncio.run: a RuntimeError before anything starts, no profiler left running,
    and no warning (the inner loop's shutdown_asyncgens was left unawaited before)."""

    async def inner():
        return 1

    async def outer():
        with pytest.raises(RuntimeError, match=r"cannot be called from a running event loop"):
            ms.run(inner())
        assert ms.current_profiler() is None or not ms.current_profiler().active
        return "ok"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert asyncio.run(outer()) == "ok"
        gc.collect()
    assert not caught, [str(w.message) for w in caught]


def test_instrument_uses_the_running_profiler_and_refuses_other_options():
    seen = {}

    async def main():
        seen["same"] = ms.instrument() is ms.current_profiler()
        seen["same mode"] = ms.instrument(mode="exact") is ms.current_profiler()
        with pytest.raises(ms.ProfilerError, match="cannot change mode"):
            ms.instrument(mode="sampled")

    ms.run(main())
    assert seen == {"same": True, "same mode": True}


def test_a_sample_interval_alone_means_sampled_mode():
    # As on the command line (--sample-interval implies --mode sampled): a sample interval
    # given without a mode is not dropped in exact mode.
    async def main():
        await asyncio.sleep(0)

    assert ms.Profiler(sample_interval=65536).mode == "sampled"
    assert ms.Profiler().mode == "exact"
    assert ms.Profiler(mode="exact", sample_interval=65536).mode == "exact"
    ms.run(main(), sample_interval=65536)
    run = ms.current_profiler().snapshot().run
    assert (run.mode, run.sample_interval) == ("sampled", 65536)

    seen = {}

    async def inner():
        with pytest.raises(ms.ProfilerError, match="cannot change mode"):
            ms.instrument(sample_interval=65536)
        seen["ok"] = True

    ms.run(inner())  # an exact profiler is running inside: a sampled one cannot be had
    assert seen == {"ok": True}


@pytest.mark.parametrize(
    "options",
    [dict(sample_interval=0), dict(sample_interval=True), dict(sample_interval=1.5), dict(sample_interval=2**64),
     dict(stack_interval=-1), dict(stack_interval=False), dict(stack_interval=2**60), dict(stack_depth=True),
     dict(stack_depth=300), dict(max_finished_tasks=True), dict(max_finished_tasks=-1), dict(max_finished_tasks=2**63), dict(mode="fast"),
     dict(inferred_half_life=0), dict(inferred_half_life=-1.0), dict(inferred_half_life=float("nan")),
     dict(inferred_half_life=True), dict(inferred_half_life="x"), dict(inferred_half_life=None),
     dict(inferred_half_life=10**400), dict(inferred_half_life=1e-12), dict(seed=1.5), dict(threads="no"),
     dict(threads=None)],
)
def test_bad_options_are_refused_with_one_line(options):
    """Refused where given, in one line that names the option: a bool is not a size,
    and an interval past 1 PiB would overflow the sampler's 64-bit countdown (and
    2**64 could not be written in the report)."""
    with pytest.raises(ms.ProfilerError) as info:
        ms.Profiler(**options)
    (name,) = options
    assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ms.ProfilerError):
        ms.loop_factory(**options)


# -- @ms.profile ------------------------------------------------------------------------
KEPT_BY_CALLS: list = []


def test_profile_decorator_reports_each_call_and_keeps_results(tmp_path, loop_kind):
    """A decorated coroutine's call runs profiled: its result and exceptions are its own,
    its bytes are in wrapper.last_report and in the report file."""
    path = tmp_path / "call.json"

    @ms.profile(report=path)
    async def handler(n: int) -> int:
        KEPT_BY_CALLS.append(bytearray(n))
        if n == 0:
            raise ValueError("no bytes")
        await asyncio.sleep(0)
        return n

    async def main():
        return await handler(5 * MiB)

    KEPT_BY_CALLS.clear()
    try:
        with asyncio.Runner(loop_factory=base_loop(loop_kind)) as runner:
            assert runner.run(main()) == 5 * MiB
            (t,) = handler.last_report.find(coro="test_profile_decorator_reports_each_call_and_keeps_results.<locals>.main")
            assert close_to(t.live_bytes, 5 * MiB) and close_to(t.allocated_bytes, 5 * MiB), t
            assert t.name is not None  # (reported after stopping, while it still ran)
            assert ms.Report.load(path).task(t.id).live_bytes == t.live_bytes
            with pytest.raises(ValueError, match="no bytes"):
                runner.run(handler(0))
    finally:
        KEPT_BY_CALLS.clear()


def test_profile_decorator_concurrent_calls_share_one_profiler(loop_kind):
    """Calls made while one is profiled join its profiler; it stops when the last one
    ends, and its report holds them all (before, only the first call was profiled, and
    its profiler stopped while the others still ran)."""

    @ms.profile
    async def call(i: int) -> int:
        await asyncio.sleep(0.02 if i else 0)  # the first ends before the others allocate
        KEPT_BY_CALLS.append(bytearray(MiB))
        await asyncio.sleep(0)
        return i

    async def main():
        return await asyncio.gather(*(call(i) for i in range(4)))

    KEPT_BY_CALLS.clear()
    try:
        with asyncio.Runner(loop_factory=base_loop(loop_kind)) as runner:
            assert runner.run(main()) == [0, 1, 2, 3]
        calls = call.last_report.find(coro="test_profile_decorator_concurrent_calls_share_one_profiler.<locals>.call")
        assert len(calls) == 4, call.last_report.tasks
        for t in calls:
            assert close_to(t.live_bytes, MiB), t
        assert ms.current_profiler() is None or not ms.current_profiler().active
    finally:
        KEPT_BY_CALLS.clear()


def test_profile_decorator_checks_its_options_when_decorating():
    with pytest.raises(ms.ProfilerError):
        ms.profile(mode="bogus")
    with pytest.raises(TypeError):
        ms.profile(reprot="x.json")


def test_profile_decorator_under_another_profiler_says_so(tmp_path):
    path = tmp_path / "never.json"

    @ms.profile(report=path)
    async def inner() -> int:
        return 1

    with pytest.warns(RuntimeWarning, match="started elsewhere"):
        assert ms.run(inner()) == 1
    assert not path.exists() and inner.last_report is None


def test_profile_decorator_calls_from_many_threads(tmp_path):
    """Calls on several threads' loops: one ending while another starts must neither run
    the new one unprofiled (taking the closing profiler for another's, with a false
    warning) nor discard the closing one's data (its snapshot then raised out of the
    call)."""
    import sys
    import threading

    path = tmp_path / "calls.json"

    @ms.profile(report=path)
    async def call(i: int) -> int:
        await asyncio.sleep(0)
        return i

    errors: list = []

    def worker() -> None:
        try:
            with asyncio.Runner() as runner:
                for i in range(40):
                    assert runner.run(call(i)) == i
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            threads = [threading.Thread(target=worker) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert [str(w.message) for w in caught if "memscope" in str(w.message)] == []
    assert call.last_report is not None and path.exists()
