"""The tag ContextVar and user labels.

Every instrumented task runs in a context whose :data:`TAG` holds the task's ``Tag`` (a
tiny C object carrying the task id).  The allocator hooks read it with
``PyContextVar_Get``; because each task step runs inside the task's context and
``asyncio.to_thread`` copies the context, the tag follows the task's work wherever the
context goes.  ``_LABELS`` holds the user's labels the same way, so a task created
inside ``with labels(...)`` inherits them.  :func:`labels` is the only way to set them: it
tells the C core first, and until then task creation does not read ``_LABELS`` (a read of
a ContextVar that was never set misses its cache: ~250 instructions a task).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from types import MappingProxyType
from typing import Iterator, Mapping

from ..attribution import _core

__all__ = ["TAG", "labels", "current_labels", "set_label_listener"]

TAG: contextvars.ContextVar = contextvars.ContextVar("memscope_async.tag")
_LABELS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "memscope_async.labels", default=MappingProxyType({})
)
# The C task factory reads _LABELS from each new task's context and makes asyncio Tasks.
# On 3.12, asyncio.create_task and TaskGroup.create_task name a task after the loop made
# it (from their argument `name`); gather's children, made through ensure_future, are not
# named.  For a task that ends inside create_task, the core reads what its maker's frame
# is about to do instead of watching the task for a name.
_core.configure(_LABELS, asyncio.Task, (
    (asyncio.tasks.create_task, "name"),
    (asyncio.TaskGroup.create_task, "name"),
    (asyncio.tasks.ensure_future, "through"),
    (asyncio.tasks.gather, "never"),
))

# Called as listener(tag, labels) when labels change inside a tagged context, so the
# running task's record picks them up.  Installed by the profiler, None otherwise.
_listener = None


def set_label_listener(fn) -> None:
    """Install (or remove, with None) the callback told about label changes."""
    global _listener
    _listener = fn


def current_labels() -> Mapping[str, str]:
    """The labels in effect in the current context (read-only)."""
    return _LABELS.get()


def merged_labels(base: Mapping[str, str] | None, kv: Mapping[str, object]) -> Mapping[str, str]:
    """base with kv added (values as str), read-only, and no task's memory (see
    _core.own_labels); call it through _core.unrecorded."""
    merged = dict(base or {})
    merged.update((str(k), str(v)) for k, v in kv.items())
    return _core.own_labels(merged)


@contextlib.contextmanager
def labels(**kv: object) -> Iterator[Mapping[str, str]]:
    """Attach labels to the current task and to every task created inside the block.

    Values are converted with ``str``.  Labels nest: an inner block adds to (and may
    override) the outer one, and the previous labels come back when the block exits.
    A task keeps every label it was given, so its report shows them after the block.
    """
    _core.labels_in_use()  # task creation reads _LABELS from now on
    # Task records keep the mapping (a task's report shows its labels after the block):
    # it is our bookkeeping, not the task's memory, so its allocations are not recorded
    # (else every labelled task that finished "retained" ~500 bytes: a leak suspect).
    frozen = _core.unrecorded(merged_labels, _LABELS.get(), kv)
    token = _LABELS.set(frozen)
    listener = _listener
    if listener is not None:
        tag = TAG.get(None)
        if tag is not None:
            listener(tag, frozen)
    try:
        yield frozen
    finally:
        _LABELS.reset(token)
