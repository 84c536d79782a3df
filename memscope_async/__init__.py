"""memscope-async: which asyncio task holds or churns memory, who started it, where in
its code, and how sure we are.

(PYTEST_DONT_REWRITE: pytest's assertion rewriting leaves this package alone; it may be
imported before pytest starts, under ``memscope-async run -m pytest``, where pytest would
warn that it cannot rewrite it, which ``filterwarnings = error`` makes fatal.)

Entry points::

    profiler = memscope_async.install_policy()      # every new loop is instrumented
    memscope_async.run(main(), report="report.json")
    asyncio.run(main(), loop_factory=memscope_async.loop_factory())
    memscope_async.instrument()                      # from inside a running loop
"""

from __future__ import annotations

# First: a sub-interpreter gets an ImportError here, before anything else is loaded there
# (the C core's state is the process's, made for the main interpreter; see README Limits).
from .attribution import _core

_core.main_interpreter_only()

import importlib  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

# The rest is loaded on first use of any of these names (all at once), not at import: the
# pytest plugin's entry point imports this package in every pytest session, including the
# inner sessions pytester runs in-process, which drop what was first imported during them.
# orjson (3.13.0) crashes when it is imported again after such a drop, so a session that
# never profiles must not import it.  The plugin loads everything at configure in the
# outermost session (see pytest_plugin.pytest_configure), before pytester takes its snapshots.
_EXPORTS = {
    "ExportError": ".exporters.json_report",
    "LoopFactory": ".api",
    "Profiler": ".profiler",
    "ProfilerError": ".profiler",
    "Report": ".attribution.report",
    "ReportError": ".attribution.report",
    "TaskReport": ".attribution.report",
    "current_labels": ".loop_hooks.tagging",
    "current_profiler": ".profiler",
    "install_policy": ".api",
    "instrument": ".api",
    "labels": ".loop_hooks.tagging",
    "loop_factory": ".api",
    "profile": ".api",
    "run": ".api",
    "uninstall_policy": ".api",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .api import LoopFactory, install_policy, instrument, loop_factory, profile, run, uninstall_policy
    from .attribution.report import Report, ReportError, TaskReport
    from .exporters.json_report import ExportError
    from .loop_hooks.tagging import current_labels, labels
    from .profiler import Profiler, ProfilerError, current_profiler


def _load_all() -> None:
    """Import everything the package exports (done by the first use of any of them)."""
    g = globals()
    for name, module in _EXPORTS.items():
        if name not in g:
            g[name] = getattr(importlib.import_module(module, __name__), name)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        _load_all()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
