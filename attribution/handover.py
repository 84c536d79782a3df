"""Hand-over of a task's work to another thread (the *propagated* route).

An instrumented loop's ``run_in_executor`` and ``call_soon_threadsafe`` (``_core.HandOver``)
wrap the work they send to another thread so that it runs with that thread marked as doing
the sending task's work: allocations with no tag in their context are charged to that
task, and tagged ones (``asyncio.to_thread`` copies the context) are recorded as propagated
rather than inherited.  The mark is thread-local, lives only for the call, and changes
nothing the function can observe.
"""

from __future__ import annotations

from . import _core

__all__ = ["current"]


def current() -> int:
    """The task id handed over to the calling thread right now, 0 if none."""
    return _core.handover()
