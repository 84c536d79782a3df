"""The profiler changes nothing a program can observe."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
import re
import sys
import types
import warnings

import pytest

import memscope_async as ms
from conftest import base_loop


async def _raises():
    await asyncio.sleep(0)
    raise ValueError("boom")


async def _sleeper(d):
    await asyncio.sleep(d)
    return d


async def prog_results():
    t = asyncio.create_task(_sleeper(0), name="named")
    r = await t
    me = asyncio.current_task()
    return r, t.get_name(), me is asyncio.current_task(), type(t.get_coro()).__name__, t.get_coro().__qualname__


async def prog_exception():
    try:
        await asyncio.create_task(_raises())
    except ValueError as e:
        return ("caught", str(e))


async def prog_cancel():
    t = asyncio.create_task(_sleeper(10))
    await asyncio.sleep(0)
    t.cancel("stop")
    try:
        await t
    except asyncio.CancelledError as e:
        return ("cancelled", e.args, t.cancelled())


async def prog_timeout():
    try:
        await asyncio.wait_for(_sleeper(10), 0.01)
    except TimeoutError:
        return "timeout"


async def prog_taskgroup_error():
    got = None
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_raises())
            tg.create_task(_sleeper(10))
    except* ValueError as eg:
        got = ("eg", [str(e) for e in eg.exceptions])
    return got


async def prog_gather_exceptions():
    return [type(r).__name__ for r in await asyncio.gather(_raises(), _sleeper(0), return_exceptions=True)]


async def prog_user_factory():
    loop = asyncio.get_running_loop()
    seen = []

    def factory(loop, coro, **kw):
        seen.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)
    got = loop.get_task_factory() is factory
    r = await asyncio.create_task(_sleeper(0))
    # names as the loop leaves them (CPython 3.13.0-3.13.2 name an unnamed task "None"
    # here); Task-N numbers differ between runs, so only their form is compared
    tasks = [asyncio.create_task(_sleeper(0)), loop.create_task(_sleeper(0)),
             asyncio.create_task(_sleeper(0), name="given"), *asyncio.gather(_sleeper(0))._children]
    await asyncio.gather(*tasks)
    names = [re.sub(r"^Task-\d+$", "Task-N", t.get_name()) for t in tasks]
    loop.set_task_factory(None)
    return r, seen, got, loop.get_task_factory(), names


async def prog_legacy_factory():
    loop = asyncio.get_running_loop()

    def factory(loop, coro):  # the old two-argument form
        return asyncio.Task(coro, loop=loop)

    loop.set_task_factory(factory)
    r = await asyncio.create_task(_sleeper(0))
    loop.set_task_factory(None)
    return r


_MADE = contextvars.ContextVar("made", default=0)


async def _made():
    return _MADE.get()


async def prog_factory_sets_a_context_variable():
    """A task factory runs in its caller's context: what it sets there stays there, and
    each task it makes sees it (the legacy two-argument form and the **kwargs form)."""
    loop = asyncio.get_running_loop()

    def counting(loop, coro, **kw):
        _MADE.set(_MADE.get() + 1)
        return asyncio.Task(coro, loop=loop, **kw)

    def legacy(loop, coro, context=None, **kw):  # (uvloop passes context=None, and eager_start= on 3.13)
        _MADE.set(_MADE.get() + 10)
        return asyncio.Task(coro, loop=loop, context=context, **kw)

    seen = []
    for factory in (counting, legacy):
        loop.set_task_factory(factory)
        seen += [await asyncio.create_task(_made()) for _ in range(3)]
        seen.append(await asyncio.gather(_made(), _made()))
        loop.set_task_factory(None)
    return seen, _MADE.get()


async def prog_get_stack():
    t = asyncio.create_task(_sleeper(0.05))
    await asyncio.sleep(0.01)
    frames = [f.f_code.co_name for f in t.get_stack()]
    await t
    return frames


async def prog_shield_and_direct_task():
    inner = asyncio.Task(_sleeper(0))  # bypasses the factory
    r1 = await asyncio.shield(inner)
    return r1, inner.done()


class _CountingTask(asyncio.Task):
    """A Task subclass that overrides add_done_callback (CPython's own test_asyncio has
    one): ours must not pass through it, or it sees a callback the program never added."""

    seen: list = []

    def add_done_callback(self, fn, *, context=None):
        self.seen.append(getattr(fn, "__qualname__", type(fn).__name__))
        return super().add_done_callback(fn, context=context)


async def prog_task_subclass_overriding_add_done_callback():
    _CountingTask.seen = []
    loop = asyncio.get_running_loop()
    made = _CountingTask(_sleeper(0), loop=loop, name="direct")
    r1 = await made
    loop.set_task_factory(lambda loop, coro, **kw: _CountingTask(coro, loop=loop, **kw))
    r2 = await asyncio.gather(loop.create_task(_sleeper(0)), _sleeper(0))
    loop.set_task_factory(None)
    return r1, r2, list(_CountingTask.seen)


async def prog_eager():
    if sys.version_info < (3, 12):
        return None
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)
    order = []

    async def step(n):
        order.append(n)
        await asyncio.sleep(0)
        order.append(-n)

    t = asyncio.create_task(step(1))
    order.append(0)
    await t
    loop.set_task_factory(None)
    return order


_USER_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("user_var", default="unset")


async def prog_contextvars():
    # What a task's context holds and shares: the profiler tags each new task's context
    # (directly, for the copies its factory makes) and must not change any of this.
    seen = []

    async def child(n):
        seen.append((n, "start", _USER_VAR.get()))
        _USER_VAR.set(f"child-{n}")
        await asyncio.sleep(0)
        seen.append((n, "end", _USER_VAR.get()))
        grand = await asyncio.create_task(grandchild(n))
        return grand, _USER_VAR.get()

    async def grandchild(n):
        return _USER_VAR.get(), contextvars.copy_context().get(_USER_VAR)

    _USER_VAR.set("parent")
    first = asyncio.create_task(child(1))
    _USER_VAR.set("parent-later")
    second = asyncio.create_task(child(2))
    given = contextvars.copy_context()
    given.run(_USER_VAR.set, "given")
    third = asyncio.get_running_loop().create_task(child(3), context=given)
    results = await asyncio.gather(first, second, third)
    async with asyncio.TaskGroup() as tg:
        fourth = tg.create_task(child(4))
    ran = contextvars.copy_context().run(lambda: _USER_VAR.get())
    return results, fourth.result(), sorted(seen), _USER_VAR.get(), ran, given.get(_USER_VAR)


_MANY_VARS = [contextvars.ContextVar(f"many_{i}") for i in range(60)]


async def prog_many_contextvars():
    # Contexts holding many variables: the tag goes into mappings whose first level is
    # full (past 16 keys CPython changes the node's kind) or whose slot for it is taken by
    # another key (a deeper level), as well as the small ones it is usually built into
    # directly.  Every task must see exactly what its creator had set.
    async def child(k):
        values = tuple(v.get(None) for v in _MANY_VARS)
        _MANY_VARS[k].set(f"child-{k}")
        inner = await asyncio.create_task(grandchild())
        return values, inner

    async def grandchild():
        return tuple(v.get(None) for v in _MANY_VARS)

    results = []
    for n in (1, 2, 5, 15, 16, 17, 33, 60):
        for i in range(n):
            _MANY_VARS[i].set((n, i))
        results.append(await asyncio.gather(*(asyncio.create_task(child(k)) for k in range(0, n, 7))))
    return results


_KEPT_INT = contextvars.ContextVar("kept_int")
_KEPT_OBJ = contextvars.ContextVar("kept_obj")


async def prog_kept_tag_mappings():
    # Tasks made one after another as the last ends may be given the tag mapping of one
    # that is gone (_tasks.h, kept_mapping_take), which must hold exactly what a new one
    # would: each child sees the value its creator set just before making it.  And what a
    # kept mapping holds must not outlive the program's own references: an object set in
    # a parent's context is gone once the parent and its children are.  (A code object:
    # one the collector does not track that can be weakly referenced; a mapping holding an
    # object the collector tracks stays tracked, and such a mapping is never kept.)
    import gc
    import weakref

    async def child():
        await asyncio.sleep(0)
        return _KEPT_INT.get(None), type(_KEPT_OBJ.get(None)).__name__

    async def parent(with_obj):
        seen = []
        if with_obj:
            p = compile("x = 1", "<kept>", "exec")
            ref = weakref.ref(p)
            _KEPT_OBJ.set(p)
            del p
        for i in range(8):
            _KEPT_INT.set(i)
            seen.append(await asyncio.create_task(child()))
        return seen, (ref if with_obj else None)

    plain_kids, _ = await asyncio.create_task(parent(False))
    obj_kids, ref = await asyncio.create_task(parent(True))
    for _ in range(3):  # tasks made afterwards, in this context: none of theirs holds the object
        await asyncio.create_task(child())
    gc.collect()
    return plain_kids, obj_kids, ref() is None


async def prog_factory_returns_a_future_with_a_name():
    """A factory whose object has no set_name: 3.11 and 3.12 warn and go on, 3.13 fails."""
    import warnings

    loop = asyncio.get_running_loop()

    def factory(loop, coro, **kwargs):
        coro.close()
        fut = loop.create_future()
        fut.set_result("made")
        return fut

    loop.set_task_factory(factory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = await loop.create_task(_sleeper(0), name="n")
        except Exception as e:
            got = (type(e).__name__, str(e))
        finally:
            loop.set_task_factory(None)
    return got, [(w.category.__name__, str(w.message), w.filename, w.lineno) for w in caught]


def _no_address(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", text)


async def prog_loop_methods_read_as_asyncio_s():
    """Signatures, names and argument errors of the loop methods we stand in for."""
    import inspect

    loop = asyncio.get_running_loop()
    seen = []
    for name in ("create_task", "call_soon", "call_soon_threadsafe", "run_in_executor", "set_task_factory"):
        m = getattr(loop, name)
        try:
            sig = str(inspect.signature(m))
        except (TypeError, ValueError) as e:
            sig = _no_address(f"{type(e).__name__}: {e}")
        seen.append((name, sig, getattr(m, "__name__", None), getattr(m, "__qualname__", None), bool(m.__doc__)))
    calls = [
        lambda co: loop.create_task(co, bogus=1),
        lambda co: loop.create_task(co, "positional name"),
        lambda co: loop.create_task(),
        lambda co: loop.create_task(co, name="n", context=None, bogus=2),
    ]
    for call in calls:
        co = _sleeper(0)
        try:
            await call(co)
            seen.append("ran")
        except TypeError as e:
            seen.append(_no_address(str(e)))
        finally:
            co.close()
    for bad in (5, "factory"):
        try:
            loop.set_task_factory(bad)
            seen.append("set")
        except TypeError as e:
            seen.append(str(e))
    seen.append(loop.get_task_factory() is None)
    return seen


async def prog_work_handed_to_threads_reads_as_the_user_s():
    """A callback sent back from a worker thread fails with asyncio's usual message, and
    an executor sees the name of the function it was given."""
    loop = asyncio.get_running_loop()
    messages = []
    loop.set_exception_handler(lambda _loop, context: messages.append(_no_address(context["message"])))
    failed = asyncio.Event()

    def callback_that_fails():
        loop.call_soon(failed.set)
        raise RuntimeError("in the callback")

    def in_thread():
        loop.call_soon_threadsafe(callback_that_fails)

    submitted = []

    class Pool(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            submitted.append((fn.__name__, fn.__qualname__, fn.__module__))
            return super().submit(fn, *args, **kwargs)

    with Pool(1) as pool:
        await loop.run_in_executor(pool, in_thread)
        await failed.wait()
    loop.set_exception_handler(None)
    return messages, submitted


async def prog_debug_mode_refuses_what_is_not_callable():
    """In debug mode the loop refuses a job or callback that is not callable at the call
    (the wrapper that carries the task's work across must not hide it from that check)."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    out = []
    for send in (lambda: loop.run_in_executor(None, None), lambda: loop.run_in_executor(None, 42),
                 lambda: loop.call_soon_threadsafe(None)):
        try:
            fut = send()
            out.append("accepted")
            if isinstance(fut, asyncio.Future):
                try:
                    await fut
                except TypeError as exc:
                    out.append(f"failed later: {exc}")
        except TypeError as exc:
            out.append(f"refused: {exc}")
    loop.set_debug(False)
    return out


async def prog_loop_log_records_name_the_same_place():
    """asyncio's "Exception in callback" and "Task was destroyed but it is pending!" log
    records name the same file, line and function as without us.  uvloop's default
    handler is Cython: logging names the innermost Python frame, which must not be ours."""
    import gc
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.pathname, record.lineno, record.funcName, record.getMessage()[:30]))

    log = logging.getLogger("asyncio")
    keep, was = Keep(), log.propagate
    log.addHandler(keep)
    log.propagate = False
    try:
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: 1 / 0)
        await asyncio.sleep(0.01)
        loop.create_task(_sleeper(10))  # noqa: RUF006 - dropped on purpose
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        log.removeHandler(keep)
        log.propagate = was
    return records


