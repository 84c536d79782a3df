"""An event-loop policy wrapper: every loop the wrapped policy makes gets instrumented.

Policies are deprecated from Python 3.14 and will go away; there, the wrapper is built
without letting a DeprecationWarning reach the user, and where they no longer exist
``policies_available()`` is False so the facade can point at ``loop_factory()``.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any, Callable

__all__ = ["InstrumentedPolicy", "policies_available"]


def _policy_base() -> type | None:
    events = asyncio.events
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(events, "_AbstractEventLoopPolicy", None) or getattr(events, "AbstractEventLoopPolicy", None)


def policies_available() -> bool:
    return _policy_base() is not None and hasattr(asyncio, "set_event_loop_policy")


_Base: Any = _policy_base() or object


class InstrumentedPolicy(_Base):  # type: ignore[misc, valid-type]
    """Delegates to ``base``; loops it creates (or hands out) go through ``instrument``."""

    def __init__(self, base: Any, instrument: Callable[[Any], Any]) -> None:
        self._base = base
        self._instrument = instrument

    @property
    def base(self) -> Any:
        return self._base

    def new_event_loop(self):
        return self._instrument(self._base.new_event_loop())

    def get_event_loop(self):
        loop = self._base.get_event_loop()
        return self._instrument(loop) if loop is not None else loop

    def set_event_loop(self, loop):
        return self._base.set_event_loop(loop)

    def get_child_watcher(self):  # pragma: no cover - removed in 3.14
        return self._base.get_child_watcher()

    def set_child_watcher(self, watcher):  # pragma: no cover - removed in 3.14
        return self._base.set_child_watcher(watcher)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)
