"""Instrumenting one event loop: tagging every task, carrying work across threads.

An instrumented loop keeps its type and its own attributes (one more: ``_ms_state``).  The
layer sits on the loop's *class*: a few methods are replaced there by ours, and each of
ours first asks whether its loop is instrumented (a C lookup by address, see
``_core.register_loop``) and otherwise calls the class's own.  Why not per-instance
attributes: CPython keeps a loop's attributes inline only while the class's shared key
table has room (30 keys; a 3.12 selector loop already uses 24, a 3.13 one 26).  Past that
the instance dict is materialised and every method call on the loop loses its
specialised fast path; measured with callgrind, a call to ``loop._check_closed()`` goes
from 643 to 955 instructions on 3.13 (+316 on 3.12), and a task tree pays ~2,700
instructions per task.  Swapping ``loop.__class__`` has the same effect.

* **Task factory.**  Ours (``_core.TaskFactory``, in C) is the one the loop calls; a
  user's factory (set before or after us, through ``set_task_factory``) is called from
  inside it, and ``get_task_factory()`` keeps answering with the user's.  Each task gets a
  context whose tag names the new task; the parent is whatever tag that context already
  held (the creating task's, since a new context is a copy of the creator's).
* **create_task** (stdlib loops, ``_core.CreateTask``): straight to our factory, keeping
  task names exactly as asyncio sets them.
* **call_soon** (``_core.CallSoon``).  Every task schedules its steps with
  ``loop.call_soon(step, context=ctx)``; a task we did not see being made
  (``asyncio.Task(coro)`` called directly, or tasks that existed before ``instrument()``)
  is adopted there, before its first step runs.  It also runs our done callback inline
  instead of queueing it.
* **run_in_executor / call_soon_threadsafe** (``_core.HandOver``).  Thread-pool jobs and
  thread-safe callbacks carry the submitting task's id to the thread that runs them (the
  *propagated* route), on loops instrumented with thread propagation on.
* **call_exception_handler** (``_core.ExceptionHook``).  A task destroyed while still
  pending is reported there by its finalizer; its record ends then, with its name.  In C
  so that a log record the handler makes names the program's frame: uvloop's default
  handler is Cython, so logging would otherwise name the innermost Python frame, ours.

Our version of a method goes on the class that defines it (``BaseEventLoop`` for every
stdlib loop; ``uvloop.Loop`` for uvloop) and stays while any loop that uses it is
instrumented; the last one to go (by ``uninstrument_loop`` or by being garbage collected)
restores the class.  Nothing here counts
bytes; the C core does, reading the tag.  Works for the stdlib loops and for uvloop (whose
``Loop`` is a Python subclass of a Cython base).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import itertools
import os
import threading
import weakref
from typing import Any, Callable, TypeVar

from ..attribution import _core

_T = TypeVar("_T")

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

    __slots__ = ("tagger", "factory", "original_class", "serial", "default_pool", "on_close", "__weakref__")

    def __init__(self, tagger: Tagger, user_factory: Any, original_class: type, default_executor: Any = None):
        self.serial = next(_loop_serials)  # a loop id that is never reused, unlike id(loop)
        self.tagger = tagger
        # called with the loop once it has closed (after the tagger's on_loop_close): who
        # made this loop and waits for its end (a LoopFactory)
        self.on_close: Callable[[Any], None] | None = None
        self.original_class = original_class
        self.factory = _core.TaskFactory(self.serial)
        self.set_user_factory(user_factory)
        # run_in_executor(None, ...) goes to a thread pool unless the loop was given another
        # default executor (uvloop takes a process pool; asyncio refuses one since 3.11):
        # only work for thread pools is wrapped, nothing unpicklable goes to a process
        self.default_pool = default_executor is None or isinstance(default_executor, concurrent.futures.ThreadPoolExecutor)

    def register(self, loop: Any) -> None:
        _core.register_loop(loop, self.factory, self.tagger.propagate_threads, self.default_pool)

    @property
    def user_factory(self) -> Any:
        return self.factory.user_factory

    def set_user_factory(self, factory: Any) -> None:
        self.factory.forwards_context = _is_asyncios_eager(factory)
        self.factory.user_factory = factory


def _is_asyncios_eager(factory: Any) -> bool:
    """asyncio.eager_task_factory, or a factory made by asyncio.create_eager_task_factory:
    they make the Task with the context they are given, so giving them the task's tagged
    context is the same as calling them inside it, and cheaper."""
    if factory is getattr(asyncio, "eager_task_factory", None):
        return True
    return (getattr(factory, "__module__", None) == "asyncio.tasks"
            and getattr(factory, "__qualname__", None) == "create_eager_task_factory.<locals>.factory")


def _set_task_factory(self, factory, _original):
    if factory is not None and not callable(factory):
        _original(self, factory)  # the loop's own error (it checks before it sets anything)
        _original(self, self._ms_state.factory)  # (a loop that took it anyway: ours goes back)
        raise TypeError(f"task factory must be a callable or None, got {factory!r}")
    self._ms_state.set_user_factory(factory)


def _get_task_factory(self, _original):
    return self._ms_state.user_factory


def _create_task(original, self, *args, **kwargs):
    # Stdlib loops only (uvloop's create_task is left alone).  Going through our factory
    # directly keeps task names exactly as asyncio sets them; CPython 3.13.0 renames every
    # task to "None" when any task factory is installed.  The usual calls take the same
    # path in C (_core.CreateTask); this is the version for every other call shape.  A
    # call the loop's own create_task would refuse goes to it, for its own error.
    bound = _bind(original, self, args, kwargs)
    if bound is None:
        try:
            return original(self, *args, **kwargs)
        finally:
            del args, kwargs  # (the frame in the error's traceback keeps no coroutine alive)
    self._check_closed()
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    coro = arguments.pop("coro")
    name = arguments.pop("name", None)
    extra = dict(arguments.pop("kwargs", None) or {})
    extra.update(arguments)
    if extra.get("context") is None:
        extra.pop("context", None)
    return self._ms_state.factory.create(self, coro, name, extra)


@functools.lru_cache(maxsize=None)
def _signature(method: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(method)
    except (TypeError, ValueError):  # (a compiled method that does not say)
        return None


def _bind(original: Any, self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments | None:
    """The call's arguments bound as the loop's own method takes them; None for a call it
    would refuse (or a method that does not say what it takes).  A refused call goes to
    it, for its own error, raised outside any handler of ours (so nothing of ours is its
    __context__)."""
    signature = _signature(original)
    if signature is None:
        return None
    try:
        return signature.bind(self, *args, **kwargs)
    except TypeError:
        return None


def _set_default_executor(self, executor, _original):
    _original(self, executor)
    st = self._ms_state
    st.default_pool = isinstance(executor, concurrent.futures.ThreadPoolExecutor)
    st.register(self)


def _close(self, _original):
    st = self._ms_state
    try:
        _original(self)
    finally:
        try:
            if st.tagger.on_loop_close is not None:
                st.tagger.on_loop_close(self)
        finally:
            if st.on_close is not None:
                st.on_close(self)


# Python-level replacements: (self, *args, _original) for instrumented loops.
_IN_PYTHON = {
    "set_task_factory": _set_task_factory,
    "get_task_factory": _get_task_factory,
    "close": _close,
    "set_default_executor": _set_default_executor,
}
# In C (no Python frame of ours on the stack while they run): call_soon and
# create_task for speed, call_exception_handler so that a log record made inside it
# (uvloop's Cython default handler) names the program's frame, not ours.
_IN_C = ("call_soon", "run_in_executor", "call_soon_threadsafe", "call_exception_handler")
_MARK = "__memscope_original__"
_MISSING = object()


def _python_method(impl: Callable[..., Any], original: Any) -> Any:
    def method(self, *args, **kwargs):
        if _state(self) is not None and (_signature(original) is None or _bind(original, self, args, kwargs) is not None):
            return impl(self, *args, _original=original, **kwargs)
        return original(self, *args, **kwargs)

    functools.update_wrapper(method, original)
    setattr(method, _MARK, original)
    return method


def _replacement(name: str, original: Any) -> Any:
    if name == "call_soon":
        return _core.CallSoon(original)
    if name == "create_task":
        return _core.CreateTask(original, functools.partial(_create_task, original))
    if name == "call_exception_handler":
        return _core.ExceptionHook(original)
    if name in _IN_C:
        kind = 0 if name == "run_in_executor" else 1
        return _core.HandOver(original, kind, concurrent.futures.ThreadPoolExecutor, _get_running_loop)
    return _python_method(_IN_PYTHON[name], original)


def _unwrap(attr: Any) -> Any:
    """The class's own method behind one of our replacements (inherited from a patched base)."""
    if isinstance(attr, (_core.CallSoon, _core.ExceptionHook, _core.CreateTask, _core.HandOver)):
        return attr.original
    return getattr(attr, _MARK, attr)


