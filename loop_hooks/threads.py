"""Threads started by tasks: the *inferred* route.

On Python 3.11 to 3.13 a new thread starts with an empty context, so nothing ties it to
the task that started it.  While a profiler runs, ``threading.Thread.start`` notes the
task (or handed-over work) that called it, and the new thread, before running its
target, tells the C core "context-less work here is probably that task's".  The C core
then decays that guess with the thread's age, drops it once the starting task has
finished for long enough, and drops it for good as soon as the thread runs another
task's work, or takes work from a ``queue.Queue`` (a thread that serves a queue serves
whoever fills it, not the task that started it).  Thread-pool workers are never
inferred: they serve everyone by design.

Names of threads started while profiling are remembered so the report can show them
after the threads are gone.
"""

from __future__ import annotations

import concurrent.futures.thread as _cf_thread
import functools
import queue
import threading
import weakref

from ..attribution import _core, handover
from ..attribution import threads as core_threads
from .tagging import TAG

__all__ = ["install", "uninstall", "installed"]

_original_start = threading.Thread.start
_original_bootstrap_inner = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]
_original_queue_get = queue.Queue.get  # (taken again at each install: see install)
_pending: "weakref.WeakKeyDictionary[threading.Thread, tuple[int, int]]" = weakref.WeakKeyDictionary()
_installed = False


def _executor_worker(thread: threading.Thread) -> bool:
    return getattr(thread, "_target", None) is _cf_thread._worker


def _start(self: threading.Thread) -> None:
    try:
        tag = TAG.get(None)
        tid = tag.id if tag is not None else handover.current()
        if tid and not _executor_worker(self):
            _pending[self] = (tid, core_threads.now_ns())
    except Exception:  # never let bookkeeping break the user's thread
        pass
    return _original_start(self)


def _bootstrap_inner(self: threading.Thread) -> None:
    try:
        role = "executor" if _executor_worker(self) else "other"
        core_threads.note_thread(self.name, role)
        info = _pending.pop(self, None)
        if info is not None:
            core_threads.started_by(*info)
    except Exception:
        pass
    return _original_bootstrap_inner(self)


def _queue_get(self, block=True, timeout=None):
    _core.serves()
    return _original_queue_get(self, block, timeout)


def installed() -> bool:
    return _installed


def install() -> None:
    """Patch ``threading.Thread`` (idempotent)."""
    global _installed
    if _installed:
        return
    global _original_queue_get
    threading.Thread.start = _start  # type: ignore[method-assign]
    threading.Thread._bootstrap_inner = _bootstrap_inner  # type: ignore[attr-defined]
    # whatever Queue.get is now (a library or a test may have replaced it since import)
    # runs inside ours, and is what uninstall puts back
    _original_queue_get = queue.Queue.get
    functools.update_wrapper(_queue_get, _original_queue_get)
    queue.Queue.get = _queue_get  # type: ignore[method-assign]
    _installed = True


def uninstall() -> None:
    """Restore ``threading.Thread`` exactly as it was."""
    global _installed
    if not _installed:
        return
    threading.Thread.start = _original_start  # type: ignore[method-assign]
    threading.Thread._bootstrap_inner = _original_bootstrap_inner  # type: ignore[attr-defined]
    if queue.Queue.get is _queue_get:  # (unless someone replaced it after us)
        queue.Queue.get = _original_queue_get  # type: ignore[method-assign]
    _pending.clear()
    _installed = False