async def prog_loop_methods_pass_as_methods():
    """Code that looks at the loop class's methods (introspection, copying, pickling by
    name, weak references, an attribute set on one) sees what it sees without us."""
    import copy
    import inspect
    import os
    import pickle
    import weakref

    loop = asyncio.get_running_loop()
    stdlib = not type(loop).__module__.startswith("uvloop")
    seen = []
    for name in ("create_task", "call_soon", "call_soon_threadsafe", "run_in_executor", "call_exception_handler"):
        m = getattr(type(loop), name)
        bound = getattr(loop, name)
        row = [name, inspect.isfunction(m), inspect.ismethod(bound), copy.copy(m) is m, copy.deepcopy(m) is m]
        row.append(pickle.loads(pickle.dumps(m)) is getattr(type(loop), name))
        row += [weakref.ref(m)() is m, weakref.WeakMethod(bound)() == bound]
        if stdlib:  # (uvloop's are Cython's: no source file)
            row += [os.path.basename(inspect.getfile(m)), inspect.getsource(bound).lstrip().split("(")[0]]
        try:
            m.memscope_test_tag = name
            row.append(getattr(type(loop), name).memscope_test_tag)
            del m.memscope_test_tag
        except AttributeError as e:
            row.append(type(e).__name__)
        row.append(hasattr(m, "memscope_test_tag"))
        seen.append(row)
    return seen


