"""The task registry: one flat record per task, filled as tasks are created and finish.

Records are deliberately flat (ids, strings, numbers, a weak reference): the lineage tree,
groups and hotspots are built from them only when a report is asked for.  The registry
knows nothing about event loops; loop_hooks tells it what happened.
"""

from __future__ import annotations

import contextvars
import threading
import time
import weakref
from typing import Any, Mapping

from . import _core

__all__ = ["TaskRecord", "Registry"]

_EMPTY: Mapping[str, str] = {}
_get_ident = threading.get_ident
_thread_slot = _core.thread_slot
_set_guard = _core.set_guard


class TaskRecord:
    """What we know about one task.  ``finished_ns`` is None while it runs."""

    __slots__ = (
        "id",
        "tag",
        "parent_id",
        "coro",
        "name",
        "ref",
        "thread_id",
        "loop_id",
        "home_slot",
        "created_ns",
        "finished_ns",
        "state",
        "labels",
        "via_factory",
        "cross_thread_parent",
        "obj_id",
        "ctx_id",
        "registry",
    )

    def __init__(self, registry: "Registry", tid: int, parent_id: int | None, labels: Mapping[str, str]):
        self.registry = registry
        self.id = tid
        self.tag = _core.Tag(tid)
        self.parent_id = parent_id
        self.labels = labels
        self.coro = None
        self.name = None
        self.ref = None
        self.thread_id = None
        self.loop_id = None
        self.home_slot = 0
        self.created_ns = time.monotonic_ns()
        self.finished_ns = None
        self.state = "pending"
        self.via_factory = True
        self.cross_thread_parent = False
        self.obj_id = 0
        self.ctx_id = 0

    def attach(self, task: Any, coro: Any = None) -> None:
        """Link the record to its task object (weakly) and watch for its end.  Our
        bookkeeping is not charged to the creating task."""
        prev = _set_guard(True)
        try:
            self._attach(task, coro)
        finally:
            _set_guard(prev)

    def _attach(self, task: Any, coro: Any) -> None:
        self.obj_id = id(task)
        try:
            self.ref = weakref.ref(task)
        except TypeError:  # a user factory returned something without weakref support
            self.ref = None
        if coro is None and not task.done():
            # Never ask a finished task: on CPython 3.12.1 get_coro() of an eagerly
            # completed task returns NULL and crashes the interpreter (python/cpython#122332).
            try:
                coro = task.get_coro()
            except Exception:
                coro = None
        self.coro = _qualname(coro)
        self.registry.by_object[self.obj_id] = self.id
        try:
            task.add_done_callback(self._done, context=self.registry.callback_context())
        except Exception:
            pass

    def _done(self, task: Any) -> None:
        # Runs as an ordinary done callback, in an empty context (charged to nobody).
        self.finished_ns = time.monotonic_ns()
        self.state = task_state(task)
        self.name = _task_name(task)
        self.registry.finished(self)

    def current_name(self) -> str | None:
        task = self.ref() if self.ref is not None else None
        if task is not None:
            return _task_name(task)
        return self.name

    def current_state(self) -> str:
        if self.finished_ns is not None:
            return self.state
        task = self.ref() if self.ref is not None else None
        return task_state(task) if task is not None else self.state


def task_state(task: Any) -> str:
    """pending / done / cancelled / failed, read without touching the exception's
    "retrieved" flag (so asyncio still logs exceptions nobody retrieved)."""
    try:
        state = task._state
    except AttributeError:
        if not task.done():
            return "pending"
        return "cancelled" if task.cancelled() else "done"
    if state == "PENDING":
        return "pending"
    if state == "CANCELLED":
        return "cancelled"
    return "failed" if getattr(task, "_exception", None) is not None else "done"


def _task_name(task: Any) -> str | None:
    try:
        return task.get_name()
    except Exception:
        return None


def _qualname(coro: Any) -> str | None:
    if coro is None:
        return None
    name = getattr(coro, "__qualname__", None)
    if name is None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        name = getattr(code, "co_qualname", None) or type(coro).__qualname__
    return name


class Registry:
    """All task records of one profiler run, by id.  Not thread-safe by itself: it is
    only mutated under the GIL from short, non-blocking calls."""

    def __init__(self) -> None:
        self.records: dict[int, TaskRecord] = {}
        self.by_object: dict[int, int] = {}
        self._next = 1
        self._lock = threading.Lock()
        self._contexts = threading.local()
        self.on_finish = None  # callable(record) or None

    def new_task(self, parent_id: int | None, labels: Mapping[str, str] | None, loop_id: int | None = None) -> TaskRecord:
        """A record for a task being created now, on the calling thread's loop."""
        prev = _set_guard(True)
        try:
            return self._new_task(parent_id, labels, loop_id)
        finally:
            _set_guard(prev)

    def _new_task(self, parent_id: int | None, labels: Mapping[str, str] | None, loop_id: int | None) -> TaskRecord:
        with self._lock:
            tid = self._next
            self._next += 1
        rec = TaskRecord(self, tid, parent_id, labels if labels is not None else _EMPTY)
        ident = _get_ident()
        rec.thread_id = ident
        rec.loop_id = loop_id
        rec.home_slot = _thread_slot()
        if parent_id is not None:
            parent = self.records.get(parent_id)
            if parent is not None and parent.thread_id != ident:
                rec.cross_thread_parent = True
        self.records[tid] = rec
        return rec

    def discard(self, rec: TaskRecord) -> None:
        """Forget a record made for a task that could not be tagged after all."""
        self.records.pop(rec.id, None)

    def get(self, tid: int) -> TaskRecord | None:
        return self.records.get(tid)

    def callback_context(self):
        """An empty context for our own callbacks, one per thread (a context can only be
        entered by one thread at a time)."""
        ctx = getattr(self._contexts, "ctx", None)
        if ctx is None:
            ctx = self._contexts.ctx = contextvars.Context()
        return ctx

    def finished(self, rec: TaskRecord) -> None:
        self.by_object.pop(rec.obj_id, None)
        hook = self.on_finish
        if hook is not None:
            hook(rec)

    def update_labels(self, tag: Any, labels: Mapping[str, str]) -> None:
        rec = self.records.get(tag.id)
        if rec is not None:
            merged = dict(rec.labels)
            merged.update(labels)
            rec.labels = merged
