"""The pytest plugin, driven through pytester: each test runs a small inner test session."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]

# Shared by the inner test modules: a task that keeps 5 MiB alive after it ends, and a
# check that nothing of the profiler is left installed.
HELPERS = """
import asyncio

from memscope_async.attribution import _core
from memscope_async.loop_hooks.instrument import is_instrumented
from memscope_async.loop_hooks.policy import InstrumentedPolicy

KEEP = []


async def hog(mib=5):
    KEEP.append(bytearray(mib * 1024 * 1024))


def assert_nothing_installed(loop=None):
    assert not _core.is_active(), "allocator hooks are installed"
    assert not isinstance(asyncio.get_event_loop_policy(), InstrumentedPolicy), "policy is installed"
    if loop is not None:
        assert not is_instrumented(loop), "the loop is instrumented"
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\naddopts = -p no:cacheprovider\n")
    pytester.makepyfile(helpers=HELPERS)
    return pytester


def test_marker_is_registered_with_its_signature(inner: pytest.Pytester) -> None:
    result = inner.runpytest("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.memscope(max_live_bytes=None, max_allocated_bytes=None, per_task=True, **options):*"])


def test_live_limit_per_task_fails_the_test_with_a_table(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import asyncio
        import pytest
        from helpers import hog

        @pytest.mark.memscope(max_live_bytes="1 MiB")
        def test_leaks():
            async def main():
                await asyncio.create_task(hog(), name="session_cache")
            asyncio.run(main())
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "memscope: limited to 1.0 MiB live per task, task 'session_cache' (id *) holds 5.0 MiB",
        "*id*task*state*allocated*live*peak",
        "*session_cache*done*5.0 MiB*5.0 MiB*",
    ])


def test_limit_in_an_async_test_run_by_pytest_asyncio(inner: pytest.Pytester) -> None:
    # pytest-asyncio makes its loop under its own copy of the event-loop policy: the plugin
    # must still see the test's tasks.
    inner.makepyfile(
        """
        import asyncio
        import pytest
        from helpers import hog

        @pytest.mark.asyncio
        @pytest.mark.memscope(max_allocated_bytes=1_000_000)
        async def test_allocates():
            await asyncio.create_task(hog(2))
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["memscope: limited to 976.6 KiB allocated per task, task 'hog' (id *) allocated 2.0 MiB"])


def test_within_limits_passes(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import asyncio
        import pytest
        from helpers import hog

        @pytest.mark.memscope(max_live_bytes="8MiB", max_allocated_bytes=8 * 1024 * 1024)
        def test_sync():
            async def main():
                await asyncio.create_task(hog())
            asyncio.run(main())

        @pytest.mark.asyncio
        @pytest.mark.memscope(max_live_bytes="8MiB")
        async def test_async():
            await asyncio.create_task(hog())
        """
    )
    inner.runpytest().assert_outcomes(passed=2)


def test_total_limit(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import pytest

        @pytest.mark.memscope(max_allocated_bytes="1 MiB", per_task=False)
        def test_over():
            data = bytearray(3 * 1024 * 1024)

        @pytest.mark.memscope(max_allocated_bytes="8 MiB", per_task=False)
        def test_under():
            data = bytearray(3 * 1024 * 1024)
        """
    )
    # A total counts every thread of the process: in a process of its own, so that a
    # thread left over from an earlier test (one that ends late on a loaded machine)
    # cannot add to it (a CI-like run under load once saw 4.0 MiB here).
    result = inner.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["memscope: limited to 1.0 MiB allocated in total, the test allocated 3.* MiB"])


def test_an_exceeded_limit_fails_the_call_so_xfail_applies(inner: pytest.Pytester) -> None:
    """The limit fails the test's call as an assertion in it would: a test marked xfail
    for a known leak is XFAIL, and strict xfail is not an XPASS failure (the report used
    to be changed after pytest had decided)."""
    inner.makepyfile(
        """
        import pytest

        @pytest.mark.xfail(reason="known leak")
        @pytest.mark.memscope(max_allocated_bytes="1 MiB", per_task=False)
        def test_known():
            data = bytearray(3 * 1024 * 1024)

        @pytest.mark.xfail(reason="known leak", strict=True)
        @pytest.mark.memscope(max_allocated_bytes="1 MiB", per_task=False)
        def test_known_strict():
            data = bytearray(3 * 1024 * 1024)

        @pytest.mark.memscope(max_allocated_bytes="1 MiB", per_task=False)
        def test_over():
            data = bytearray(3 * 1024 * 1024)
        """
    )
    result = inner.runpytest_subprocess("-rxf")
    result.assert_outcomes(failed=1, xfailed=2)
    result.stdout.fnmatch_lines(["*memscope: limited to 1.0 MiB allocated in total, the test allocated 3.* MiB*"])


def test_fixture_profiles_and_cleans_up(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import asyncio
        import pytest
        from helpers import assert_nothing_installed, hog

        def test_snapshot_inside_a_sync_test(memscope):
            async def main():
                await asyncio.create_task(hog(), name="hog")
            asyncio.run(main())
            (task,) = memscope.snapshot().find(name="hog")
            assert task.live_bytes >= 5 * 1024 * 1024

        @pytest.mark.asyncio
        async def test_snapshot_inside_an_async_test(memscope):
            await asyncio.create_task(hog(), name="hog")
            (task,) = memscope.snapshot().find(name="hog")
            assert task.live_bytes >= 5 * 1024 * 1024

        def test_after_profiled_tests_nothing_is_left():
            assert_nothing_installed()
        """
    )
    inner.runpytest("-p", "no:randomly").assert_outcomes(passed=3)


