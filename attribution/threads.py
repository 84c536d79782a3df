"""Thread bookkeeping for the report: names, roles and the inferred-route controls."""

from __future__ import annotations

import threading

from . import _core

__all__ = ["now_ns", "note_thread", "started_by", "known_threads", "reset"]

now_ns = _core.now_ns

# The core's thread slot -> (name, role) for threads seen starting while a profiler ran.
# By slot, not by ident: an ident is reused as soon as its thread ends (a pool's next
# worker, a user's next thread), and a slot is one thread's for its whole life.
_names: dict[int, tuple[str, str]] = {}


def note_thread(name: str, role: str) -> None:
    """The calling thread starts (from its own bootstrap)."""
    slot = _core.thread_slot()
    if slot:
        _core.unrecorded(_remember, slot, name, role)


def _remember(slot: int, name: str, role: str) -> None:
    # (with recording off, and a copy of the name: the thread's own name string was made
    # by whoever built the Thread, a task as a rule, and kept here it stayed that task's
    # live bytes for good, so the task never folded)
    _names[slot] = ((name + "\0")[:-1], role)


def started_by(tid: int, started_ns: int) -> None:
    """The calling thread was started during task ``tid``'s work (the core lets the
    inference decay faster once that task has finished)."""
    _core.set_inferred(tid, started_ns)


def known_threads() -> tuple[dict[int, tuple[str, str]], dict[int, str]]:
    """(slot -> (name, role) for threads noted while profiling, ident -> name for the
    threads alive now: the newest slot of an ident is theirs)."""
    return dict(_names), {t.ident: t.name for t in threading.enumerate() if t.ident is not None}


def reset() -> None:
    _names.clear()
