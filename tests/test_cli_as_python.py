"""`memscope-async run` runs a program as `python` runs it.  Each test runs a program plainly
and under the command, in subprocesses, and compares what the program sees and does: its
globals, sys.argv, policy, warnings, errors, ending (SIGINT included), output and threads."""

from __future__ import annotations

import os
import py_compile
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest

from memscope_async.attribution.report import Report

MiB = 1024 * 1024


def plain(*args: str, cwd: Path, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=60)


def profiled(*args: str, cwd: Path, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """``memscope-async run -q -o r.json args...``"""
    return plain("-m", "memscope_async", "run", "-q", "-o", "r.json", *args, cwd=cwd, stdout=stdout)


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


# What a program sees of itself: its globals (names in order, and what they hold), whether
# __builtins__ works as a module, __main__ in sys.modules, sys.argv and sys.path[0].
DUMP = """\
_names = list(globals().items())
import sys

def show(value):
    if value is None or isinstance(value, (str, dict)):
        return repr(value)
    return f"{type(value).__name__}({getattr(value, 'name', None)!r}, {getattr(value, 'path', None)!r})"

print([(name, show(value)) for name, value in _names])
print(__builtins__.len("abc"), sys.modules["__main__"].__dict__ is globals())
print(sys.argv, sys.path[0])
"""


@pytest.mark.parametrize("command", [
    ["prog.py", "a", "--", "b"],
    ["./prog.py", "--"],
    ["prog.pyc", "x"],
    ["app", "y"],
    ["./app/"],
    ["app.zip", "z"],
    ["-m", "prog", "--", "-o"],
    ["-m", "pkg", "w"],
    ["-mprog", "-mx"],
], ids=lambda c: " ".join(c))
def test_the_program_sees_what_python_shows_it(tmp_path: Path, command: list[str]) -> None:
    """Globals as Python's own __main__ has them (the builtins module, not its dict;
    __package__ None, the loader of a script), sys.argv as given ("--" kept; a directory
    or zip file as typed) and sys.path[0], for a script, a compiled one, a directory, a zip
    file, a module and a package."""
    write(tmp_path / "prog.py", DUMP)
    py_compile.compile(str(tmp_path / "prog.py"), cfile=str(tmp_path / "prog.pyc"), doraise=True)
    write(tmp_path / "app" / "__main__.py", DUMP)
    write(tmp_path / "pkg" / "__init__.py", "")
    write(tmp_path / "pkg" / "__main__.py", DUMP)
    with zipfile.ZipFile(tmp_path / "app.zip", "w") as zf:
        zf.writestr("__main__.py", DUMP)
    expected = plain(*command, cwd=tmp_path)
    assert expected.returncode == 0, expected.stderr
    got = profiled(*command, cwd=tmp_path)
    assert (got.returncode, got.stderr) == (0, "")
    assert got.stdout == expected.stdout
    assert "'__builtins__', 'module(None, None)'" in got.stdout


def test_a_program_read_from_stdin_sees_what_python_shows_it(tmp_path: Path) -> None:
    """``run - args`` as ``python - args``: the program is read from stdin and runs with
    __file__ "<stdin>", the default loader, sys.argv[0] "-" and sys.path[0] ""."""
    def go(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, input=DUMP + "print(__file__)\n",
                              capture_output=True, text=True, timeout=60)
    expected = go("-", "a", "--")
    assert expected.returncode == 0, expected.stderr
    got = go("-m", "memscope_async", "run", "-q", "-o", "r.json", "-", "a", "--")
    assert (got.returncode, got.stdout, got.stderr) == (0, expected.stdout, "")
    assert got.stdout.endswith("['-', 'a', '--'] \n<stdin>\n")
    assert Report.load(tmp_path / "r.json").run is not None


def test_a_program_read_from_a_closed_stdin_is_empty(tmp_path: Path) -> None:
    """``python -`` with no stdin at all (file descriptor 0 closed) runs nothing and
    exits 0; so does ``run -``."""
    def go(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              preexec_fn=lambda: os.close(0))
    expected = go("-")
    got = go("-m", "memscope_async", "run", "-q", "-o", "r.json", "-")
    assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout, expected.stderr) == (0, "", "")