async def _returns_one():
    return 1


async def prog_loop_methods_called_wrongly_fail_as_asyncio_s():
    """A call the loop's own method refuses fails with its error, its message and nothing
    of ours as its context (helper-78: "_get_task_factory() got multiple values for
    argument '_original'", and create_task's error had inspect's TypeError as its
    __context__); the coroutine of a refused create_task is gone when the call fails, as
    without us ("never awaited" is warned inside the call's handler, not after it)."""
    loop = asyncio.get_running_loop()
    calls = [
        ("create_task misspelt keyword", lambda: loop.create_task(_returns_one(), nme="x")),
        ("create_task name by position", lambda: loop.create_task(_returns_one(), "n")),
        ("get_task_factory(1)", lambda: loop.get_task_factory(1)),
        ("set_task_factory()", lambda: loop.set_task_factory()),
        ("set_task_factory(None, 2)", lambda: loop.set_task_factory(None, 2)),
        ("set_task_factory(fact=None)", lambda: loop.set_task_factory(fact=None)),
        ("set_default_executor()", lambda: loop.set_default_executor()),
        ("close(1)", lambda: loop.close(1)),
    ]
    seen = []
    for label, call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
                outcome = ("returned",)
            except Exception as e:
                outcome = (type(e).__name__, str(e), e.__context__, e.__cause__)
            gc.collect()
            never_awaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
        seen.append((label, outcome, never_awaited))
    seen.append(("factory after", loop.get_task_factory(), loop.set_task_factory(factory=None)))
    return seen


