"""One profiler per process, and what the entry points do when one is already running."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

import memscope_async as ms


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