@pytest.mark.parametrize("command", [
    ["prog.py", "--", "x"], ["prog.py", "a", "--"], ["--", "prog.py", "--"], ["app", "y"], ["./app"], ["app.zip"],
], ids=lambda c: " ".join(c))
def test_sys_argv_is_as_python_sets_it(tmp_path: Path, command: list[str]) -> None:
    """The program's arguments verbatim, "--" included (a "--" before the script ends our
    own options, as Python's); a directory or zip file as typed, not made absolute."""
    argv = "import sys\nprint(sys.argv)\n"
    write(tmp_path / "prog.py", argv)
    write(tmp_path / "app" / "__main__.py", argv)
    with zipfile.ZipFile(tmp_path / "app.zip", "w") as zf:
        zf.writestr("__main__.py", argv)
    expected = plain(*command, cwd=tmp_path)
    assert expected.returncode == 0, expected.stderr
    got = profiled(*command, cwd=tmp_path)
    assert (got.returncode, got.stdout, got.stderr) == (0, expected.stdout, "")


POLICY = """\
import asyncio, atexit, sys

class P(asyncio.DefaultEventLoopPolicy):
    pass

def seen(policy):
    return (type(policy).__name__, isinstance(policy, asyncio.DefaultEventLoopPolicy),
            asyncio.get_event_loop_policy() is policy, sorted(vars(policy)))

def classes():
    # the classes that hold a new_event_loop of their own, and the file it comes from
    return [(k.__name__, vars(k)["new_event_loop"].__code__.co_filename.rpartition("/")[2])
            for k in type(first).__mro__ + (P,) if "new_event_loop" in vars(k)]

first = asyncio.get_event_loop_policy()
print("default:", seen(first))
mine = P()
asyncio.set_event_loop_policy(mine)
print("set by the program:", seen(mine))
for bad in (5, object()):
    try:
        asyncio.set_event_loop_policy(bad)
    except Exception as exc:
        print(type(exc).__name__, str(exc).split(" at 0x")[0])
print("still:", seen(mine))

HELD = []

async def grab():
    HELD.append(bytearray(1024 * 1024))

async def main():
    await asyncio.create_task(grab(), name="grabber")

asyncio.run(main())
atexit.register(lambda: print("at exit:", seen(mine), classes(), asyncio.set_event_loop_policy.__module__))
"""


def test_policies_keep_their_object_type_and_errors(tmp_path: Path) -> None:
    """The policy in effect, and one the program sets, stay the program's objects, of
    their types, with no attribute added; set_event_loop_policy refuses what is not a
    policy with asyncio's own TypeError; the program's loops are profiled all the same,
    and once the program has ended every class has its own methods back."""
    write(tmp_path / "prog.py", POLICY)
    expected = plain("prog.py", cwd=tmp_path)
    assert expected.returncode == 0, expected.stderr
    assert "default: ('_UnixDefaultEventLoopPolicy', True, True" in expected.stdout
    got = profiled("prog.py", cwd=tmp_path)
    assert (got.returncode, got.stderr) == (0, "")
    assert got.stdout == expected.stdout
    (task,) = Report.load(tmp_path / "r.json").find(name="grabber")
    assert task.live_bytes >= MiB


def test_a_deprecation_warning_names_the_programs_line(tmp_path: Path) -> None:
    """asyncio.get_event_loop() at module level: on 3.12 and 3.13 Python shows its
    DeprecationWarning at the program's line (no frame of ours in between to hide it),
    and the loop it makes is profiled."""
    write(tmp_path / "prog.py", """\
        import asyncio
        loop = asyncio.get_event_loop()
        async def work():
            return bytearray(64 * 1024)
        KEPT = loop.run_until_complete(loop.create_task(work(), name="worker"))
        loop.close()
        print("done")
    """)
    expected = plain("prog.py", cwd=tmp_path)
    got = profiled("prog.py", cwd=tmp_path)
    assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout, expected.stderr)
    if sys.version_info[:2] in ((3, 12), (3, 13)):
        assert "prog.py:2: DeprecationWarning: There is no current event loop" in got.stderr
    assert Report.load(tmp_path / "r.json").find(name="worker")


def test_a_loop_we_cannot_instrument_runs_unharmed(tmp_path: Path) -> None:
    """uvloop's bare Cython Loop takes no attribute: the program runs as it would, its
    tasks unseen, with one line on stderr (once, for two runners)."""
    pytest.importorskip("uvloop")
    write(tmp_path / "prog.py", """\
        import asyncio, uvloop
        async def main():
            return "ok"
        for _ in range(2):
            with asyncio.Runner(loop_factory=uvloop.loop.Loop) as runner:
                print(runner.run(main()), type(runner.get_loop()).__module__)
    """)
    expected = plain("prog.py", cwd=tmp_path)
    assert expected.returncode == 0, expected.stderr
    got = profiled("prog.py", cwd=tmp_path)
    assert (got.returncode, got.stdout) == (0, expected.stdout)
    assert got.stderr == ("memscope-async: warning: cannot instrument event loop of type uvloop.loop.Loop; "
                          "its tasks are not profiled\n")
    assert Report.load(tmp_path / "r.json").totals.tasks == 0


