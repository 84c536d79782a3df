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

from importlib import import_module as _import_module  # noqa: E402
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
# The package's library modules, also reached as attributes (memscope_async.api) before
# any export is.  Not the command line, the demo or the pytest plugin (which needs pytest,
# not a dependency): help(), inspect.getmembers() and tab completion touch every name dir()
# gives, and must neither fail nor import those into the program.
_SUBMODULES = frozenset({"api", "attribution", "exporters", "loop_hooks", "profiler", "sizes"})
_NOT_API = frozenset({"annotations", "TYPE_CHECKING", "Any"})  # module globals dir() leaves out

# Spelt out for type checkers, which do not run the code (mypy --strict and pyright treat
# a name as exported only when __all__ lists it literally or it is imported "as" itself).
__all__ = [
    "ExportError",
    "LoopFactory",
    "Profiler",
    "ProfilerError",
    "Report",
    "ReportError",
    "TaskReport",
    "current_labels",
    "current_profiler",
    "install_policy",
    "instrument",
    "labels",
    "loop_factory",
    "profile",
    "run",
    "uninstall_policy",
]

if TYPE_CHECKING:
    from .api import LoopFactory as LoopFactory
    from .api import install_policy as install_policy
    from .api import instrument as instrument
    from .api import loop_factory as loop_factory
    from .api import profile as profile
    from .api import run as run
    from .api import uninstall_policy as uninstall_policy
    from .attribution.report import Report as Report
    from .attribution.report import ReportError as ReportError
    from .attribution.report import TaskReport as TaskReport
    from .exporters.json_report import ExportError as ExportError
    from .loop_hooks.tagging import current_labels as current_labels
    from .loop_hooks.tagging import labels as labels
    from .profiler import Profiler as Profiler
    from .profiler import ProfilerError as ProfilerError
    from .profiler import current_profiler as current_profiler


def _load_all() -> None:
    """Import everything the package exports (done by the first use of any of them)."""
    g = globals()
    for name, module in _EXPORTS.items():
        if name not in g:
            g[name] = getattr(_import_module(module, __name__), name)


# Under "not TYPE_CHECKING": a module __getattr__ would tell type checkers that any name
# exists here, and a misspelt export would pass unnoticed.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        if name in _EXPORTS:
            _load_all()
            return globals()[name]
        if name in _SUBMODULES:
            return _import_module("." + name, __name__)  # binds it here too
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*(n for n in globals() if not n.startswith("_")), *_EXPORTS, *_SUBMODULES} - _NOT_API)
