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

import importlib
from typing import TYPE_CHECKING, Any

# The names below are imported on first use (PEP 562): loading the package alone, as
# pytest does for every session through the plugin's entry point, imports neither the C
# core nor asyncio.
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


# the package's own modules, also reached as attributes (memscope_async.exporters...)
_SUBMODULES = frozenset({"api", "attribution", "cli", "demo", "exporters", "loop_hooks", "profiler", "pytest_plugin",
                         "sizes"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # (found directly from now on)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
