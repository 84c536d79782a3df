"""The entry points users know: install_policy(), run(), loop_factory(), instrument(), @profile."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, ParamSpec, Protocol, TypeVar, overload

from .loop_hooks.imports import when_imported
from .loop_hooks.instrument import is_instrumented, loop_thread_here, making_loop, renew_lock_after_fork
from .loop_hooks.policy import (
    get_policy, instrument_policy, policies_available, policy_is, set_policy, uninstrument_policy,
)
from .attribution.report import Report
from .exporters import ExportError
from .profiler import Profiler, ProfilerError, instrument_or_warn

__all__ = ["install_policy", "uninstall_policy", "loop_factory", "LoopFactory", "run", "instrument", "profile"]

T = TypeVar("T")
P = ParamSpec("P")
R_co = TypeVar("R_co", covariant=True)


class Profiled(Protocol[P, R_co]):
    """What ``@profile`` makes of a coroutine function (for type checkers): called with its
    arguments, it returns a coroutine of its result; ``last_report`` is the report of the
    last session that ended (None before one has)."""

    last_report: Report | None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R_co]: ...


_policy_lock = threading.Lock()
renew_lock_after_fork(globals(), "_policy_lock", threading.Lock)
# (policy instrumented, policy it replaced or None, profiler, undo of instrument_loops_made_any_way)
_policy_state: tuple[Any, Any, Profiler, Callable[[], None]] | None = None
# install_policy() calls that joined the command's profiler, not yet undone: for each, the
# uvloop policy it set and the one that policy replaced (None, None: it set none)
_policy_joined: list[tuple[Any, Any]] = []


def _unhook_policy_in_forked_child() -> None:
    """In a child made by fork the profiler has stopped (the tracker's at-fork handler):
    the policy install_policy() instrumented stays the child's current policy, as the
    program set it, but with its own methods back, and what was put in place for loops
    made any way comes out (a later uninstall_policy() still restores what it replaced)."""
    state = _policy_state
    if state is None:
        return
    policy, _replaced, _profiler, undo = state
    try:
        undo()
        uninstrument_policy(policy)
    except Exception:  # (the child goes on, whatever)
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unhook_policy_in_forked_child)


def _no_policies_error() -> ProfilerError:
    return ProfilerError(
        "event-loop policies do not exist in this Python; use "
        "asyncio.run(main(), loop_factory=memscope_async.loop_factory()) or memscope_async.run(main())"
    )


def install_policy(*, uvloop: bool = False, **options: Any) -> Profiler:
    """Start a profiler and instrument the current event-loop policy so every new loop is
    instrumented.  The policy stays the same object, of the same type; ``uvloop=True``
    installs uvloop's policy instead.  Options are those of :class:`Profiler`.  Returns
    the running profiler; :func:`uninstall_policy` undoes it.  Raises
    :class:`ProfilerError` if a profiler is already running, except in a program run by
    ``memscope-async run``: there the program's own profiling joins the command's
    profiler (which already instruments every loop), and this returns it."""
    global _policy_state
    if not policies_available():
        raise _no_policies_error()
    with _policy_lock:
        if _policy_state is not None and _joins_ambient(_policy_state[2], "install_policy()", options):
            joined: tuple[Any, Any] = (None, None)
            if uvloop:  # the program's loops are to be uvloop's, as they would be without the command
                policy, current = _uvloop_module().EventLoopPolicy(), get_policy()
                instrument_policy(policy, instrument_or_skip(_policy_state[2]))
                set_policy(policy)
                joined = (policy, current)
            _policy_joined.append(joined)
            return _policy_state[2]
        if _policy_state is not None:
            raise ProfilerError("install_policy() is already in effect; call uninstall_policy() first")
        current = get_policy()
        policy = _uvloop_module().EventLoopPolicy() if uvloop else current
        profiler = Profiler(**options)._start()
        try:
            instrument_policy(policy, instrument_or_skip(profiler))
        except TypeError as exc:
            profiler.stop()
            raise ProfilerError(f"{exc}; use memscope_async.loop_factory() instead") from None
        if policy is not current:
            set_policy(policy)
        undo = instrument_loops_made_any_way(instrument_or_skip(profiler))
        _policy_state = (policy, current if policy is not current else None, profiler, undo)
    return profiler


def uninstall_policy() -> Profiler | None:
    """Undo :func:`install_policy`: the policy's class gets its own method back (with
    ``uvloop=True``, the policy it replaced comes back, unless the program has set
    another since), and the profiler stops.  Returns that profiler (its data is still
    there for snapshot/export), or None.  In a program run by ``memscope-async run``, only
    what the program's own install_policy() did is undone: the command's profiling goes
    on (with nothing of the program's to undo, this returns None, as it would without
    the command)."""
    with _policy_lock:
        state = _policy_state
        if state is not None and _policy_joined:  # the program's own, joined to the command's: kept
            _undo_joined(*_policy_joined.pop())
            return state[2]
        if state is not None and state[2].ambient:  # the command's own: not the program's to undo
            return None
    return _uninstall()


def _uninstall() -> Profiler | None:
    """uninstall_policy() itself: whatever install_policy() is in effect is undone."""
    global _policy_state
    with _policy_lock:
        state = _policy_state
        _policy_state = None
    if state is None:
        return None
    policy, replaced, profiler, undo = state
    undo()
    uninstrument_policy(policy)
    if replaced is not None and policy_is(policy):
        set_policy(replaced)
    profiler.stop()
    return profiler


def _undo_joined(policy: Any, replaced: Any) -> None:
    """Undo a joined install_policy(): the uvloop policy it set (if any) goes, as
    uninstall_policy() undoes ``uvloop=True``."""
    if policy is not None:
        uninstrument_policy(policy)
        if policy_is(policy):
            set_policy(replaced)


def end_command_policy() -> Profiler | None:
    """The end of ``memscope-async run``'s profiling: what the program's own joined
    install_policy() calls left in place is undone (their uninstall_policy() may never
    come), then the command's own install_policy(); returns its profiler."""
    with _policy_lock:
        joined = _policy_joined[::-1]
        _policy_joined.clear()
    for entry in joined:
        _undo_joined(*entry)
    return _uninstall()


