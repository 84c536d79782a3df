"""Instrumenting one event loop: tagging every task, carrying work across threads.

An instrumented loop is the same object, of the same type, with a few instance attributes
that shadow its own methods (bound to it) and add a thin layer:

* **Task factory.**  Ours (``_core.TaskFactory``, in C) is the one the loop calls; a
  user's factory (set before or after us, through ``set_task_factory``) is called from
  inside it, and ``get_task_factory()`` keeps answering with the user's.  Each task gets a
  context whose tag names the new task; the parent is whatever tag that context already
  held (the creating task's, since a new context is a copy of the creator's).
* **call_soon** (``_core.CallSoon``, in C, in front of the loop class's own).  Every task
  schedules its steps with ``loop.call_soon(step, context=ctx)``; a task we did not see
  being made (``asyncio.Task(coro)`` called directly, or tasks that existed before
  ``instrument()``) is adopted there, before its first step runs.  It also runs our done
  callback inline instead of queueing it.
* **run_in_executor / call_soon_threadsafe.** Thread-pool jobs and thread-safe callbacks
  carry the submitting task's id to the thread that runs them (the *propagated* route).

Nothing here counts bytes; the C core does, reading the tag.  Works for the stdlib loops
and for uvloop (whose ``Loop`` is a Python subclass of a Cython base, so its instances take
attributes too).  Uninstrumenting deletes the attributes again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import threading
import types
import weakref
from typing import Any, Callable

from ..attribution import _core

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


def _accepts_context(factory: Any) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == "context" and p.kind is not p.POSITIONAL_ONLY) for p in params)


# The methods an instrumented loop gets as instance attributes (bound to the loop).  No class
# swap: ``loop.__class__ = ...`` makes CPython materialise the instance dict, after which
# every method call on the loop loses its specialised fast path (measured: 2x slower
# method calls, about 8,000 instructions more per task on CPython 3.12).  Instance
# attributes shadow only these names and leave the loop's type untouched.


def _set_task_factory(self, factory):
    if factory is not None and not callable(factory):
        raise TypeError(f"A callable object or None is expected, got {factory!r}")
    self._ms_state.set_user_factory(factory)


def _get_task_factory(self):
    return self._ms_state.user_factory


def _create_task(self, coro, *, name=None, context=None, **kwargs):
    # Stdlib loops only (uvloop's create_task is left alone).  Going through our factory
    # directly keeps task names exactly as asyncio sets them; CPython 3.13.0 renames every
    # task to "None" when any task factory is installed.
    self._check_closed()
    if context is not None:
        kwargs["context"] = context
    return self._ms_state.factory.create(self, coro, name, kwargs)


def _close(self):
    st = self._ms_state
    try:
        st.original_class.close(self)
    finally:
        if st.tagger.on_loop_close is not None:
            st.tagger.on_loop_close(self)


_METHODS = {
    "set_task_factory": _set_task_factory,
    "get_task_factory": _get_task_factory,
    "close": _close,
}
# C objects placed in front of the class's own methods (one per loop class and name).
_IN_C = ("call_soon", "run_in_executor", "call_soon_threadsafe")

_c_methods: dict[tuple[type, str], Any] = {}
_c_methods_lock = threading.Lock()


def _c_method(cls: type, name: str) -> Any:
    """call_soon: ``_core.CallSoon``; run_in_executor and call_soon_threadsafe:
    ``_core.HandOver``, which carry the sending task's id to the thread that runs the work
    (thread pools only; a ProcessPoolExecutor gets the function untouched)."""
    with _c_methods_lock:
        m = _c_methods.get((cls, name))
        if m is None:
            orig = getattr(cls, name)
            if name == "call_soon":
                m = _core.CallSoon(orig)
            else:
                kind = 0 if name == "run_in_executor" else 1
                m = _core.HandOver(orig, kind, concurrent.futures.ThreadPoolExecutor, _get_running_loop)
            _c_methods[(cls, name)] = m
        return m


def _state(loop: Any) -> "LoopState | None":
    # getattr, never loop.__dict__: reading __dict__ materialises it (the slow path).
    st = getattr(loop, "_ms_state", None)
    return st if isinstance(st, LoopState) else None


def is_instrumented(loop: Any) -> bool:
    return _state(loop) is not None


def instrument_loop(loop: Any, tagger: Tagger) -> Any:
    """Instrument ``loop`` in place (idempotent) and return it.  A task factory already
    set on the loop is kept and composed with ours.  Raises TypeError for loops that
    cannot take instance attributes."""
    st = _state(loop)
    if st is not None:
        st.tagger = tagger
        tagger.loops.add(loop)
        return loop
    cls = type(loop)
    state = LoopState(tagger, loop.get_task_factory(), cls)
    bound = {name: types.MethodType(fn, loop) for name, fn in _METHODS.items()}
    for name in _IN_C if tagger.propagate_threads else ("call_soon",):
        bound[name] = types.MethodType(_c_method(cls, name), loop)
    if isinstance(loop, asyncio.BaseEventLoop):
        bound["create_task"] = types.MethodType(_create_task, loop)
    try:
        loop._ms_state = state
    except AttributeError as exc:
        raise TypeError(f"cannot instrument event loop of type {cls.__qualname__}: {exc}") from None
    for name, method in bound.items():
        setattr(loop, name, method)
    cls.set_task_factory(loop, state.factory)
    tagger.loops.add(loop)
    return loop


def uninstrument_loop(loop: Any) -> None:
    """Undo :func:`instrument_loop`: the loop's own methods and the user's factory come
    back (this also breaks the loop -> bound method -> loop reference cycle)."""
    state = _state(loop)
    if state is None:
        return
    cls = state.original_class
    try:
        cls.set_task_factory(loop, state.user_factory)
    except Exception:
        pass
    for name in (*_METHODS, *_IN_C, "create_task", "_ms_state"):
        try:
            delattr(loop, name)
        except AttributeError:
            pass
    state.tagger.loops.discard(loop)
