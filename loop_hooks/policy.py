"""Instrumenting an event-loop policy in place: every loop it makes gets instrumented.

The policy keeps its identity, its type and its attributes: ``get_event_loop_policy()`` is
still the program's object, ``isinstance(policy, DefaultEventLoopPolicy)`` still holds and
``vars(policy)`` does not change.  While a policy is instrumented, the class that defines
the ``new_event_loop`` it uses has ours instead, which calls the class's own and then, if
its policy is an instrumented one, instruments the loop; the class gets its own back with
the last of them.  (A wrapper object changed the policy's type; instance attributes show
in ``vars()`` and in copies.)  Only ``new_event_loop``: ``get_event_loop`` makes its loop
through it, and must stay asyncio's own, as its "There is no current event loop"
DeprecationWarning (3.12, 3.13) names the first frame outside asyncio, which must be the
program's line; a loop made directly (``SelectorEventLoop()``) is not instrumented,
whether the program sets it as the current loop or not.

Policies are deprecated from Python 3.14 and will go away; there, the policy is read and
set through asyncio's own private accessors, so no DeprecationWarning reaches the user,
and where policies no longer exist ``policies_available()`` is False so the facade can
point at ``loop_factory()``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any, Callable

from .instrument import is_instrumented

__all__ = ["InstrumentedPolicy", "get_policy", "instrument_policy", "policies_available", "set_policy",
           "uninstrument_policy"]


def policies_available() -> bool:
    """Whether this Python still lets a program set an event-loop policy."""
    return hasattr(asyncio, "set_event_loop_policy")


def _accessor(name: str) -> Callable[..., Any]:
    # 3.14 deprecates the public accessors and keeps private ones that do not warn
    events = asyncio.events
    return getattr(events, f"_{name}", None) or getattr(events, name)


def get_policy() -> Any:
    """The current event-loop policy (made now if none is set yet), with no DeprecationWarning."""
    return _accessor("get_event_loop_policy")()


def set_policy(policy: Any) -> None:
    """Set the event-loop policy, with no DeprecationWarning."""
    _accessor("set_event_loop_policy")(policy)


_IMMUTABLE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE
_MISSING = object()

# id(policy) -> (policy, instrument, the class holding our method): the policy is held
# while it is instrumented
_instrumented: dict[int, tuple[Any, Callable[[Any], Any], type]] = {}
_patches: dict[type, list[Any]] = {}  # class -> [what its __dict__ held, policies using our method there]
_lock = threading.RLock()


def _owner(cls: type) -> type:
    """Where our ``new_event_loop`` goes for policies of type ``cls``: the class that
    defines the one they use (``BaseDefaultEventLoopPolicy`` for asyncio's and uvloop's,
    so policies of related classes share it), else, if that class cannot be changed,
    ``cls`` itself."""
    definer = next((k for k in cls.__mro__ if "new_event_loop" in vars(k)), cls)
    return cls if definer.__flags__ & _IMMUTABLE else definer


def _replacement(owner: type, saved: Any) -> Callable[..., Any]:
    """Our ``new_event_loop`` on ``owner``: the class's own (``saved``, or what its bases
    give), then the loop instrumented if ``self`` is an instrumented policy."""

    def new_event_loop(self, *args, **kwargs):
        if saved is _MISSING:
            own = super(owner, self).new_event_loop
        else:
            get = getattr(type(saved), "__get__", None)  # (a function, as a rule: bound to self)
            own = saved if get is None else get(saved, self, type(self))
        loop = own(*args, **kwargs)
        entry = _instrumented.get(id(self))
        if entry is not None and entry[0] is self and not is_instrumented(loop):
            entry[1](loop)
        return loop

    return functools.wraps(getattr(owner, "new_event_loop"))(new_event_loop)


def instrument_policy(policy: Any, instrument: Callable[[Any], Any]) -> bool:
    """Have ``instrument(loop)`` called on every loop ``policy.new_event_loop()`` makes
    (that is not instrumented already), until :func:`uninstrument_policy`.  Returns False
    if ``policy`` already was (nothing done).  Raises TypeError if the policy's class cannot
    be changed (a type defined in C)."""
    with _lock:
        if id(policy) in _instrumented:
            return False
        owner = _owner(type(policy))
        entry = _patches.get(owner)
        if entry is None:
            saved = vars(owner).get("new_event_loop", _MISSING)
            try:
                setattr(owner, "new_event_loop", _replacement(owner, saved))
            except (AttributeError, TypeError):
                raise TypeError(f"cannot instrument event-loop policy of type "
                                f"{type(policy).__module__}.{type(policy).__qualname__}: its class cannot be changed"
                                ) from None
            entry = _patches[owner] = [saved, 0]
        entry[1] += 1
        _instrumented[id(policy)] = (policy, instrument, owner)
        return True


def uninstrument_policy(policy: Any) -> None:
    """Undo :func:`instrument_policy` (nothing if ``policy`` is not instrumented): the
    class gets its own ``new_event_loop`` back once none of its policies is instrumented."""
    with _lock:
        entry = _instrumented.get(id(policy))
        if entry is None or entry[0] is not policy:
            return
        del _instrumented[id(policy)]
        owner = entry[2]
        patch = _patches[owner]
        patch[1] -= 1
        if patch[1]:
            return
        del _patches[owner]
        if patch[0] is _MISSING:
            delattr(owner, "new_event_loop")
        else:
            setattr(owner, "new_event_loop", patch[0])


class _Instrumented(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        entry = _instrumented.get(id(obj))
        return entry is not None and entry[0] is obj


class InstrumentedPolicy(metaclass=_Instrumented):
    """``isinstance(policy, InstrumentedPolicy)`` says whether ``policy`` is instrumented
    now.  No object is of this type: an instrumented policy keeps its own."""