PROGRAMS = [
    prog_loop_methods_called_wrongly_fail_as_asyncio_s,
    prog_debug_mode_refuses_what_is_not_callable,
    prog_kept_tag_mappings,
    prog_contextvars,
    prog_many_contextvars,
    prog_results,
    prog_exception,
    prog_cancel,
    prog_timeout,
    prog_taskgroup_error,
    prog_gather_exceptions,
    prog_user_factory,
    prog_legacy_factory,
    prog_factory_sets_a_context_variable,
    prog_get_stack,
    prog_shield_and_direct_task,
    prog_eager,
    prog_factory_returns_a_future_with_a_name,
    prog_loop_methods_read_as_asyncio_s,
    prog_loop_methods_pass_as_methods,
    prog_work_handed_to_threads_reads_as_the_user_s,
    prog_task_subclass_overriding_add_done_callback,
    prog_loop_log_records_name_the_same_place,
]


def _run(prog, kind, profiled):
    if not profiled:
        with asyncio.Runner(loop_factory=base_loop(kind)) as r:
            return r.run(prog())
    prof = ms.Profiler().start()
    try:
        with asyncio.Runner(loop_factory=prof.loop_factory(base_loop(kind))) as r:
            return r.run(prog())
    finally:
        prof.close()


@pytest.mark.parametrize("prog", PROGRAMS, ids=lambda p: p.__name__)
def test_identical_results(prog, loop_kind):
    if loop_kind == "uvloop" and prog is prog_legacy_factory:
        pytest.skip("uvloop itself always passes context= to a task factory")
    if loop_kind == "uvloop" and prog is prog_eager and sys.version_info >= (3, 13):
        pytest.skip("uvloop on 3.13 passes eager_start= that asyncio.eager_task_factory rejects")
    plain = _run(prog, loop_kind, False)
    profiled = _run(prog, loop_kind, True)
    assert profiled == plain


