"""Thread bookkeeping for the report: names, roles and the inferred-route controls."""

from __future__ import annotations

import threading

from . import _core

__all__ = ["now_ns", "note_thread", "started_by", "owner_done", "known_threads", "reset", "inferred_count"]

now_ns = _core.now_ns

# ident -> (name, role) for threads seen starting while a profiler ran
_names: dict[int, tuple[str, str]] = {}


def note_thread(ident: int, name: str, role: str) -> None:
    _names[ident] = (name, role)


_inferred = [0]


def started_by(tid: int, started_ns: int) -> None:
    """The calling thread was started during task ``tid``'s work."""
    _inferred[0] += 1
    _core.set_inferred(tid, started_ns)


def inferred_count() -> int:
    """How many threads carry an inferred owner (0 lets callers skip work)."""
    return _inferred[0]


def owner_done(tid: int) -> None:
    _core.inferred_owner_done(tid)


def known_threads() -> dict[int, tuple[str, str]]:
    """ident -> (name, role) for threads noted while profiling and those alive now."""
    out = dict(_names)
    for t in threading.enumerate():
        if t.ident is not None and t.ident not in out:
            out[t.ident] = (t.name, "other")
    return out


def reset() -> None:
    _names.clear()
    _inferred[0] = 0