def test_unprofiled_tests_get_nothing(inner: pytest.Pytester) -> None:
    # In a fresh process, so "no profiler was ever made" can be checked too.
    inner.makepyfile(
        """
        import asyncio
        import pytest
        import memscope_async as ms
        from helpers import assert_nothing_installed

        def test_sync():
            assert ms.current_profiler() is None
            assert_nothing_installed()
            async def main():
                assert_nothing_installed(asyncio.get_running_loop())
            asyncio.run(main())

        @pytest.mark.asyncio
        async def test_async():
            assert ms.current_profiler() is None
            assert_nothing_installed(asyncio.get_running_loop())
        """
    )
    inner.runpytest_subprocess().assert_outcomes(passed=2)


def test_a_second_profiler_is_a_clear_setup_error(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import pytest
        import memscope_async as ms

        @pytest.fixture
        def other_profiler():
            with ms.Profiler() as profiler:
                yield profiler

        def test_both(other_profiler, memscope):
            pass
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*memscope: cannot profile this test: *already running*"])


def test_what_a_fixture_set_up_is_not_the_tests_whatever_the_order(inner: pytest.Pytester) -> None:
    """An async fixture set up after the profiler started runs in a task of its own: its
    data is the test's input, not what the test's tasks hold, in either order."""
    inner.makepyfile(
        """
        import asyncio
        import pytest
        import pytest_asyncio

        @pytest_asyncio.fixture
        async def dataset():
            await asyncio.sleep(0)
            return bytearray(5 * 1024 * 1024)

        @pytest.mark.asyncio
        @pytest.mark.memscope(max_live_bytes="1 MiB")
        async def test_dataset_first(dataset, memscope):
            await asyncio.sleep(0)

        @pytest.mark.asyncio
        @pytest.mark.memscope(max_live_bytes="1 MiB")
        async def test_memscope_first(memscope, dataset):
            await asyncio.sleep(0)

        @pytest.mark.asyncio
        @pytest.mark.memscope(max_live_bytes="1 MiB")
        async def test_the_body_still_counts(memscope, dataset):
            kept.append(await asyncio.create_task(make()))

        kept = []

        async def make():
            return bytearray(3 * 1024 * 1024)
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_the_body_still_counts*", "memscope: limited to 1.0 MiB live per task, task 'make' *"])


def test_a_test_that_closes_its_profiler_fails_with_one_line(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import pytest

        @pytest.mark.memscope(max_live_bytes="1 MiB")
        def test_closes(memscope):
            memscope.close()
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["memscope: cannot check this test's limits: this profiler holds no data*"])
    assert "Traceback" not in result.stdout.str()


def test_sampled_limits_say_they_are_estimates(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import asyncio
        import pytest
        from helpers import hog

        @pytest.mark.memscope(max_live_bytes="1 MiB", mode="sampled", sample_interval="64 KiB")
        def test_leaks():
            async def main():
                await asyncio.create_task(hog(), name="cache")
            asyncio.run(main())
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["memscope: limited to 1.0 MiB live per task, task 'cache' (id *) holds * "
                                 "(estimated: sampled mode)"])


def test_malformed_marker_is_a_clear_setup_error(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import pytest

        @pytest.mark.memscope(max_live="1 MiB")
        def test_typo():
            pass

        @pytest.mark.memscope(max_live_bytes="lots")
        def test_bad_size():
            pass

        @pytest.mark.memscope(mode="fast")
        def test_bad_option(memscope):
            pass
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["*memscope marker: unknown argument(s) max_live*",
                                 "*memscope marker: max_live_bytes: invalid size 'lots'*",
                                 "*memscope marker: mode must be one of exact, sampled, not 'fast'*"])


def test_marker_takes_the_profilers_options(inner: pytest.Pytester) -> None:
    """mode="sampled" and sample_interval (a size string too) reach the profiler, as with
    every other entry point; a bad option value is a one-line setup error."""
    inner.makepyfile(
        """
        import asyncio
        import pytest
        from helpers import hog

        @pytest.mark.memscope(mode="sampled", sample_interval="64 KiB", stack_depth=8)
        def test_sampled(memscope):
            async def main():
                await asyncio.create_task(hog(4), name="hog")
            asyncio.run(main())
            report = memscope.snapshot()
            assert report.run.mode == "sampled" and report.run.sample_interval == 65536
            assert report.run.estimated and report.run.stack_depth == 8
            (t,) = report.find(name="hog")
            assert abs(t.live_bytes - 4 * 1024 * 1024) < 1024 * 1024, t.live_bytes

        @pytest.mark.memscope(mode="sampled", sample_interval=4096, max_live_bytes="1 MiB")
        def test_sampled_limit():
            async def main():
                await asyncio.create_task(hog(), name="session_cache")
            asyncio.run(main())

        @pytest.mark.memscope(stack_interval="0", max_live_bytes="0 KiB")
        def test_zero_sizes_as_strings(memscope):
            assert memscope._settings()["stack_interval"] == 0

        @pytest.mark.memscope(mode="fast")
        def test_bad_mode():
            pass
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(passed=2, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*memscope*mode must be one of exact, sampled, not 'fast'*",
                                 "*memscope: limited to 1.0 MiB live per task, task 'session_cache'*"])
    assert "Traceback" not in result.stdout.str()


def test_pytest_leaves_the_package_unrewritten():
    """Under ``memscope-async run -m pytest`` the package is imported before pytest, which
    then warns (an error under ``filterwarnings = error``) that it cannot rewrite a plugin
    module, unless the module's docstring opts out."""
    from _pytest.assertion.rewrite import AssertionRewriter

    import memscope_async

    assert AssertionRewriter.is_rewrite_disabled(memscope_async.__doc__)


INNER_MODULES = '''
import sys

def test_what_is_loaded():
    ours = sorted(m for m in sys.modules if m == "orjson" or m.startswith("memscope_async"))
    print("LOADED", ours)
'''


def _loaded(lines: list[str]) -> list[list[str]]:
    """What each inner test printed: the modules of ours (and orjson) loaded."""
    return [eval(ln.split("LOADED ", 1)[1]) for ln in lines if "LOADED [" in ln]  # noqa: S307 - our literal


def test_pytesters_inner_runs_load_nothing_heavy_when_the_plugin_is_disabled_outside(pytester):
    """With ``-p no:memscope_async``, pytester's in-process inner sessions still load the
    plugin (they do not inherit ``-p no:``), and drop afterwards what they first imported.
    orjson 3.13.0 crashes when imported again after such a drop, so loading the plugin must
    not import it (it imported the whole package and orjson: suites crashed, rc 139)."""
    pytester.makepyfile(
        test_outer=f'''
        pytest_plugins = ["pytester"]

        def test_inner_runs(pytester):
            pytester.makepyfile(test_inner={INNER_MODULES!r})
            for _ in range(2):  # (pytester writes what each run printed to the outer stdout)
                pytester.runpytest("-s", "-p", "no:cacheprovider").assert_outcomes(passed=1)
        '''
    )
    result = pytester.runpytest_subprocess("-s", "-p", "no:memscope_async", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    runs = _loaded(result.outlines)
    assert len(runs) == 2
    for loaded in runs:
        assert "memscope_async.pytest_plugin" in loaded  # (the inner session did load the plugin)
        assert "orjson" not in loaded and "memscope_async.api" not in loaded, loaded


def test_the_outermost_session_loads_everything_before_any_test(pytester):
    """...so that pytester's inner sessions, which use the fixture, import nothing that
    they would drop (the plugin enabled everywhere: our own suite's case)."""
    pytester.makepyfile(test_inner=INNER_MODULES)
    done = subprocess.run([sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", "test_inner.py"],
                          cwd=pytester.path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (loaded,) = _loaded(done.stdout.splitlines())
    assert {"orjson", "memscope_async.api", "memscope_async.profiler"} <= set(loaded), loaded
