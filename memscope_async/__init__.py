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

# First: a sub-interpreter gets an ImportError here, before anything else is loaded there
# (the C core's state is the process's, made for the main interpreter; see README Limits).
from .attribution import _core

_core.main_interpreter_only()

# Eager on purpose: pytest loads our plugin (and so this package) at every session start,
# before pytester takes its sys.modules snapshots.  Imported lazily, these modules and
# orjson were first imported inside pytester's inner runs, which drop them afterwards, and
# orjson (3.11-3.13) loses a reference to its JSONDecodeError type each time its module is
# executed again: after a few runs the type was freed while still in use and the next full
# collection crashed (seen on 3.13; not our C core).
from .api import LoopFactory, install_policy, instrument, loop_factory, profile, run, uninstall_policy
from .attribution.report import Report, ReportError, TaskReport
from .exporters.json_report import ExportError
from .loop_hooks.tagging import current_labels, labels
from .profiler import Profiler, ProfilerError, current_profiler

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
