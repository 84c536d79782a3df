"""Instrumenting an event-loop policy in place: every loop it makes or is given gets instrumented.

The policy keeps its identity, its type and its attributes: ``get_event_loop_policy()`` is
still the program's object, ``isinstance(policy, DefaultEventLoopPolicy)`` still holds and
``vars(policy)`` does not change.  While a policy is instrumented, the class that defines
the ``new_event_loop`` it uses has ours instead, which calls the class's own and then, if
its policy is an instrumented one, instruments the loop; so does the class that defines
its ``set_event_loop`` (a loop made directly, ``SelectorEventLoop()``, and set as the
current loop is instrumented there).  The classes get their own back with the last of
them.  (A wrapper object changed the policy's type; instance attributes show in
``vars()`` and in copies.)  Not ``get_event_loop``: it makes its loop through
``new_event_loop``, and must stay asyncio's own, as its "There is no current event loop"
DeprecationWarning (3.12, 3.13) names the first frame outside asyncio, which must be the
program's line.  A loop made directly and run without being set is not instrumented.
(Loops that bypass the policy, made by a Runner's ``loop_factory``, are the facade's:
``api.instrument_loops_made_any_way``.)

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

from .instrument import is_instrumented, making_loop, renew_lock_after_fork

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


def policy_is(policy: Any) -> bool:
    """Whether ``policy`` is the current event-loop policy, without making one where none
    is set (after ``set_event_loop_policy(None)``, asyncio makes the default when asked)."""
    if hasattr(asyncio.events, "_event_loop_policy"):
        return asyncio.events._event_loop_policy is policy
    return get_policy() is policy


def set_policy(policy: Any) -> None:
    """Set the event-loop policy, with no DeprecationWarning."""
    _accessor("set_event_loop_policy")(policy)


_IMMUTABLE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE
_MISSING = object()

_METHODS = ("new_event_loop", "set_event_loop")

# id(policy) -> (policy, instrument, where our methods are): the policy is held while it
# is instrumented
_instrumented: dict[int, tuple[Any, Callable[[Any], Any], tuple[tuple[type, str], ...]]] = {}
# (class, method name) -> [what the class's __dict__ held, policies using our method there]
_patches: dict[tuple[type, str], list[Any]] = {}
_lock = threading.RLock()
renew_lock_after_fork(globals())


def _owner(cls: type, name: str) -> type:
    """Where our method ``name`` goes for policies of type ``cls``: the class that defines
    the one they use (``BaseDefaultEventLoopPolicy``'s ``new_event_loop`` for asyncio's and
    uvloop's, so policies of related classes share it), else, if that class cannot be
    changed, ``cls`` itself."""
    definer = next((k for k in cls.__mro__ if name in vars(k)), cls)
    return cls if definer.__flags__ & _IMMUTABLE else definer


def _own(owner: type, name: str, saved: Any, policy: Any) -> Callable[..., Any]:
    """The method ``name`` that ``owner`` had for ``policy`` (``saved``, or what its bases give)."""
    if saved is _MISSING:
        return getattr(super(owner, policy), name)
    get = getattr(type(saved), "__get__", None)  # (a function, as a rule: bound to the policy)
    return saved if get is None else get(saved, policy, type(policy))


def _instrument_for(policy: Any, loop: Any) -> None:
    entry = _instrumented.get(id(policy))
    if (entry is not None and entry[0] is policy and loop is not None and not is_instrumented(loop)
            and not getattr(loop, "is_closed", lambda: False)()):
        entry[1](loop)


def _replacement(owner: type, name: str, saved: Any) -> Callable[..., Any]:
    """Our method ``name`` on ``owner``: the class's own, then the loop it made or was
    given instrumented if ``self`` is an instrumented policy."""
    if name == "new_event_loop":

        def new_event_loop(self, *args, **kwargs):
            make = _own(owner, name, saved, self)
            loop = making_loop(make, *args, **kwargs) if id(self) in _instrumented else make(*args, **kwargs)
            _instrument_for(self, loop)
            return loop

        method = new_event_loop
    else:

        def set_event_loop(self, loop, *args, **kwargs):
            result = _own(owner, name, saved, self)(loop, *args, **kwargs)  # its errors first
            _instrument_for(self, loop)
            return result

        method = set_event_loop
    return functools.wraps(getattr(owner, name))(method)


def _unpatch(key: tuple[type, str]) -> None:
    patch = _patches[key]
    patch[1] -= 1
    if patch[1]:
        return
    del _patches[key]
    owner, name = key
    if patch[0] is _MISSING:
        delattr(owner, name)
    else:
        setattr(owner, name, patch[0])


def instrument_policy(policy: Any, instrument: Callable[[Any], Any]) -> bool:
    """Have ``instrument(loop)`` called on every loop ``policy.new_event_loop()`` makes
    and every open loop ``policy.set_event_loop()`` is given (that is not instrumented
    already), until :func:`uninstrument_policy`.  Returns False if ``policy`` already was
    (nothing done).  Raises TypeError if the policy's class cannot be changed (a type
    defined in C)."""
    with _lock:
        if id(policy) in _instrumented:
            return False
        done: list[tuple[type, str]] = []
        for name in _METHODS:
            if not hasattr(type(policy), name):
                continue
            key = (_owner(type(policy), name), name)
            entry = _patches.get(key)
            if entry is None:
                saved = vars(key[0]).get(name, _MISSING)
                try:
                    setattr(key[0], name, _replacement(key[0], name, saved))
                except (AttributeError, TypeError):
                    for k in done:
                        _unpatch(k)
                    raise TypeError(f"cannot instrument event-loop policy of type "
                                    f"{type(policy).__module__}.{type(policy).__qualname__}: its class cannot be changed"
                                    ) from None
                entry = _patches[key] = [saved, 0]
            entry[1] += 1
            done.append(key)
        _instrumented[id(policy)] = (policy, instrument, tuple(done))
        return True


def uninstrument_policy(policy: Any) -> None:
    """Undo :func:`instrument_policy` (nothing if ``policy`` is not instrumented): a class
    gets its own methods back once none of its policies is instrumented."""
    with _lock:
        entry = _instrumented.get(id(policy))
        if entry is None or entry[0] is not policy:
            return
        del _instrumented[id(policy)]
        for key in entry[2]:
            _unpatch(key)


class _Instrumented(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        entry = _instrumented.get(id(obj))
        return entry is not None and entry[0] is obj


class InstrumentedPolicy(metaclass=_Instrumented):
    """``isinstance(policy, InstrumentedPolicy)`` says whether ``policy`` is instrumented
    now.  No object is of this type: an instrumented policy keeps its own."""