def test_factory_set_before_instrumentation_is_kept():
    calls = []

    def factory(loop, coro, **kw):
        calls.append(1)
        return asyncio.Task(coro, loop=loop, **kw)

    loop = asyncio.new_event_loop()
    loop.set_task_factory(factory)
    prof = ms.Profiler().start()
    try:
        prof.instrument_loop(loop)
        assert loop.get_task_factory() is factory
        loop.run_until_complete(loop.create_task(_sleeper(0)))
        assert calls == [1]
        rep = prof.snapshot()
        assert rep.find(coro="_sleeper")
    finally:
        prof.close()
        loop.close()
    assert loop.get_task_factory() is factory  # given back on stop


def test_loop_class_unchanged_for_users():
    loop = asyncio.new_event_loop()
    before = (type(loop).__name__, type(loop).__qualname__, type(loop).__module__, repr(loop).split(" ")[0])
    prof = ms.Profiler().start()
    try:
        prof.instrument_loop(loop)
        after = (type(loop).__name__, type(loop).__qualname__, type(loop).__module__, repr(loop).split(" ")[0])
        assert after == before
        assert isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        prof.close()
        loop.close()


# -- the layer sits on the loop's class, not on the instance ----------------------------
def _loop_kinds():
    kinds = [asyncio.new_event_loop]
    try:
        import uvloop

        kinds.append(uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        pass
    return kinds


@pytest.mark.parametrize("new_loop", _loop_kinds(), ids=lambda f: f.__module__.split(".")[0])
def test_instance_gets_one_attribute_and_class_is_restored(new_loop):
    # More instance attributes would push a stdlib loop past CPython's shared-key limit
    # and slow every method call on it (loop_hooks/instrument.py); one is within it.
    plain = new_loop()
    plain_attrs = set(vars(plain))
    classes = type(plain).__mro__
    own = [dict(k.__dict__) for k in classes]
    prof = ms.Profiler().start()
    loop = new_loop()
    try:
        prof.instrument_loop(loop)
        assert set(vars(loop)) - plain_attrs == {"_ms_state"}
        # a loop of the same class that is not instrumented keeps working, unrecorded
        assert plain.run_until_complete(_sleeper(0)) == 0
        assert loop.run_until_complete(_sleeper(0)) == 0
        rep = prof.snapshot()
        assert len(rep.find(coro="_sleeper")) == 1
    finally:
        prof.close()
        loop.close()
        plain.close()
    assert [dict(k.__dict__) for k in classes] == own
    assert "_ms_state" not in vars(loop)


def test_class_restored_when_an_instrumented_loop_is_collected():
    import gc

    from memscope_async.loop_hooks import instrument

    prof = ms.Profiler().start()
    try:
        loop = asyncio.new_event_loop()
        prof.instrument_loop(loop)
        assert (asyncio.BaseEventLoop, "call_soon") in instrument._patches
        loop.close()
        prof._tagger.loops.discard(loop)
        del loop
        gc.collect()
        assert not instrument._patches
        assert isinstance(asyncio.BaseEventLoop.__dict__["call_soon"], types.FunctionType)
    finally:
        prof.close()


def test_a_librarys_wrapper_set_while_profiling_stays(monkeypatch):
    """An APM agent that wraps a loop method or Thread.start while we profile (or before)
    keeps its wrapper when the loop closes and the profiler stops: we put back only what
    is still ours.  Two sessions under a library's wrapper do not call each other in a
    loop."""
    import threading

    seen = []

    def wrap(owner, name):
        original = owner.__dict__[name]

        def wrapper(self, *args):
            if name == "run_in_executor" or getattr(self, "_target", None) is len:  # (not the pool's)
                seen.append(name)
            return original(self, *args)

        monkeypatch.setattr(owner, name, wrapper)
        return wrapper

    async def main():
        await asyncio.get_running_loop().run_in_executor(None, len, "abc")
        thread = threading.Thread(target=len, args=("abc",))
        thread.start()
        thread.join()

    before = wrap(threading.Thread, "start")  # a library set up before profiling
    for session in range(2):
        ms.install_policy()
        try:
            asyncio.run(main())
            if session == 0:  # and one set up while profiling (say, by the program under the CLI)
                in_executor = wrap(asyncio.BaseEventLoop, "run_in_executor")
                thread_start = wrap(threading.Thread, "start")
                asyncio.run(main())
        finally:
            ms.uninstall_policy()
        assert asyncio.BaseEventLoop.__dict__["run_in_executor"] is in_executor
        assert threading.Thread.__dict__["start"] is thread_start
        seen.clear()
        asyncio.run(main())
        assert seen == ["run_in_executor", "start", "start"], seen
    assert before is not None


def test_a_user_factory_gets_the_arguments_the_loop_gives(loop_kind):
    """The user's factory is called with what the loop passes (no context= where asyncio
    passes none, context=None where uvloop does, the Context where one was given), so a
    factory forwarding **kwargs to a Task class without a context parameter works as
    without us (it failed with TypeError), and its tasks are still attributed."""
    import contextvars

    from conftest import MiB, close_to, run_profiled

    class OldTask(asyncio.Task):
        def __init__(self, coro, *, loop=None, name=None):
            super().__init__(coro, loop=loop, name=name)

    kept = []

    async def child():
        kept.append(bytearray(3 * MiB))
        return 42

    def program(log):
        def factory(loop, coro, **kwargs):
            log.append(sorted(kwargs))
            if kwargs.get("context", 0) is None:
                del kwargs["context"]  # (uvloop passes context=None, 3.13's eager_start=None too)
            if kwargs.get("eager_start", 0) is None:
                del kwargs["eager_start"]
            cls = OldTask if not kwargs else asyncio.Task
            return cls(coro, loop=loop, **kwargs)

        async def main():
            asyncio.get_running_loop().set_task_factory(factory)
            t = asyncio.create_task(child(), name="c")
            given = asyncio.create_task(child(), context=contextvars.copy_context())
            return await t, await given, type(t).__name__, t.get_name(), t

        return main

    plain_log, prof_log = [], []
    with asyncio.Runner(loop_factory=base_loop(loop_kind)) as runner:
        plain = runner.run(program(plain_log)())
    kept.clear()
    result, report = run_profiled(program(prof_log), loop_kind)
    assert result[:4] == plain[:4] == (42, 42, "OldTask", "c")
    assert prof_log == plain_log
    assert close_to(report.task(result[4]).live_bytes, 3 * MiB)
    kept.clear()


def test_a_two_argument_factory_given_a_context_fails_as_without_us(loop_kind):
    """create_task(context=ctx) hands the factory context=ctx; one taking only (loop, coro)
    raises TypeError, with or without the profiler (it used to succeed under it)."""
    import contextvars

    if loop_kind == "uvloop":
        pytest.skip("uvloop passes context= to every factory call: a (loop, coro) factory never works there")

    from conftest import run_profiled

    async def main():
        asyncio.get_running_loop().set_task_factory(lambda loop, coro: asyncio.Task(coro, loop=loop))
        coro = asyncio.sleep(0)
        try:
            asyncio.get_running_loop().create_task(coro, context=contextvars.copy_context())
        except TypeError as exc:
            coro.close()
            return type(exc).__name__
        return "made"

    with asyncio.Runner(loop_factory=base_loop(loop_kind)) as runner:
        plain = runner.run(main())
    profiled, _ = run_profiled(main, loop_kind)
    assert profiled == plain == "TypeError"


def test_a_librarys_descriptor_wrapper_of_thread_start_is_called_bound(monkeypatch):
    """wrapt (OpenTelemetry's threading instrumentation) puts a descriptor on the class,
    bound through __get__: ours must call it as an attribute lookup gives it, not the raw
    object (every Thread.start failed while profiling, and thread pools with it)."""
    import functools
    import queue
    import threading

    class LibWrapper:
        def __init__(self, fn):
            self.fn, self.calls = fn, 0

        def __get__(self, obj, cls=None):
            return functools.partial(self.bound, obj) if obj is not None else self.bound

        def bound(self, inst, *args, **kwargs):
            self.calls += 1
            return self.fn(inst, *args, **kwargs)

        def __call__(self, *args, **kwargs):
            raise TypeError("called without binding")

    start = LibWrapper(threading.Thread.__dict__["start"])
    get = LibWrapper(queue.Queue.__dict__["get"])
    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(queue.Queue, "get", get)

    async def main():
        thread = threading.Thread(target=len, args=("abc",))
        thread.start()
        thread.join()
        q = queue.Queue()
        q.put("abcd")
        return await asyncio.to_thread(lambda: len(q.get()))

    ms.install_policy()
    try:
        assert asyncio.run(main()) == 4
    finally:
        ms.uninstall_policy()
    assert start.calls >= 2 and get.calls == 1  # (to_thread's pool started a thread too)
    assert threading.Thread.__dict__["start"] is start and queue.Queue.__dict__["get"] is get


def test_user_subclass_overriding_loop_methods():
    seen = []

    class MyLoop(asyncio.SelectorEventLoop):
        def call_soon(self, callback, *args, context=None):
            seen.append("call_soon")
            return super().call_soon(callback, *args, context=context)

        def create_task(self, coro, *, name=None, context=None):
            seen.append("create_task")
            return super().create_task(coro, name=name, context=context)

    async def main():
        t = asyncio.get_running_loop().create_task(_sleeper(0), name="kid")
        await t
        return t.get_name()

    prof = ms.Profiler().start()
    try:
        with asyncio.Runner(loop_factory=prof.loop_factory(MyLoop)) as runner:
            assert runner.run(main()) == "kid"
        rep = prof.snapshot()
    finally:
        prof.close()
    assert "call_soon" in seen and "create_task" in seen
    kid = rep.find(name="kid")
    assert len(kid) == 1 and kid[0].coro.endswith("_sleeper")
    assert kid[0].parent_id == rep.find(coro="main")[0].id
    assert MyLoop.__dict__["call_soon"].__qualname__.endswith("MyLoop.call_soon")


def _create_task_marked_closed(loop, coro):
    """loop.create_task(coro) while loop._closed is True (then False again): asyncio's
    error, and the coroutine closed without running."""
    loop._closed = True
    try:
        with pytest.raises(RuntimeError, match="^Event loop is closed$"):
            loop.create_task(coro)
    finally:
        loop._closed = False
        coro.close()


def test_create_task_checks_the_loop_is_open_as_asyncio_does():
    # create_task first calls loop._check_closed(): asyncio's own method is done in C
    # (it tests loop._closed), a loop class's own override is called.  With the eager
    # task factory (3.12+), a check that let the call through would run the coroutine.
    checks, ran = [], []

    class CheckingLoop(asyncio.SelectorEventLoop):
        def _check_closed(self):
            checks.append(1)
            super()._check_closed()

    async def first_step():
        ran.append(1)

    prof = ms.Profiler().start()
    try:
        for cls in (asyncio.SelectorEventLoop, CheckingLoop):
            loop = cls()
            try:
                prof.instrument_loop(loop)
                if sys.version_info >= (3, 12):
                    loop.set_task_factory(asyncio.eager_task_factory)
                loop.run_until_complete(loop.create_task(_sleeper(0)))

                async def while_marked_closed():
                    # closed without close() (which hands the loop back first): the same
                    # error as asyncio's, before anything runs (eager tasks start only
                    # on a running loop)
                    _create_task_marked_closed(loop, first_step())

                loop.run_until_complete(while_marked_closed())
            finally:
                loop.close()
        assert ran == []
        assert len(checks) >= 2  # the override ran for both create_task calls
        assert prof.snapshot().find(coro="_sleeper")
    finally:
        prof.close()


def _on_a_new_loop(profiled: bool, main):
    """``main(loop)`` run to its end on a new loop, instrumented by a profiler of its own if
    ``profiled``."""
    prof = ms.Profiler().start() if profiled else None
    loop = asyncio.new_event_loop()
    try:
        if prof is not None:
            prof.instrument_loop(loop)
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()
        if prof is not None:
            prof.close()


def test_create_task_sees_a_check_closed_or_closed_changed_after_tasks_were_made():
    # create_task's check that the loop is open (done in C for asyncio's _check_closed):
    # a method put on the loop's class after tasks were made (the class then has a new
    # version) is called as often as without the profiler, and _closed is read as it is
    # at each call, bool or not.
    from unittest import mock

    calls = []

    async def main(loop):
        for _ in range(3):
            await loop.create_task(_sleeper(0))
        real = type(loop)._check_closed

        def spy(self):
            calls.append(1)
            real(self)

        with mock.patch.object(type(loop), "_check_closed", spy):
            await loop.create_task(_sleeper(0))
        await loop.create_task(_sleeper(0))
        _create_task_marked_closed(loop, _sleeper(0))
        loop._closed = 0  # not a bool: read as asyncio's method reads it
        await loop.create_task(_sleeper(0))
        loop._closed = False
        return len(calls)

    plain = _on_a_new_loop(False, main)
    calls.clear()
    assert plain >= 1
    assert _on_a_new_loop(True, main) == plain


def test_create_task_calls_a_check_closed_set_on_the_loop_itself():
    # The loop's own attribute wins over its class's method, as in asyncio's create_task:
    # as many calls of it (create_task's, call_soon's) with the profiler as without.
    from unittest import mock

    calls = []

    async def main(loop):
        real = loop._check_closed

        def spy():
            calls.append(1)
            real()

        with mock.patch.object(loop, "_check_closed", spy):
            before = len(calls)
            t = loop.create_task(_sleeper(0))
            made = len(calls) - before
            await t
            return made

    plain = _on_a_new_loop(False, main)
    assert plain >= 1
    assert _on_a_new_loop(True, main) == plain
