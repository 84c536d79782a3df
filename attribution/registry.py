"""Task records as the report builder sees them.

The records themselves live in the C core (``_tasks.h``): one slot per task, filled by the
loop's task factory and by the done callback, with no Python object per task while the
program runs (per-task Python objects made the garbage collector the bottleneck of
task-heavy programs).  When a report is asked for, :func:`read_records` turns the core's
rows into :class:`TaskRecord` views, completing the names and states of tasks still
running from the live task objects.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from . import _core

__all__ = ["TaskRecord", "read_records", "task_state"]

_EMPTY: Mapping[str, str] = {}


@dataclass
class TaskRecord:
    """What we know about one task.  ``finished_ns`` is None while it runs."""

    id: int
    parent_id: int | None
    coro: str | None
    name: str | None
    labels: Mapping[str, str]
    thread_id: int
    loop_id: int | None
    home_slot: int
    created_ns: int
    finished_ns: int | None
    state: str
    via_factory: bool
    cross_thread_parent: bool
    obj_id: int
    # The nearest ancestor that still has a record (the parent, unless it was folded
    # away), and what the tasks folded away below this one allocated (they hold nothing
    # live: all of it was freed): their bytes stay in this task's subtree.
    up_id: int | None = None
    folded_tasks: int = 0
    folded_alloc_bytes: int = 0
    folded_allocs: float = 0.0
    code: Any = None  # the coroutine's code object: which function it is, for its group



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


def _live_tasks(loops: Iterable[Any]) -> dict[int, Any]:
    """id(task) -> task for every task not finished on the given loops."""
    out: dict[int, Any] = {}
    for loop in loops:
        try:
            tasks = asyncio.all_tasks(loop)
        except Exception:  # a loop torn down under us: its tasks are gone too
            continue
        for t in tasks:
            out[id(t)] = t
    return out


def live_task_names(loops: Iterable[Any]) -> dict[int, tuple[int, str | None, str]]:
    """id(task) -> (record id, name, state) for every task not finished on ``loops`` that
    has a record: what a report made after they stop being watched says of them."""
    out: dict[int, tuple[int, str | None, str]] = {}
    for key, task in _live_tasks(loops).items():
        tid = _core.tid_of(task)
        if tid:
            try:
                name = task.get_name()
            except Exception:
                name = None
            out[key] = (tid, name, task_state(task))
    return out


def read_records(loops: Iterable[Any], at_stop: Mapping[int, tuple[int, str | None, str]] | None = None
                 ) -> dict[int, TaskRecord]:
    """Every task record the core holds, by id.  Tasks still running on ``loops`` get
    their current name and state; those that were running when the profiler stopped
    (``at_stop``, from :func:`live_task_names`) what they had then; the others keep what
    was read when they finished."""
    live = {**(at_stop or {}), **live_task_names(loops)}
    records: dict[int, TaskRecord] = {}
    for (tid, parent, coro, name, labels, ident, serial, slot, created, finished, state, via, cross, obj,
         up, folded, folded_bytes, folded_allocs, code) in _core.records():
        if finished is None and obj in live and live[obj][0] == tid:
            _, live_name, state = live[obj]
            name = live_name if live_name is not None else name  # (get_name() failed: what we had)
        records[tid] = TaskRecord(
            id=tid,
            parent_id=parent,
            coro=coro,
            name=name,
            labels=labels if labels is not None else _EMPTY,
            thread_id=ident,
            loop_id=serial or None,
            home_slot=slot,
            created_ns=created,
            finished_ns=finished,
            state=state,
            via_factory=via,
            cross_thread_parent=cross,
            obj_id=obj,
            up_id=up,
            folded_tasks=folded,
            folded_alloc_bytes=folded_bytes,
            folded_allocs=folded_allocs,
            code=code,
        )
    return records
