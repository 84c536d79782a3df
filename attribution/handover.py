"""Hand-over of a task's work to another thread (the *propagated* route).

``run_handed(tid, fn, *args)`` runs ``fn`` with the calling thread marked as doing task
``tid``'s work: allocations with no tag in their context are charged to that task, and
tagged ones (``asyncio.to_thread`` copies the context) are recorded as propagated rather
than inherited.  The mark is thread-local, lives only for the call, and changes nothing
the function can observe.
"""

from __future__ import annotations

from typing import Any, Callable

from . import _core

__all__ = ["run_handed", "current"]

_set_handover = _core.set_handover


def run_handed(tid: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    prev = _set_handover(tid)
    try:
        return fn(*args, **kwargs)
    finally:
        _set_handover(prev)


def current() -> int:
    """The task id handed over to the calling thread right now, 0 if none."""
    return _core.handover()
