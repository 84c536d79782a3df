"""Thread bookkeeping for the report: names, roles and the inferred-route controls."""

from __future__ import annotations

import threading

from . import _core

__all__ = ["now_ns", "note_thread", "started_by", "known_threads", "reset"]

now_ns = _core.now_ns

# ident -> (name, role) for threads seen starting while a profiler ran
_names: dict[int, tuple[str, str]] = {}


def note_thread(ident: int, name: str, role: str) -> None:
    _names[ident] = (name, role)


def started_by(tid: int, started_ns: int) -> None:
    """The calling thread was started during task ``tid``'s work (the core lets the
    inference decay faster once that task has finished)."""
    _core.set_inferred(tid, started_ns)


def known_threads() -> dict[int, tuple[str, str]]:
    """ident -> (name, role) for threads noted while profiling and those alive now."""
    out = dict(_names)
    for t in threading.enumerate():
        if t.ident is not None and t.ident not in out:
            out[t.ident] = (t.name, "other")
    return out


def reset() -> None:
    _names.clear()