def instrument_loops_made_any_way(instrument: Callable[[Any], Any], *, current_policy: bool = False
                                  ) -> Callable[[], None]:
    """Have ``instrument(loop)`` called on the loops that bypass an instrumented policy:
    those an ``asyncio.Runner`` makes with a ``loop_factory`` (``asyncio.run(...,
    loop_factory=)``, ``uvloop.run``; not our own :class:`LoopFactory`), and those of a
    policy the program sets (``uvloop.install()``, ``asyncio.set_event_loop_policy(...)``),
    which is instrumented in place and stays the program's own object; with
    ``current_policy``, the policy in effect now is instrumented so too.  Returns the
    function that undoes all of it."""
    runner_init = asyncio.runners.Runner.__init__
    events = asyncio.events
    # 3.14's deprecated set_event_loop_policy calls a private setter: wrapping that one
    # leaves its DeprecationWarning pointing at the program's line, not at ours
    name = "_set_event_loop_policy" if hasattr(events, "_set_event_loop_policy") else "set_event_loop_policy"
    setter = getattr(events, name, None) if policies_available() else None
    holders = [m for m in (events, asyncio) if getattr(m, name, None) is setter] if setter else []
    ours: list[Any] = []  # the policies instrumented here
    unseen: set[type] = set()

    @functools.wraps(runner_init)
    def init(self: Any, *args: Any, loop_factory: Any = None, **kwargs: Any) -> None:
        if loop_factory is not None and not isinstance(loop_factory, LoopFactory):
            loop_factory = _instrumenting(loop_factory, instrument)
        runner_init(self, *args, loop_factory=loop_factory, **kwargs)

    def instrument_set(policy: Any) -> None:
        try:
            if instrument_policy(policy, instrument):
                ours.append(policy)
        except TypeError as exc:  # a policy class defined in C: its loops go unseen
            if type(policy) not in unseen:
                unseen.add(type(policy))
                with contextlib.suppress(Exception):
                    sys.stderr.write(f"memscope-async: warning: {exc}; the loops it makes are not profiled\n")

    # asyncio makes the default policy when it is first asked for one (after a reset to
    # None too): it is instrumented then, and a reset stays a reset (None) until then.
    # (A policy the program replaces stays instrumented, and held, while we run: the
    # program, or another thread, may still make loops with it.)
    maker = getattr(events, "_init_event_loop_policy", None) if setter is not None else None
    live = True  # False once undone: wrappers left under a program's own pass through

    def set_event_loop_policy(policy: Any) -> None:
        setter(policy)  # asyncio's own checks and errors first
        if not live:
            return
        if policy is not None or getattr(events, "_init_event_loop_policy", None) is not make_default_policy:
            # (for None with no maker of ours to watch: the default, made now)
            instrument_set(get_policy())

    def make_default_policy() -> None:
        maker()
        made = getattr(events, "_event_loop_policy", None)
        if live and made is not None:
            instrument_set(made)

    if current_policy and policies_available():
        instrument_set(get_policy())

    # uvloop.new_event_loop() makes its loop without the policy: ours makes it in a thread
    # marked as a loop thread (its ~256 KiB of internals are not inferred to a task that
    # started the thread) and instruments it, as a Runner's loop_factory is
    uvloop_made: list[tuple[Any, Any, Any]] = []  # (module, ours, what it replaced)

    def wrap_uvloop(module: Any) -> None:
        original = getattr(module, "new_event_loop", None)
        if not live or not callable(original):
            return

        @functools.wraps(original)
        def new_event_loop(*args: Any, **kwargs: Any) -> Any:
            if not live:
                return original(*args, **kwargs)
            return instrument(making_loop(functools.partial(original, *args, **kwargs)))

        module.new_event_loop = new_event_loop
        uvloop_made.append((module, new_event_loop, original))

    asyncio.runners.Runner.__init__ = init  # type: ignore[method-assign]
    if setter is not None:
        functools.update_wrapper(set_event_loop_policy, setter)
        for holder in holders:
            setattr(holder, name, set_event_loop_policy)
    if maker is not None:
        functools.update_wrapper(make_default_policy, maker)
        events._init_event_loop_policy = make_default_policy
    stop_waiting = when_imported("uvloop", wrap_uvloop)

    def undo() -> None:
        nonlocal live
        live = False
        stop_waiting()
        for module, wrapper, original in uvloop_made:
            if getattr(module, "new_event_loop", None) is wrapper:
                module.new_event_loop = original
        if asyncio.runners.Runner.__init__ is init:
            asyncio.runners.Runner.__init__ = runner_init  # type: ignore[method-assign]
        for holder in holders:
            if getattr(holder, name, None) is set_event_loop_policy:
                setattr(holder, name, setter)
        if maker is not None and getattr(events, "_init_event_loop_policy", None) is make_default_policy:
            events._init_event_loop_policy = maker
        for policy in ours:
            uninstrument_policy(policy)

    return undo


