"""Threads started by tasks: the *inferred* route.

On Python 3.11 to 3.13 a new thread starts with an empty context, so nothing ties it to
the task that started it.  While a profiler runs, ``threading.Thread.start`` notes the
task (or handed-over work) that called it, and the new thread, before running its
target, tells the C core "context-less work here is probably that task's".  The C core
then decays that guess with the thread's age, drops it once the starting task has
finished for long enough, and drops it for good as soon as the thread runs another
task's work, or takes work from a ``queue.Queue`` (a thread that serves a queue serves
whoever fills it, not the task that started it).  Thread-pool workers
(concurrent.futures', multiprocessing.pool.ThreadPool's) are never inferred: they serve
everyone by design.

Names of threads started while profiling are remembered so the report can show them
after the threads are gone.
"""

from __future__ import annotations

import concurrent.futures.thread as _cf_thread
import functools
import queue
import threading
import weakref

from ..attribution import _core
from ..attribution import threads as core_threads

__all__ = ["install", "uninstall", "installed"]

_pending: "weakref.WeakKeyDictionary[threading.Thread, tuple[int, int]]" = weakref.WeakKeyDictionary()
_installed = False
_session: object | None = None  # the running install's token (see install)


def _executor_worker(thread: threading.Thread) -> bool:
    """A pool's thread: concurrent.futures' workers, and multiprocessing.pool.ThreadPool's
    workers and the threads that feed them (by their functions' module: nothing imported
    for it).  Pools serve whoever submits work, so no task's bytes are inferred there."""
    target = getattr(thread, "_target", None)
    return target is _cf_thread._worker or getattr(target, "__module__", None) == "multiprocessing.pool"


def _note_start(thread: threading.Thread) -> None:
    try:
        # (not the Tag alone: where tasks share a context it names the newest of them)
        tid = _core.current_tid()
        if tid and not _executor_worker(thread):
            _pending[thread] = (tid, core_threads.now_ns())
    except Exception:  # never let bookkeeping break the user's thread
        pass


def _note_bootstrap(thread: threading.Thread) -> None:
    try:
        role = "executor" if _executor_worker(thread) else "other"
        core_threads.note_thread(thread.name, role)
        info = _pending.pop(thread, None)
        if info is not None:
            core_threads.started_by(*info)
    except Exception:
        pass


# (owner, attribute) -> (our wrapper, what it replaced) while installed
_patches: dict[tuple[type, str], tuple[object, object]] = {}


def _noting(note):
    """A wrapper maker for Thread methods: ``note(thread)`` first while its session runs."""

    def wrap(original, session):
        def method(self):
            if _session is session:
                note(self)
            return original(self)

        return method

    return wrap


def _wrap_queue_get(original, session):
    def get(self, block=True, timeout=None):
        if _session is session:
            _core.serves()
        return original(self, block, timeout)

    return get


_WRAPPERS = ((threading.Thread, "start", _noting(_note_start)),
             (threading.Thread, "_bootstrap_inner", _noting(_note_bootstrap)),
             (queue.Queue, "get", _wrap_queue_get))


def installed() -> bool:
    return _installed


def install() -> None:
    """Patch ``threading.Thread.start`` / ``_bootstrap_inner`` and ``queue.Queue.get``
    (idempotent).  Whatever each is now (a library such as an APM agent may have wrapped
    it since import) runs inside ours.  Each install makes wrappers of its own: one left
    in place under a library's wrapper by an earlier session only passes calls through,
    so a chain of sessions and wrappers never loops back on itself."""
    global _installed
    if _installed:
        return
    global _session
    session = _session = object()
    for owner, name, wrap in _WRAPPERS:
        # what uninstall puts back is the class's own entry; what ours calls is what an
        # attribute lookup gives (a library's descriptor, e.g. a wrapt wrapper, binds there)
        saved, original = owner.__dict__[name], getattr(owner, name)
        ours = functools.update_wrapper(wrap(original, session), original)
        setattr(owner, name, ours)
        _patches[(owner, name)] = (ours, saved)
    _installed = True


def uninstall() -> None:
    """Put back what install replaced, where ours is still the one in place (a wrapper a
    library put over ours stays, and ours under it passes calls straight through)."""
    global _installed, _session
    if not _installed:
        return
    _session = None
    for (owner, name), (ours, original) in _patches.items():
        if owner.__dict__.get(name) is ours:
            setattr(owner, name, original)
    _patches.clear()
    _pending.clear()
    _installed = False
