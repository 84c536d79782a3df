"""Hand-over of a task's work to another thread (the *propagated* route).

``Handed(tid, fn)`` (a C callable) runs ``fn`` with the calling thread marked as doing task
``tid``'s work: allocations with no tag in their context are charged to that task, and
tagged ones (``asyncio.to_thread`` copies the context) are recorded as propagated rather
than inherited.  The mark is thread-local, lives only for the call, and changes nothing
the function can observe.
"""

from __future__ import annotations

from typing import Any, Callable

from . import _core

__all__ = ["Handed", "run_handed", "current"]



Handed = _core.Handed


def run_handed(tid: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` now, marked as task ``tid``'s work."""
    return Handed(tid, fn)(*args, **kwargs)


def current() -> int:
    """The task id handed over to the calling thread right now, 0 if none."""
    return _core.handover()