def _instrumenting(factory: Callable[[], Any], instrument: Callable[[Any], Any]) -> Callable[[], Any]:
    """``factory``, its loops instrumented."""

    def make() -> Any:
        return instrument(making_loop(factory))

    return make


def instrument_or_skip(profiler: Profiler) -> Callable[[Any], Any]:
    """``profiler.instrument_loop`` for loops the program makes its own way (its policy,
    its loop factory), through :func:`instrument_or_warn`: the loop, instrumented if it can be."""

    def instrument(loop: Any) -> Any:
        instrument_or_warn(profiler, loop)
        return loop

    return instrument


class LoopFactory:
    """A loop factory (for ``asyncio.run(..., loop_factory=)``, ``asyncio.Runner`` and
    ``uvloop.run``) whose loops are instrumented.

    It reports to ``profiler`` if given, else to the profiler already running, else to a
    profiler of its own, started with the first loop and stopped (and exported to
    ``report``, if given) when the last of its loops closes.  A ``profiler`` given that is
    not running when a loop is made is run that way too.  ``.profiler`` is that profiler
    once a loop has been made.

    Joining the profiler already running: its report so far is exported to ``report``
    when the last of the factory's loops closes (if that profiler still runs then: one
    that stops first takes its hooks out of the loops); options it does not have raise
    :class:`ProfilerError` at the first loop (in a program run by ``memscope-async run``,
    the command's profiler is joined all the same, and what it cannot honour is said on
    stderr).
    """

    def __init__(self, base: Callable[[], Any] | None = None, *, profiler: Profiler | None = None,
                 report: str | Path | None = None, **options: Any) -> None:
        self.base = base
        self.profiler = profiler
        self.report = report
        self._given = profiler is not None
        self._options = options
        self._owned = False
        self._open: set[int] = set()
        self._lock = threading.Lock()
        if options:
            Profiler(**options)  # validate now, not at the first loop

    def __call__(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            prof = self.profiler
            if prof is not None and self._given and not prof.active:
                # the profiler it was given is not running: run it for these loops, as the
                # factory's own (a profiler that records nothing would be a silent loss)
                prof._start()
                self._owned = True
            elif prof is None or not prof.active:  # (its own, or the one it joined, has stopped)
                from .profiler import current_profiler

                # loops made for a profiler that stopped before they closed: theirs, not the next one's
                self._open.clear()

                running = current_profiler()
                if running is not None and running.active and self._joins(running):
                    prof = running
                    self._owned = False
                else:
                    prof = Profiler(**self._options)._start()
                    self._owned = True
                self.profiler = prof
        loop = making_loop(self.base or _default_loop)
        if not instrument_or_warn(prof, loop):
            # it runs unprofiled; a profiler started for it alone must not stay on
            with self._lock:
                idle = self._owned and not self._open
            if idle and prof.active:
                prof.stop()
                if self.report is not None:
                    _export_quietly(prof, self.report)
            return loop
        if self._owned or self.report is not None:
            with self._lock:
                self._open.add(id(loop))
            loop._ms_state.on_close = self._loop_closed
        return loop

    def _joins(self, running: Profiler) -> bool:
        """Whether this factory's loops report to ``running`` (else: a profiler of its own,
        which is refused while ``running`` runs)."""
        if _joins_ambient(running, "loop_factory()", self._options):
            return True
        differ = _differing(running, self._options)
        if differ:
            raise ProfilerError(
                "loop_factory(): a memscope-async profiler is already running, whose "
                f"{_listed(differ)} differ{'s' if len(differ) == 1 else ''} "
                "from the options given; stop it first, or give none to report to it")
        return True

    def _loop_closed(self, loop: Any) -> None:
        with self._lock:
            if id(loop) not in self._open:
                return
            self._open.discard(id(loop))
            last = not self._open
        if last and self.profiler is not None and self.profiler.active:
            if self._owned:
                self.profiler.stop()
            if self.report is not None:
                _export_quietly(self.profiler, self.report)


def loop_factory(base: Callable[[], Any] | None = None, *, profiler: Profiler | None = None,
                 report: str | Path | None = None, **options: Any) -> LoopFactory:
    """Return a :class:`LoopFactory`.  ``base`` makes the loops (default: the policy's
    ``asyncio.new_event_loop``; e.g. ``uvloop.new_event_loop``)."""
    return LoopFactory(base, profiler=profiler, report=report, **options)


def run(main: Awaitable[T], *, report: str | Path | None = None, uvloop: bool = False, debug: bool | None = None,
        loop_factory: Callable[[], Any] | None = None, **options: Any) -> T:
    """Like ``asyncio.run(main)``, under a profiler; writes the JSON report to ``report``
    when given.  Returns main's result (or raises its exception) exactly as asyncio.run.
    The profiler is ``memscope_async.current_profiler()`` afterwards.  In a program run by
    ``memscope-async run``, main runs under the command's profiler (its options are the
    command's; the report, if asked for, is that profiler's so far)."""
    from .profiler import current_profiler

    joined = False
    try:
        if asyncio._get_running_loop() is not None:  # as asyncio.run checks, before anything starts
            raise RuntimeError("memscope_async.run() cannot be called from a running event loop")
        profiler = Profiler(**options)
        base = loop_factory or (_uvloop_module().new_event_loop if uvloop else None)
        running = current_profiler()
        if running is not None and _joins_ambient(running, "run()", options):
            profiler, joined = running, True
        else:
            profiler._start()
    except BaseException:
        if asyncio.iscoroutine(main):
            main.close()  # it will never run: no "coroutine was never awaited" warning
        raise
    try:
        with asyncio.Runner(debug=debug, loop_factory=LoopFactory(base, profiler=profiler)) as runner:
            return runner.run(main)
    finally:
        if not joined:
            profiler.stop()
        if report is not None:
            _export_quietly(profiler, report)


def instrument(loop: asyncio.AbstractEventLoop | None = None, **options: Any) -> Profiler:
    """Instrument an already running loop (default: the running one) from inside it.

    Uses the running profiler if there is one, else starts one (stopped when the loop
    closes).  The calling task and every task created from now on are attributed; tasks
    that already exist are picked up at their next step."""
    if loop is None:
        loop = asyncio.get_running_loop()
    from .profiler import current_profiler

    prof = current_profiler()
    started = prof is None or not prof.active
    if started:
        prof = Profiler(**options)._start()

        def stop_with_its_loop(closed: Any) -> None:
            # (the tagger is every instrumented loop's: a loop that joined this profiler,
            # a Runner's in another thread, closing first must not stop it)
            if closed is loop:
                prof._tagger.on_loop_close = None
                prof.stop()

        prof._tagger.on_loop_close = stop_with_its_loop
    else:
        differ = _differing(prof, options)
        if differ:
            raise ProfilerError(
                f"a profiler is already running ({_listed(differ)}); "
                f"instrument() uses it and cannot change {', '.join(differ)}"
            )
    if loop is asyncio._get_running_loop():
        loop_thread_here()
    if not instrument_or_warn(prof, loop):
        if started:  # (its closing would have stopped it: it runs unprofiled)
            prof._tagger.on_loop_close = None
            prof.stop()
        return prof
    if asyncio.current_task() is not None and loop is asyncio.get_running_loop():
        prof.tag_current_task()
    return prof


@overload
def profile(fn: Callable[P, Awaitable[T]]) -> Profiled[P, T]: ...
@overload
def profile(
    fn: None = None, *, report: str | Path | None = None, **options: Any
) -> Callable[[Callable[P, Awaitable[T]]], Profiled[P, T]]: ...


def profile(fn: Callable[..., Awaitable[Any]] | None = None, *, report: str | Path | None = None, **options: Any) -> Any:
    """Decorator for coroutine functions: their calls run profiled.

    A call made while no profiler runs starts one (with ``options``) on the running loop;
    calls of the same function made while it runs (concurrently, on that loop or another)
    join it, and when the last of them ends it stops, its report is kept as
    ``wrapper.last_report`` and written to ``report`` (if given).  A call made while
    another profiler runs just runs, attributed by that one (with a RuntimeWarning, once,
    if this decorator was given a report or options it cannot honour); in a program run
    by ``memscope-async run``, that profiler is the command's, and as ``run()`` does there,
    with ``report`` given each call's end writes its report so far there and keeps it as
    ``last_report`` (the whole session's: a cost that grows with it); without, the calls'
    tasks are in the command's report only.  A call whose profiler cannot start (another
    allocator hook in the way) just runs, with a RuntimeWarning (once).  Bad options are
    refused when decorating."""
    Profiler(**options)  # checks them now (ProfilerError, or TypeError for an unknown one)

    def decorate(func: Callable[..., Awaitable[T]]):
        if not asyncio.iscoroutinefunction(func):
            raise TypeError(f"@memscope_async.profile needs a coroutine function, got {func!r}")
        done = threading.Condition()
        session: dict[str, Any] = {"prof": None, "calls": 0, "closing": False, "warned": False}

        def enter() -> Profiler | None:
            """The profiler this call runs under, if it is ours (counted in); None if another one runs."""
            from .profiler import current_profiler

            code = getattr(func, "__code__", None)
            where = (code.co_filename, code.co_firstlineno) if code is not None else None
            with done:
                # a session being closed (its last call ended in another thread) is ours
                # until its report is taken: a call now waits for that, then starts anew
                done.wait_for(lambda: not session["closing"])
                prof = session["prof"]
                if prof is None:
                    running = current_profiler()
                    if running is not None and running.active:
                        if running.ambient:  # memscope-async run's: with report=, its report at the call's end
                            if not session["warned"]:
                                session["warned"] = True
                                if options:
                                    _joins_ambient(running, f"@profile ({func.__qualname__})", options, where)
                                if report is None:
                                    _warn(f"memscope-async: {func.__qualname__} runs under memscope-async run's "
                                          "profiler: its tasks are in the command's report, and last_report "
                                          "stays None", where=where)
                            return None
                        if (report is not None or options) and not session["warned"]:
                            session["warned"] = True
                            _warn(f"memscope-async: {func.__qualname__} runs under a profiler started elsewhere: "
                                  "its own report and options are not used", where=where)
                        return None
                    try:
                        prof = session["prof"] = Profiler(**options)._start()
                    except ProfilerError as exc:  # (tracemalloc's hooks in the way of a new session)
                        if not session["warned"]:
                            session["warned"] = True
                            _warn(f"memscope-async: {func.__qualname__} runs unprofiled: {exc}", where=where)
                        return None
                session["calls"] += 1
            try:
                loop = asyncio.get_running_loop()
                if not is_instrumented(loop):
                    prof.instrument_loop(loop)
                prof.tag_current_task()
            except Exception:  # the call runs all the same, if unattributed
                pass
            return prof

        def leave(prof: Profiler) -> None:
            with done:
                session["calls"] -= 1
                if session["calls"]:
                    return
                session["closing"] = True
            try:
                prof.stop()
                taken = wrapper.last_report = prof.snapshot()  # type: ignore[attr-defined]
                if report is not None:
                    _export_quietly(prof, report, taken)
            finally:
                with done:
                    session["prof"] = None
                    session["closing"] = False
                    done.notify_all()

        def leave_ambient() -> None:
            from .profiler import current_profiler

            running = current_profiler()
            if report is None or running is None or not running.ambient:
                return  # (a snapshot of the whole session at every call would stall the loop)
            try:
                taken = wrapper.last_report = running.snapshot()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - never raised into the program
                return
            _export_quietly(running, report, taken)  # (the same report: one snapshot, one collection)

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> T:
            prof = enter()
            if prof is None:
                try:
                    return await func(*args, **kwargs)
                finally:
                    leave_ambient()
            try:
                return await func(*args, **kwargs)
            finally:
                leave(prof)

        wrapper.last_report = None  # type: ignore[attr-defined]
        return wrapper

    return decorate(fn) if fn is not None else decorate


# -- helpers --------------------------------------------------------------------------
def _export_quietly(profiler: Profiler, path: str | Path, report: Report | None = None) -> None:
    """Export (``report`` if the caller has just taken it, else a new snapshot), turning a
    failure into a warning: the user's program has already run and must not be harmed by
    the profiler."""
    if profiler.forked:
        return  # a forked child's copy of the profile: the parent writes the report
    try:
        if report is None:
            profiler.export(path)
        else:
            profiler._write(report, path)
    except ExportError as exc:  # (its message names the file and the reason)
        _warn(f"memscope-async: {exc}", where=_program_line())
    except Exception as exc:  # noqa: BLE001 - reported, never raised into user code
        _warn(f"memscope-async: could not write the report to {path}: {exc!r}", where=_program_line())


def _warn(message: str, *, stacklevel: int = 2, where: tuple[str, int] | None = None) -> None:
    """A RuntimeWarning for the user (at ``where``, a file and line, if given), which never
    raises into their program: where the warning filters make it an error (``-W error``),
    it is written to stderr as one line instead."""
    try:
        if where is not None:
            warnings.warn_explicit(message, RuntimeWarning, where[0], where[1])
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
    except Warning:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"{message}\n")