_IMMUTABLE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE


def _owner(cls: type, name: str) -> type:
    """The class that gets our version of ``name`` for loops of type ``cls``: the deepest
    class in the MRO that defines it and can be changed (``BaseEventLoop`` for every stdlib
    loop, so a user's subclass that overrides the method and calls ``super()`` still runs
    its own code first), else the deepest class that can be changed (``uvloop.Loop``, a
    Python subclass of uvloop's Cython loop)."""
    mutable = [k for k in cls.__mro__ if k not in (object, asyncio.AbstractEventLoop) and not k.__flags__ & _IMMUTABLE]
    if not mutable:
        raise TypeError("no class in its MRO can be changed")
    for k in reversed(mutable):
        if name in k.__dict__:
            return k
    return mutable[-1]


class _Patch:
    __slots__ = ("saved", "ours", "loops")

    def __init__(self, saved: Any, ours: Any) -> None:
        self.saved = saved  # what the class's own __dict__ held (_MISSING: nothing)
        self.ours = ours  # what we put there
        self.loops = 0


_patches: dict[tuple[type, str], _Patch] = {}
_registered: dict[int, tuple[Any, tuple[tuple[type, str], ...]]] = {}  # id(loop) -> (weakref, patches held)
_lock = threading.RLock()


def renew_lock_after_fork(namespace: dict[str, Any], name: str = "_lock",
                          make: Callable[[], Any] = threading.RLock) -> None:
    """Give the module whose globals are ``namespace`` a fresh lock (``make()``) as ``name``
    in every child made by fork: one some parent thread held at the fork stays held in the
    child's copy, where no thread will release it (the profiler's own at-fork handlers
    then take its hooks out under the new one)."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: namespace.__setitem__(name, make()))


renew_lock_after_fork(globals())


def _names(cls: type) -> list[str]:
    names = [*_IN_PYTHON, *_IN_C]
    if issubclass(cls, asyncio.BaseEventLoop):
        names.append("create_task")
    return names


def _patch(key: tuple[type, str]) -> None:
    p = _patches.get(key)
    if p is None:
        owner, name = key
        saved = owner.__dict__.get(name, _MISSING)
        original = _unwrap(saved if saved is not _MISSING else getattr(owner, name))
        ours = _replacement(name, original)
        setattr(owner, name, ours)
        if name not in _IN_PYTHON:  # one of the C stand-ins
            _core.stand_in_placed(ours, owner, name)  # what pickling it refers to
        p = _patches[key] = _Patch(saved, ours)
    p.loops += 1


def _unpatch(key: tuple[type, str]) -> None:
    p = _patches.get(key)
    if p is None:
        return
    p.loops -= 1
    if p.loops > 0:
        return
    del _patches[key]
    owner, name = key
    if owner.__dict__.get(name) is not p.ours:
        return  # replaced after us (a library's wrapper around ours): it stays
    try:
        if p.saved is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, p.saved)
    except (AttributeError, TypeError):
        pass


def _patch_for(cls: type) -> tuple[tuple[type, str], ...]:
    """Put our methods where loops of type ``cls`` find them; returns what was taken."""
    held: list[tuple[type, str]] = []
    try:
        for name in _names(cls):
            key = (_owner(cls, name), name)
            _patch(key)
            held.append(key)
    except (AttributeError, TypeError) as exc:
        for key in held:
            _unpatch(key)
        raise TypeError(f"cannot instrument event loop of type {cls.__qualname__}: {exc}") from None
    return tuple(held)


def _forget(key: int, ref: Any = None) -> None:
    """The loop is uninstrumented, or gone (ref: its dead weakref)."""
    with _lock:
        entry = _registered.get(key)
        if entry is None or (ref is not None and entry[0] is not ref):
            return
        del _registered[key]
        _core.unregister_loop(key)
        for patch in entry[1]:
            _unpatch(patch)


def _state(loop: Any) -> "LoopState | None":
    # getattr, never loop.__dict__: reading __dict__ materialises it (the slow path).
    st = getattr(loop, "_ms_state", None)
    return st if isinstance(st, LoopState) else None


def is_instrumented(loop: Any) -> bool:
    return _state(loop) is not None


def loop_thread_here() -> None:
    """The calling thread runs an instrumented loop: the report names it a loop thread, and
    what it allocates outside the loop's tasks is its own, not inferred to a task that
    started the thread."""
    _core.loop_thread()


def making_loop(make: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``make(*args, **kwargs)``, a loop, made in a thread marked as a loop thread first
    (uvloop's ~256 KiB read buffer is the thread's own, not inferred to a task that started
    it); if making it fails, the thread is what it was before."""
    was = _core.loop_thread()
    try:
        return make(*args, **kwargs)
    except BaseException:
        _core.loop_thread(was)
        raise


