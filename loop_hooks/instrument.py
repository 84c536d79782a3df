"""Instrumenting one event loop: tagging every task, carrying work across threads.

An instrumented loop is the same object with its class swapped for a subclass of its own
class (same ``__name__``, ``__qualname__`` and ``__module__``, so reprs and isinstance checks
do not change) that adds a thin layer:

* **Task factory.**  Ours (``_core.TaskFactory``, in C) is the one the loop calls; a
  user's factory (set before or after us, through ``set_task_factory``) is called from
  inside it, and ``get_task_factory()`` keeps answering with the user's.  Each task gets a
  context whose tag names the new task; the parent is whatever tag that context already
  held (the creating task's, since a new context is a copy of the creator's).
* **call_soon** (``_core.CallSoon``, in C, in front of the class's own).  Every task
  schedules its steps with ``loop.call_soon(step, context=ctx)``; a task we did not see
  being made (``asyncio.Task(coro)`` called directly, or tasks that existed before
  ``instrument()``) is adopted there, before its first step runs.  It also runs our done
  callback inline instead of queueing it.
* **run_in_executor / call_soon_threadsafe.** Thread-pool jobs and thread-safe callbacks
  carry the submitting task's id to the thread that runs them (the *propagated* route).

Nothing here counts bytes; the C core does, reading the tag.  Works for the stdlib loops
and for uvloop (whose ``Loop`` is a Python subclass of a Cython base, so the same trick
applies).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import itertools
import threading
import weakref
from typing import Any, Callable

from ..attribution import _core, handover
from .tagging import TAG

__all__ = ["LoopState", "Tagger", "instrument_loop", "uninstrument_loop", "is_instrumented"]

_loop_serials = itertools.count(1)
_get_running_loop = asyncio._get_running_loop


class Tagger:
    """The profiler's side of instrumentation, shared by all loops of one profiler."""

    def __init__(self, *, propagate_threads: bool = True):
        self.propagate_threads = propagate_threads
        self.loops: "weakref.WeakSet[asyncio.AbstractEventLoop]" = weakref.WeakSet()
        self.on_loop_close: Callable[[Any], None] | None = None


class LoopState:
    """Per-loop instrumentation state (kept on the loop as ``_ms_state``)."""

    __slots__ = ("tagger", "factory", "original_class", "serial", "__weakref__")

    def __init__(self, tagger: Tagger, user_factory: Any, original_class: type):
        self.serial = next(_loop_serials)  # a loop id that is never reused, unlike id(loop)
        self.tagger = tagger
        self.original_class = original_class
        self.factory = _core.TaskFactory(self.serial)
        self.set_user_factory(user_factory)

    @property
    def user_factory(self) -> Any:
        return self.factory.user_factory

    def set_user_factory(self, factory: Any) -> None:
        self.factory.takes_context = factory is None or _accepts_context(factory)
        self.factory.user_factory = factory

    def create(self, loop: Any, coro: Any, name: Any, kwargs: dict) -> Any:
        """Make a tagged task (``name`` only from our own create_task)."""
        return self.factory.create(loop, coro, name, kwargs)


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
        return self._ms_state.factory.create(self, coro, name, kwargs)

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
            namespace = {"__module__": cls.__module__, "call_soon": _core.CallSoon(cls.call_soon)}
            sub = type(cls.__name__, (_InstrumentedLoop, cls), namespace)
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