INTERRUPTED = """\
import asyncio, atexit

class Stop(KeyboardInterrupt):
    pass

atexit.register(print, "atexit ran")

async def main():
    raise {exception}

asyncio.run(main())
"""


@pytest.mark.parametrize(("exception", "status"), [("KeyboardInterrupt", -signal.SIGINT), ("Stop()", 1)])
def test_an_uncaught_keyboard_interrupt_ends_by_sigint_as_python_does(tmp_path: Path, exception: str,
                                                                       status: int) -> None:
    """Python ends by SIGINT after an uncaught KeyboardInterrupt (not a subclass of it: 1),
    once its atexit handlers have run: so does the command, after writing the report,
    whether run as ``python -m memscope_async`` or as its console script."""
    write(tmp_path / "prog.py", INTERRUPTED.format(exception=exception))
    expected = plain("prog.py", cwd=tmp_path)
    assert expected.returncode == status, expected.stderr
    got = profiled("prog.py", cwd=tmp_path)
    assert (got.returncode, got.stdout, got.stderr) == (status, expected.stdout, expected.stderr)
    assert got.stdout == "atexit ran\n"
    assert Report.load(tmp_path / "r.json").find(coro="main")
    exe = Path(sys.executable).with_name("memscope-async")
    if exe.exists():
        script = subprocess.run([str(exe), "run", "-q", "-o", "s.json", "prog.py"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert (script.returncode, script.stdout, script.stderr) == (status, expected.stdout, expected.stderr)


@pytest.mark.parametrize("program", [
    "import asyncio, os\nasyncio.run(asyncio.sleep(0))\nos.makedirs('sub')\nos.chdir('sub')\n",
    "import asyncio, os, tempfile\nd = tempfile.mkdtemp()\nos.chdir(d)\nasyncio.run(asyncio.sleep(0))\nos.rmdir(d)\n",
], ids=["moves", "removes its directory"])
def test_a_relative_report_path_is_where_the_program_started(tmp_path: Path, program: str) -> None:
    """-o is resolved when the command starts, not where the program's cwd ended up."""
    write(tmp_path / "prog.py", program)
    got = profiled("prog.py", cwd=tmp_path)
    assert (got.returncode, got.stderr) == (0, "")
    assert Report.load(tmp_path / "r.json").run is not None
    assert not (tmp_path / "sub" / "r.json").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_device(tmp_path: Path) -> None:
    """`report` says so in one line and fails; `run` keeps the program's status (and the
    program's own error when its output is what could not be written), says so in one
    line, and writes its report; no traceback of ours, no "Exception ignored" at exit."""
    write(tmp_path / "quiet.py", "import asyncio, sys\nasyncio.run(asyncio.sleep(0))\nsys.exit(int(sys.argv[1]))\n")
    write(tmp_path / "loud.py", "import asyncio\nasyncio.run(asyncio.sleep(0))\nprint('hello')\n")  # (raises)
    with open("/dev/full", "w") as full:
        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "memscope_async", *args], cwd=tmp_path, stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=60)

        for status in (0, 3):
            got = run("run", "-o", "r.json", "quiet.py", str(status))
            assert got.returncode == plain("quiet.py", str(status), cwd=tmp_path, stdout=full).returncode == status
            assert got.stderr == ("memscope-async: error: cannot write the summary: No space left on device; "
                                  "the report is in r.json\n")
            assert Report.load(tmp_path / "r.json").run is not None
            (tmp_path / "r.json").unlink()
        expected = plain("loud.py", cwd=tmp_path, stdout=full)
        got = run("run", "-o", "r.json", "loud.py")
        assert got.returncode == expected.returncode != 0
        assert got.stderr.startswith(expected.stderr) and "OSError: [Errno 28]" in got.stderr
        assert got.stderr.count("Exception ignored") == expected.stderr.count("Exception ignored")
        assert got.stderr.endswith("memscope-async: error: cannot write the summary: No space left on device; "
                                   "the report is in r.json\n")
        for args in (["report", "r.json"], ["report", "--json", "r.json"]):
            got = run(*args)
            assert got.returncode == 1
            assert got.stderr == "memscope-async: error: cannot write to stdout: No space left on device\n"


