"""Instrumenting one event loop: tagging every task, carrying work across threads.

An instrumented loop is the same object with its class swapped for a subclass of its own
class (same ``__name__``, ``__qualname__`` and ``__module__``, so reprs and isinstance checks
do not change) that adds a thin layer:

* **Task factory.** Ours is the one the loop calls; a user's factory (set before or
  after us, through ``set_task_factory``) is called from inside it, and
  ``get_task_factory()`` keeps answering with the user's.  We give each task a context
  whose tag names the new task; the parent is whatever tag that context already held
  (the creating task's, since a new context is a copy of the creator's).
* **call_soon.** Every task schedules its first step with ``loop.call_soon(step,
  context=ctx)``; a task we did not see being made (``asyncio.Task(coro)`` called
  directly, or tasks that existed before ``instrument()``) is adopted there, before its
  first step runs.
* **run_in_executor / call_soon_threadsafe.** Thread-pool jobs and thread-safe callbacks
  carry the submitting task's id to the thread that runs them (the *propagated* route).

Nothing here counts bytes; the C core does, reading the tag.  Works for the stdlib loops
and for uvloop (whose ``Loop`` is a Python subclass of a Cython base, so the same trick
applies).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import itertools
import threading
import weakref
from typing import Any, Callable

from ..attribution import handover
from .tagging import LABELS, TAG

__all__ = ["LoopState", "Tagger", "instrument_loop", "uninstrument_loop", "is_instrumented"]

_copy_context = contextvars.copy_context
_loop_serials = itertools.count(1)
_get_running_loop = asyncio._get_running_loop
_Task = asyncio.Task


class Tagger:
    """The profiler's side of instrumentation, shared by all loops of one profiler."""

    def __init__(self, registry, *, propagate_threads: bool = True):
        self.registry = registry
        self.propagate_threads = propagate_threads
        self.loops: "weakref.WeakSet[asyncio.AbstractEventLoop]" = weakref.WeakSet()
        self.on_loop_close: Callable[[Any], None] | None = None

    def record_for(self, ctx: contextvars.Context, explicit: bool, via_factory: bool, loop: Any):
        """A new task record whose parent is the task owning ``ctx``'s current tag."""
        parent = ctx.get(TAG, None)
        parent_id = None
        if parent is not None:
            parent_id = parent.id
            if explicit:
                prec = self.registry.get(parent_id)
                # A context handed to several create_task calls (asyncio.Runner reuses
                # one): the tag in it is a sibling's, not the parent's.
                if prec is not None and prec.ctx_id == id(ctx):
                    parent_id = prec.parent_id
        state = getattr(loop, "__dict__", {}).get("_ms_state")
        rec = self.registry.new_task(parent_id, ctx.get(LABELS, None), loop_id=state.serial if state else None)
        rec.via_factory = via_factory
        rec.ctx_id = id(ctx)
        return rec


class LoopState:
    """Per-loop instrumentation state (kept on the loop as ``_ms_state``)."""

    __slots__ = ("tagger", "user_factory", "user_factory_takes_context", "pending", "original_class", "serial",
                 "__weakref__")

    def __init__(self, tagger: Tagger, user_factory: Any, original_class: type):
        self.serial = next(_loop_serials)  # a loop id that is never reused, unlike id(loop)
        self.tagger = tagger
        self.original_class = original_class
        self.pending = None
        self.user_factory = None
        self.user_factory_takes_context = True
        self.set_user_factory(user_factory)

    def set_user_factory(self, factory: Any) -> None:
        self.user_factory = factory
        self.user_factory_takes_context = factory is None or _accepts_context(factory)

    def factory(self, loop: Any, coro: Any, **kwargs: Any) -> Any:
        """The task factory installed on the loop."""
        return self.create(loop, coro, None, kwargs)

    def create(self, loop: Any, coro: Any, name: Any, kwargs: dict) -> Any:
        """Make a tagged task.  ``name`` is given only by our own create_task (stdlib
        loops), where it goes to the Task constructor as asyncio itself would do it."""
        ctx = kwargs.pop("context", None)
        explicit = ctx is not None
        if ctx is None:
            ctx = _copy_context()
        rec = self.tagger.record_for(ctx, explicit, True, loop)
        try:
            ctx.run(TAG.set, rec.tag)
        except RuntimeError:
            # The context is running right now (the caller passed its own): we cannot
            # tag it without changing the caller, so the task shares the caller's tag.
            self.tagger.registry.discard(rec)
            return self._make(loop, coro, ctx, name, kwargs)
        self.pending = rec
        try:
            task = self._make(loop, coro, ctx, name, kwargs)
        finally:
            self.pending = None
        rec.attach(task, coro)
        return task

    def _make(self, loop: Any, coro: Any, ctx: Any, name: Any, kwargs: dict) -> Any:
        uf = self.user_factory
        if uf is None:
            if kwargs.get("eager_start") is None:
                kwargs.pop("eager_start", None)
            if name is not None:
                kwargs["name"] = name
            return _Task(coro, loop=loop, context=ctx, **kwargs)
        if self.user_factory_takes_context:
            task = uf(loop, coro, context=ctx, **kwargs)
        else:
            # A legacy (loop, coro) factory: run it inside the tagged context, so the
            # task it makes copies that context.
            task = ctx.run(uf, loop, coro, **kwargs)
        if name is not None:
            task.set_name(name)
        return task

    def adopt(self, task: Any, context: contextvars.Context) -> None:
        """Called from call_soon for a task step we do not know yet."""
        registry = self.tagger.registry
        pending = self.pending
        if pending is not None and context.get(TAG, None) is pending.tag:
            registry.by_object[id(task)] = pending.id  # our own factory's task; attached later
            return
        if not isinstance(task, asyncio.Future) or task.done():
            return
        loop = task.get_loop()
        rec = self.tagger.record_for(context, False, False, loop)
        try:
            context.run(TAG.set, rec.tag)
        except RuntimeError:
            registry.discard(rec)
            return
        rec.attach(task)


