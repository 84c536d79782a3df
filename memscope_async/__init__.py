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