def _closing(fd: int) -> Any:
    return lambda: os.close(fd)


@pytest.mark.parametrize("closed", [1, 2])
def test_a_closed_stdout_or_stderr(tmp_path: Path, closed: int) -> None:
    """Started with file descriptor 1 or 2 closed (``>&-``; Python's sys.stdout or
    sys.stderr is then None): `run` keeps the program's status and writes its report, the
    summary going to the other stream; `report` with no stdout says so in one line and
    fails.  Never a traceback of ours (both raised AttributeError, exit status 1)."""
    write(tmp_path / "quiet.py", "import asyncio, sys\nasyncio.run(asyncio.sleep(0))\nsys.exit(int(sys.argv[1]))\n")
    write(tmp_path / "bye.py", "import sys\nsys.exit('bye')\n")  # (no task: a note on stderr)
    write(tmp_path / "noloop.py", "x = 1\n")

    def run(*args: str, python: bool = False) -> subprocess.CompletedProcess[str]:
        pipe = {"stdout": subprocess.PIPE} if closed == 2 else {"stderr": subprocess.PIPE}
        command = [sys.executable, *args] if python else [sys.executable, "-m", "memscope_async", *args]
        return subprocess.run(command, cwd=tmp_path, text=True, timeout=60, preexec_fn=_closing(closed), **pipe)

    for prog, args in (("quiet.py", ["0"]), ("quiet.py", ["3"]), ("bye.py", []), ("noloop.py", [])):
        expected = run(prog, *args, python=True)
        got = run("run", "-o", "r.json", prog, *args)
        assert got.returncode == expected.returncode, (prog, got)
        left = got.stdout if closed == 2 else got.stderr
        assert "Traceback" not in left and "Top tasks by live bytes" in left, left
        assert Report.load(tmp_path / "r.json").run is not None
        (tmp_path / "r.json").unlink()
    if closed == 1:
        got = run("report", "--json", str(tmp_path / "r.json"))  # (unreadable first: the usual error)
        assert got.returncode == 1 and got.stderr.startswith("memscope-async: error: cannot read"), got
        run("run", "-q", "-o", "r.json", "quiet.py", "0")
        for args in (["report", "r.json"], ["report", "--json", "r.json"]):
            got = run(*args)
            assert (got.returncode, got.stderr) == (1, "memscope-async: error: cannot write to stdout: it is closed\n")


def test_the_report_waits_for_non_daemon_threads(tmp_path: Path) -> None:
    """Python waits for non-daemon threads once the main module has run: so does the
    command, before it reports.  The thread here starts its loop only then."""
    write(tmp_path / "prog.py", """\
        import asyncio, threading, time
        HELD = []
        async def grab():
            HELD.append(bytearray(1024 * 1024))
        async def worker():
            await asyncio.create_task(grab(), name="late")
        def run():
            while threading.main_thread().is_alive():  # until Python waits for this thread
                time.sleep(0.001)
            asyncio.run(worker())
            print("thread done", flush=True)
        threading.Thread(target=run).start()
        print("main done", flush=True)
    """)
    expected = plain("prog.py", cwd=tmp_path)
    assert (expected.returncode, expected.stdout) == (0, "main done\nthread done\n")
    got = subprocess.run([sys.executable, "-m", "memscope_async", "run", "-o", "r.json", "prog.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert (got.returncode, got.stderr) == (0, "")
    assert got.stdout.startswith("main done\nthread done\n\nmemscope-async report")
    (task,) = Report.load(tmp_path / "r.json").find(name="late")
    assert task.live_bytes >= MiB


def test_an_interrupted_wait_for_threads_is_reported_as_python_does(tmp_path: Path) -> None:
    """Ctrl-C while Python waits for threads at exit: the KeyboardInterrupt in
    threading._shutdown is shown (as an exception ignored: its header varies between
    versions) and the exit goes on, with the program's status and the report written."""
    write(tmp_path / "prog.py", """\
        import os, signal, threading, time
        def run():
            while threading.main_thread().is_alive():
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        threading.Thread(target=run).start()
    """)
    expected = plain("prog.py", cwd=tmp_path)
    got = profiled("prog.py", cwd=tmp_path)
    assert got.returncode == expected.returncode == 0
    for proc in (expected, got):
        assert ", in _shutdown\n" in proc.stderr and "KeyboardInterrupt" in proc.stderr, proc.stderr
        assert "cli.py" not in proc.stderr
    assert Report.load(tmp_path / "r.json").run is not None