def _accepts_context(factory: Any) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == "context" and p.kind is not p.POSITIONAL_ONLY) for p in params)


def _thread_pool(executor: Any) -> bool:
    return executor is None or isinstance(executor, concurrent.futures.ThreadPoolExecutor)


class _InstrumentedLoop:
    """Mixin placed in front of the loop's own class.  ``super()`` is the original."""

    _ms_state: LoopState

    def set_task_factory(self, factory):
        if factory is not None and not callable(factory):
            raise TypeError(f"A callable object or None is expected, got {factory!r}")
        self._ms_state.set_user_factory(factory)

    def get_task_factory(self):
        return self._ms_state.user_factory

    def create_task(self, coro, *, name=None, context=None, **kwargs):
        # Stdlib loops only (uvloop's create_task is left alone).  Going through our
        # factory directly keeps task names exactly as asyncio sets them; CPython 3.13.0
        # renames every task to "None" when any task factory is installed.
        if not isinstance(self, asyncio.BaseEventLoop):
            return super().create_task(coro, name=name, context=context, **kwargs)
        self._check_closed()
        if context is not None:
            kwargs["context"] = context
        return self._ms_state.create(self, coro, name, kwargs)

    def call_soon(self, callback, *args, context=None):
        if context is not None:
            task = getattr(callback, "__self__", None)
            if task is not None and id(task) not in self._ms_state.tagger.registry.by_object:
                if isinstance(task, _Task):
                    self._ms_state.adopt(task, context)
        return super().call_soon(callback, *args, context=context)

    def run_in_executor(self, executor, func, *args):
        st = self._ms_state
        if st.tagger.propagate_threads and _thread_pool(executor):
            tag = TAG.get(None)
            tid = tag.id if tag is not None else handover.current()
            if tid:
                func = functools.partial(handover.run_handed, tid, func)
        return super().run_in_executor(executor, func, *args)

    def call_soon_threadsafe(self, callback, *args, context=None):
        st = self._ms_state
        # From the loop's own thread nothing crosses: the callback simply runs in a copy
        # of the caller's context.
        if st.tagger.propagate_threads and _get_running_loop() is not self:
            tag = (context.get(TAG, None) if context is not None else TAG.get(None))
            tid = tag.id if tag is not None else handover.current()
            if tid:
                callback = functools.partial(handover.run_handed, tid, callback)
        return super().call_soon_threadsafe(callback, *args, context=context)

    def close(self):
        try:
            super().close()
        finally:
            st = self.__dict__.get("_ms_state")
            if st is not None and st.tagger.on_loop_close is not None:
                st.tagger.on_loop_close(self)


_subclasses: dict[type, type] = {}
_subclass_lock = threading.Lock()


def _subclass_for(cls: type) -> type:
    with _subclass_lock:
        sub = _subclasses.get(cls)
        if sub is None:
            sub = type(cls.__name__, (_InstrumentedLoop, cls), {"__module__": cls.__module__})
            sub.__qualname__ = cls.__qualname__
            _subclasses[cls] = sub
        return sub


def is_instrumented(loop: Any) -> bool:
    return isinstance(loop, _InstrumentedLoop) and "_ms_state" in loop.__dict__


def instrument_loop(loop: Any, tagger: Tagger) -> Any:
    """Instrument ``loop`` in place (idempotent) and return it.  A task factory already
    set on the loop is kept and composed with ours.  Raises TypeError for loops whose
    class cannot be extended."""
    if is_instrumented(loop):
        loop._ms_state.tagger = tagger
        tagger.loops.add(loop)
        return loop
    cls = type(loop)
    sub = _subclass_for(cls)
    user_factory = loop.get_task_factory()
    state = LoopState(tagger, user_factory, cls)
    try:
        loop.__class__ = sub
    except TypeError as exc:
        raise TypeError(f"cannot instrument event loop of type {cls.__qualname__}: {exc}") from None
    loop.__dict__["_ms_state"] = state
    cls.set_task_factory(loop, state.factory)
    tagger.loops.add(loop)
    return loop


def uninstrument_loop(loop: Any) -> None:
    """Undo :func:`instrument_loop`: the original class and the user's factory come back."""
    state = loop.__dict__.get("_ms_state")
    if state is None:
        return
    cls = state.original_class
    try:
        cls.set_task_factory(loop, state.user_factory)
    except Exception:
        pass
    loop.__class__ = cls
    del loop.__dict__["_ms_state"]
    state.tagger.loops.discard(loop)