def instrument_loop(loop: Any, tagger: Tagger) -> Any:
    """Instrument ``loop`` in place (idempotent) and return it.  A task factory already
    set on the loop is kept and composed with ours.  Raises TypeError for loops that
    cannot be instrumented (no instance attributes, no weak references, or a class that
    cannot be changed)."""
    with _lock:
        st = _state(loop)
        if st is not None:
            st.tagger = tagger
            tagger.loops.add(loop)
            st.register(loop)
            return loop
        cls = type(loop)
        state = LoopState(tagger, loop.get_task_factory(), cls, getattr(loop, "_default_executor", None))
        try:
            loop._ms_state = state
            ref = weakref.ref(loop, functools.partial(_forget, id(loop)))
        except (AttributeError, TypeError) as exc:
            try:
                del loop._ms_state
            except AttributeError:
                pass
            raise TypeError(f"cannot instrument event loop of type {cls.__qualname__}: {exc}") from None
        try:
            held = _patch_for(cls)
        except TypeError:
            del loop._ms_state
            raise
        _registered[id(loop)] = (ref, held)
        state.register(loop)
        _unwrap(getattr(cls, "set_task_factory"))(loop, state.factory)
        tagger.loops.add(loop)
        return loop


def uninstrument_loop(loop: Any) -> None:
    """Undo :func:`instrument_loop`: the user's factory comes back, and the loop's class
    gets its own methods back once none of its loops is instrumented."""
    with _lock:
        state = _state(loop)
        if state is None:
            return
        _forget(id(loop))
        try:
            _unwrap(getattr(state.original_class, "set_task_factory"))(loop, state.user_factory)
        except Exception:
            pass
        try:
            del loop._ms_state
        except AttributeError:
            pass
        state.tagger.loops.discard(loop)