def _joins_ambient(running: Profiler, what: str, options: dict[str, Any],
                   where: tuple[str, int] | None = None) -> bool:
    """Whether a profiler the program starts with ``what`` joins ``running`` instead: the
    profiler of ``memscope-async run`` (ambient), still running.  Options it cannot honour
    are said, once per call, as a warning at ``where`` (default: the program's line that
    led here)."""
    if not (running.active and running.ambient):
        return False
    differ = _differing(running, options)
    if differ:
        _warn(f"memscope-async: {what} joins the profiler of memscope-async run, whose "
              f"{_listed(differ)} stay{'s' if len(differ) == 1 else ''}",
              where=where or _program_line())
    return True


_NOT_THE_PROGRAMS = tuple(os.path.dirname(m.__file__) + os.sep
                          for m in (asyncio, sys.modules[__package__], sys.modules[f"{__package__}.loop_hooks"]))


def _program_line() -> tuple[str, int] | None:
    """The innermost caller's file and line outside this package and asyncio (a loop
    factory is called by asyncio's Runner; uvloop.run is in uvloop's __init__)."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith(_NOT_THE_PROGRAMS) and not name.endswith(f"{os.sep}uvloop{os.sep}__init__.py"):
            return name, f.f_lineno
        f = f.f_back
    return None


def _listed(options: dict[str, Any]) -> str:
    """``name=value, ...`` for a message."""
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _differing(running: Profiler, options: dict[str, Any]) -> dict[str, Any]:
    """The options given, as a profiler would take them (the same errors for bad names or
    values as when one starts), that ``running`` has otherwise: name -> its value.  A
    sample interval alone asks for sampled mode, and means nothing to a profiler in exact
    mode."""
    wanted, settings = Profiler(**options)._settings(), running._settings()
    asked = list(options) + (["mode"] if "sample_interval" in options and "mode" not in options else [])
    return {k: settings[k] for k in asked if wanted[k] != settings[k] and
            not (k == "sample_interval" and settings["mode"] == "exact")}


def _uvloop_module():
    try:
        import uvloop
    except ImportError:
        raise ProfilerError("uvloop is not installed: pip install 'memscope-async[uvloop]'") from None
    return uvloop


def _default_loop() -> asyncio.AbstractEventLoop:
    return asyncio.new_event_loop()
