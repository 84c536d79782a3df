"""Attribution routes and their confidence: the model documented in docs/attribution.md.

The C core records *how* a tag reached the allocating thread (through the context, handed
over by our wrappers, or inferred from the thread's start, with a decay phase); this
module turns that into the report's route names and confidence scores.
"""

from __future__ import annotations

from . import _core

__all__ = [
    "OBSERVED",
    "PROPAGATED",
    "INHERITED",
    "INFERRED",
    "UNATTRIBUTED",
    "ROUTES",
    "CONFIDENCE",
    "route_of",
    "inferred_confidence",
]

OBSERVED = "observed"
PROPAGATED = "propagated"
INHERITED = "inherited"
INFERRED = "inferred"
UNATTRIBUTED = "unattributed"
ROUTES = (OBSERVED, PROPAGATED, INHERITED, INFERRED)

#: Confidence per route.  Observed bytes are certain; propagated ones went through a
#: hand-over we performed ourselves (the only doubt: user code inside the job may be doing
#: someone else's work); inherited ones arrived through a context copy we did not see;
#: inferred ones have no context at all (see inferred_confidence for their decay).
CONFIDENCE = {OBSERVED: 1.0, PROPAGATED: 0.95, INHERITED: 0.8, INFERRED: 0.5}

#: Inferred attribution halves at each phase; phase >= INFERRED_PHASES is not attributed.
INFERRED_PHASES = _core.INFERRED_PHASES


def inferred_confidence(phase: int) -> float:
    """Confidence of bytes inferred at a decay phase (0 = fresh thread, owner alive)."""
    return CONFIDENCE[INFERRED] * 0.5**phase


def route_of(core_route: int, phase: int, thread_slot: int, home_slot: int) -> tuple[str, float]:
    """Route name and confidence for a C cell.

    ``home_slot`` is the thread slot of the loop the task was created on: context-routed
    bytes there are the task's own step (observed); anywhere else the context reached the
    thread by a route we did not see (inherited).
    """
    if core_route == _core.ROUTE_HANDED:
        return PROPAGATED, CONFIDENCE[PROPAGATED]
    if core_route == _core.ROUTE_INFERRED:
        return INFERRED, inferred_confidence(phase)
    if thread_slot == home_slot:
        return OBSERVED, CONFIDENCE[OBSERVED]
    return INHERITED, CONFIDENCE[INHERITED]
