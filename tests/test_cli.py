"""The memscope-async command, run the way users run it: in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from memscope_async.attribution.report import Report
from memscope_async.cli import _split_module_option, parse_size

MiB = 1024 * 1024

# Allocates a known 4 MiB buffer in a task named "grabber" and keeps it in a global, so it
# is still live when the program ends.  Then does what its arguments ask.
SCRIPT = """\
import asyncio
import sys

HELD = []

async def grab():
    HELD.append(bytearray(4 * 1024 * 1024))

async def main():
    await asyncio.create_task(grab(), name="grabber")

asyncio.run(main())
print("argv:", sys.argv[1:])
if sys.argv[1:2] == ["exit"]:
    sys.exit(int(sys.argv[2]))
if sys.argv[1:2] == ["raise"]:
    raise ValueError("the program failed")
"""


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memscope_async", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


def grabber(report: Report):
    (task,) = report.find(name="grabber")
    return task


def test_run_writes_report_and_prints_summary_after_the_programs_output(tmp_path: Path, script: Path) -> None:
    out = tmp_path / "out" / "report.json"
    out.parent.mkdir()
    proc = cli("run", "-o", str(out), str(script), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("argv: []\n")  # the program's own output first
    report = Report.load(out)
    task = grabber(report)
    assert task.coro == "grab"
    assert abs(task.live_bytes - 4 * MiB) <= 64 * 1024
    summary = proc.stdout.split("argv: []\n", 1)[1]
    assert "memscope-async report" in summary
    assert "grabber (grab)" in summary
    assert f"report written to {out}" in summary
    assert proc.stderr == ""


def test_default_report_path_is_in_the_working_directory(tmp_path: Path, script: Path) -> None:
    proc = cli("run", "--quiet", script.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == "argv: []\n"
    assert abs(grabber(Report.load(tmp_path / "report.json")).live_bytes - 4 * MiB) <= 64 * 1024


def test_output_through_a_symlink_or_to_a_device(tmp_path: Path, script: Path) -> None:
    """-o follows a link (the link stays) and writes a device through: -o /dev/null
    throws the report away and leaves /dev/null a device (a device node of our own here)."""
    import stat

    real = tmp_path / "reports" / "r.json"
    real.parent.mkdir()
    (tmp_path / "link.json").symlink_to(real)
    proc = cli("run", "-q", "-o", "link.json", script.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "link.json").is_symlink()
    assert abs(grabber(Report.load(real)).live_bytes - 4 * MiB) <= 64 * 1024
    try:
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:
        pytest.skip("cannot make a device node here (not root)")
    proc = cli("run", "-q", "-o", "null", script.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(os.stat(tmp_path / "null").st_mode)


@pytest.mark.parametrize("to", ["file", "pipe"])
def test_output_to_dev_stdout(tmp_path: Path, script: Path, to: str) -> None:
    """-o /dev/stdout writes the report after the program's output, to a redirected file
    (appended: replacing the file would lose what the program printed) or a pipe."""
    cmd = [sys.executable, "-m", "memscope_async", "run", "-q", "-o", "/dev/stdout", script.name]
    if to == "file":
        with open(tmp_path / "out.txt", "wb") as out:
            proc = subprocess.run(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.PIPE, timeout=60)
        data = (tmp_path / "out.txt").read_bytes()
    else:
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=60)
        data = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert data.startswith(b"argv: []\n{"), data[:80]
    report = Report.from_json(data[len(b"argv: []\n"):])
    assert abs(grabber(report).live_bytes - 4 * MiB) <= 64 * 1024


def test_a_forked_child_that_runs_to_the_end_writes_no_report(tmp_path: Path) -> None:
    """The report and summary are the profiled process's: a child it forked that falls off
    the end of the program (as Python allows) ends as it would without us."""
    prog = tmp_path / "forks.py"
    prog.write_text(textwrap.dedent("""
        import asyncio, os

        async def main():
            global keep
            keep = bytearray(3 << 20)
            child = os.fork()
            if child:
                os.waitpid(child, 0)
            print("parent" if child else "child", flush=True)

        asyncio.run(main())
    """))
    proc = cli("run", "-o", "r.json", prog.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("child\nparent\n"), proc.stdout
    assert proc.stdout.count("memscope-async report (schema") == 1
    assert proc.stdout.count("report written to") == 1
    assert sorted(os.listdir(tmp_path)) == ["forks.py", "r.json"]


def test_an_interrupt_while_profiling_ends_still_writes_the_report(tmp_path: Path, script: Path) -> None:
    """Ctrl-C after the program ended, during the profiler's stop (its full collections take
    a while in a big heap): the report is written and the command ends by SIGINT, as for
    a Ctrl-C during the program (the interrupt escaped: status 130, no report)."""
    driver = textwrap.dedent(f"""
        import gc, sys
        import memscope_async.profiler
        from memscope_async import cli

        class InterruptedOnce:
            isenabled = staticmethod(gc.isenabled)
            calls = 0

            @classmethod
            def collect(cls, *args):
                cls.calls += 1
                if cls.calls == 1:
                    raise KeyboardInterrupt
                return gc.collect(*args)

        memscope_async.profiler.gc = InterruptedOnce
        sys.exit(cli.main(["run", "-q", "-o", "r.json", {script.name!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -2, proc.stderr
    assert Report.load(tmp_path / "r.json").find(coro="grab"), proc.stderr


def test_an_interrupt_while_the_report_is_written_says_so(tmp_path: Path, script: Path) -> None:
    """Ctrl-C after the program ended, while a large report is being built or written:
    one line says the report was not written, the old one stays, status 130."""
    (tmp_path / "r.json").write_text("old")
    driver = textwrap.dedent(f"""
        import sys
        from memscope_async import cli

        def interrupted(report, path):
            raise KeyboardInterrupt

        cli.write_json = interrupted
        sys.exit(cli.main(["run", "-q", "-o", "r.json", {script.name!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130
    assert proc.stderr == "memscope-async: interrupted: the report was not written (what was at r.json is unchanged)\n"
    assert (tmp_path / "r.json").read_text() == "old"


ENDLESS = """\
import asyncio, signal, sys

HELD = []

async def grow():
    while True:
        HELD.append(bytearray(100_000))
        await asyncio.sleep(0.001)

async def main():
    if sys.argv[1:] == ["own-handler"]:
        signal.signal(signal.SIGTERM, lambda *a: print("the program's own handler", flush=True) or sys.exit(3))
    task = asyncio.create_task(grow(), name="grower")
    print("ready", flush=True)
    await task

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "own-handler", "while-writing"])
def test_a_program_stopped_by_sigterm_still_has_its_report(tmp_path: Path, how: str) -> None:
    """timeout, kill, docker stop: the report is written and the process ends by the signal,
    as it would have; a handler of the program's own is the one that runs.  A signal
    while the report of a program that ended is written ends the process after it (a
    partial temporary file was left)."""
    import signal
    import time

    (tmp_path / "endless.py").write_text(ENDLESS)
    if how == "while-writing":
        driver = textwrap.dedent("""
            import os, signal, sys
            from memscope_async import cli
            write = cli.write_json

            def slow(report, path):
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while the report is written
                return write(report, path)

            cli.write_json = slow
            sys.exit(cli.main(["run", "-q", "-o", "r.json", "script.py"]))
        """)
        (tmp_path / "script.py").write_text(SCRIPT)
        proc = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == -signal.SIGTERM, proc.stderr
    else:
        args = ["own-handler"] if how == "own-handler" else []
        def default_signals() -> None:  # (a runner under nohup would pass SIGHUP on ignored)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        proc = subprocess.Popen([sys.executable, "-m", "memscope_async", "run", "-q", "-o", "r.json", "endless.py",
                                 *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_signals)
        try:
            assert proc.stdout.readline() == "ready\n"
            time.sleep(0.3)
            proc.send_signal(signal.SIGHUP if how == "SIGHUP" else signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if how == "own-handler":  # the program's own handler runs, and the program ends as it says
            assert proc.returncode == 3 and out == "the program's own handler\n", err
        else:
            assert proc.returncode == -getattr(signal, how), err
            assert err == f"memscope-async: {how}: the report was written to r.json\n"
    report = Report.load(tmp_path / "r.json")
    (task,) = report.find(name="grabber" if how == "while-writing" else "grower")
    assert task.live_bytes > 100_000
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file


STOPPED_AT_THE_SIGNAL = """\
import asyncio, signal, sys

async def work():
    return bytearray(3_000_000)

async def main():
    kept = await asyncio.create_task(work(), name="worker")
    print("before", flush=True)
    signal.raise_signal(signal.SIGTERM)  # the default action ends the process here
    open("side_effect.txt", "w").write("ran")
    print("went on", flush=True)
    return kept

asyncio.run(main())
"""


def test_sigterm_stops_the_program_where_it_is_and_prints_the_summary(tmp_path: Path) -> None:
    """Without the profiler the process ends at the signal.  With it, the report was
    written by a thread while the program went on: a server served 132 more requests
    (helper-64), and here the program wrote its file.  No summary was printed either."""
    import signal

    (tmp_path / "stopped.py").write_text(STOPPED_AT_THE_SIGNAL)
    plain = subprocess.run([sys.executable, "stopped.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert plain.returncode == -signal.SIGTERM and plain.stdout == "before\n"
    assert not (tmp_path / "side_effect.txt").exists()

    proc = cli("run", "-o", "r.json", "stopped.py", cwd=tmp_path)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert not (tmp_path / "side_effect.txt").exists()
    assert proc.stdout.startswith("before\n") and "went on" not in proc.stdout
    assert "worker" in proc.stdout.split("before\n", 1)[1]  # the summary, after the program's output
    assert proc.stderr == "memscope-async: SIGTERM: the report was written to r.json\n"
    (task,) = Report.load(tmp_path / "r.json").find(name="worker")
    assert task.live_bytes >= 3_000_000


def test_sigterm_inside_the_profilers_own_code_still_writes_the_report(tmp_path: Path) -> None:
    """A signal that stops the program inside the profiler's machinery (here: its own
    snapshot, holding the tracker's lock) is answered by a thread once that code lets go,
    not by a report made from inside it."""
    import signal

    (tmp_path / "inside.py").write_text(textwrap.dedent("""
        import asyncio, signal
        import memscope_async as ms
        from memscope_async.attribution import tracker

        read = tracker.read_records

        def read_records(*args):  # (once: the report's own snapshot reads them too)
            tracker.read_records = read
            signal.raise_signal(signal.SIGTERM)
            return read(*args)

        async def main():
            kept = await asyncio.create_task(asyncio.to_thread(bytearray, 2_000_000), name="worker")
            tracker.read_records = read_records
            ms.current_profiler().snapshot()
            await asyncio.sleep(30)
            return kept

        asyncio.run(main())
    """))
    proc = cli("run", "-q", "-o", "r.json", "inside.py", cwd=tmp_path, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stderr == "memscope-async: SIGTERM: the report was written to r.json\n"
    (task,) = Report.load(tmp_path / "r.json").find(name="worker")
    assert task.live_bytes >= 2_000_000


def test_program_arguments_are_passed_through(tmp_path: Path, script: Path) -> None:
    proc = cli("run", "-q", "-o", "r.json", script.name, "--top", "3", "-o", "x", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "argv: ['--top', '3', '-o', 'x']\n"


def test_program_exit_code_is_propagated_after_the_report(tmp_path: Path, script: Path) -> None:
    proc = cli("run", "-o", "r.json", script.name, "exit", "3", cwd=tmp_path)
    assert proc.returncode == 3
    assert grabber(Report.load(tmp_path / "r.json")).live_bytes >= 4 * MiB


def test_program_exception_shows_its_traceback_and_exits_1(tmp_path: Path, script: Path) -> None:
    proc = cli("run", "-o", "r.json", script.name, "raise", cwd=tmp_path)
    assert proc.returncode == 1
    traceback = proc.stderr
    assert "Traceback (most recent call last):" in traceback
    assert "ValueError: the program failed" in traceback
    assert "script.py" in traceback
    assert "cli.py" not in traceback and "runpy" not in traceback  # the user's frames only
    assert grabber(Report.load(tmp_path / "r.json")).live_bytes >= 4 * MiB


def test_a_script_that_does_not_compile_shows_what_python_shows(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("print('never')\ndef (:\n")
    plain = subprocess.run([sys.executable, "broken.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    proc = cli("run", "-q", "-o", "r.json", "broken.py", cwd=tmp_path)
    assert proc.returncode == 1 and plain.returncode == 1
    assert proc.stderr == plain.stderr  # the SyntaxError alone: no traceback through our code
    assert "SyntaxError" in proc.stderr and "Traceback" not in proc.stderr


RUNNERS = {
    "uvloop.run": "import uvloop\nuvloop.run(main())",
    "uvloop.install": "import uvloop, warnings\nwarnings.simplefilter('ignore', DeprecationWarning)\n"
                      "uvloop.install()\nasyncio.run(main())",
    "a policy set by the program": "asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())\n"
                                   "asyncio.run(main())",
    "Runner with a loop_factory": "with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop()) as r:\n"
                                  "    r.run(main())",
}


@pytest.mark.parametrize("how", list(RUNNERS))
def test_loops_the_policy_does_not_make_are_instrumented_too(tmp_path: Path, how: str) -> None:
    if how.startswith("uvloop"):
        pytest.importorskip("uvloop")
    (tmp_path / "prog.py").write_text(SCRIPT.replace("asyncio.run(main())", RUNNERS[how]))
    proc = cli("run", "-q", "-o", "r.json", "prog.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "argv: []\n"
    report = Report.load(tmp_path / "r.json")
    assert abs(grabber(report).live_bytes - 4 * MiB) <= 64 * 1024
    assert ("uvloop" in report.run.loop) == how.startswith("uvloop")


def test_run_module_finds_modules_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "service.py").write_text(SCRIPT)
    proc = cli("run", "-q", "-o", "r.json", "-m", "service", "a", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "argv: ['a']\n"
    assert grabber(Report.load(tmp_path / "r.json")).live_bytes >= 4 * MiB


@pytest.mark.parametrize(("argv", "expected"), [
    (["run", "-mpkg.mod", "a"], ["run", "-m", "pkg.mod", "a"]),
    (["run", "-q", "--mode=sampled", "-o", "-mr.json", "-mx", "-my"], ["run", "-q", "--mode=sampled", "-o", "-mr.json",
                                                                      "-m", "x", "-my"]),
    (["run", "prog.py", "-mx"], ["run", "prog.py", "-mx"]),  # the program's own
    (["run", "--", "-mx"], ["run", "--", "-mx"]),
    (["run", "-m", "mod", "-mx"], ["run", "-m", "mod", "-mx"]),
    (["report", "-mx"], ["report", "-mx"]),
    (["run", "-qmpkg.mod"], ["run", "-q", "-m", "pkg.mod"]),  # one-letter flags run together, as python -qm
    (["run", "--out", "r.json", "--max", "5", "--uv", "-mx"],  # argparse's prefixes of long options
     ["run", "--out", "r.json", "--max", "5", "--uv", "-m", "x"]),
    (["run", "-or.json", "-mx"], ["run", "-or.json", "-m", "x"]),
])
def test_an_attached_module_name_is_split_only_before_the_program(argv: list[str], expected: list[str]) -> None:
    """``-mpkg.mod`` means ``-m pkg.mod`` as in ``python -mpkg.mod``; from the program on,
    arguments are the program's."""
    assert _split_module_option(argv) == expected


OPTIONS_SCRIPT = """\
import asyncio

async def small():
    return bytearray(1000)

async def main():
    await asyncio.gather(*[small() for _ in range(50)])
    await asyncio.get_running_loop().run_in_executor(None, bytearray, 4 << 20)  # (to_thread carries the context)

asyncio.run(main())
"""


def test_every_profiler_option_has_its_command_line_option(tmp_path: Path) -> None:
    """stack_interval, max_finished_tasks and threads as --stack-interval,
    --max-finished-tasks and --no-threads (the Profiler's options, on every entry point)."""
    (tmp_path / "prog.py").write_text(OPTIONS_SCRIPT)
    proc = cli("run", "-q", "-o", "default.json", "prog.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    default = Report.load(tmp_path / "default.json")
    proc = cli("run", "-q", "-o", "set.json", "--stack-interval", "0", "--max-finished-tasks", "5", "--no-threads",
               "prog.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    changed = Report.load(tmp_path / "set.json")
    assert default.run.stacks_sampled and not changed.run.stacks_sampled
    assert default.totals.folded_tasks == 0 and changed.totals.folded_tasks >= 40
    assert default.unattributed.allocated_bytes < 4 << 20 <= changed.unattributed.allocated_bytes
    proc = cli("run", "--max-finished-tasks", "-1", "prog.py", cwd=tmp_path)
    assert proc.returncode == 2 and "--max-finished-tasks: -1 is out of range" in proc.stderr


def test_sampled_mode_with_a_suffixed_interval(tmp_path: Path, script: Path) -> None:
    proc = cli("run", "-q", "--sample-interval", "64K", "--stack-depth", "4", "-o", "r.json", script.name,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = Report.load(tmp_path / "r.json").run
    assert (run.mode, run.sample_interval, run.stack_depth) == ("sampled", 64 * 1024, 4)


@pytest.mark.parametrize(
    ("text", "size"),
    [("65536", 65536), ("64K", 65536), ("64k", 65536), ("512KiB", 512 * 1024), ("1M", MiB), ("1 MiB", MiB),
     ("1.5M", 3 * MiB // 2), ("1.25K", 1280), ("2G", 2 << 30), (4096, 4096), ("64B", 64), ("1 PiB", 1 << 50),
     ("2t", 2 << 40)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "0", "12X", "1 MB/s", "K", "1.5", "0.3K", True, "64iB", "1E"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_a_negative_size_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="a size must be a positive number of bytes"):
        parse_size("-1")
    with pytest.raises(ValueError, match="a size must be 0 or a positive number of bytes"):
        parse_size("-1", allow_zero=True)  # (--stack-interval: 0 turns stacks off)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "-m", "no_such_module_here"], "no module named 'no_such_module_here'"),
        (["run", "-m", "pkg_without_main"], "it is a package with no __main__ module"),
        (["run", "-m", "broken_pkg.mod"], "cannot run -m broken_pkg.mod: ZeroDivisionError"),
    ],
)
def test_a_module_that_cannot_be_run_is_one_line_with_exit_1(tmp_path: Path, args: list[str], expected: str) -> None:
    # as python -m exits for these (1), not a usage error (2)
    (tmp_path / "pkg_without_main").mkdir()
    (tmp_path / "pkg_without_main" / "__init__.py").write_text("")
    (tmp_path / "broken_pkg").mkdir()
    (tmp_path / "broken_pkg" / "__init__.py").write_text("1 / 0\n")
    proc = cli(*args, cwd=tmp_path)
    python = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == python.returncode == 1, (proc.returncode, python.returncode)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("memscope-async: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "missing.py"], "cannot run missing.py: no such file"),
        (["run", "--mode", "fast", "script.py"], "argument --mode: invalid choice: 'fast'"),
        (["run", "--sample-interval", "-64", "script.py"], "negative"),
        (["run", "--sample-interval=-64K", "script.py"], "negative"),
        (["run", "--sample-interval", "lots", "script.py"], "invalid size 'lots'"),
        (["run", "--sample-interval", "1.5", "script.py"], "'1.5' is not a whole number of bytes"),
        (["run", "--sample-interval", "99999999999999999999999", "script.py"], "is more than 1125899906842624 bytes"),
        (["run", "--mode", "exact", "--sample-interval", "64K", "script.py"], "only applies to --mode sampled"),
        (["run", "--stack-depth", "999", "script.py"], "out of range"),
        (["run", "-o", "no/such/dir/r.json", "script.py"], "directory no/such/dir does not exist"),
        (["run", "-o", "script.py/r.json", "script.py"], "cannot write report to script.py/r.json: script.py is not a directory"),
        (["run", "-o", ".", "script.py"], "it is a directory"),
        (["run", "-o", "outdir/", "script.py"], "cannot write report to outdir/: no such directory"),
        (["run", "-o", "script.py", "script.py"], "cannot write report to script.py: it is the program being run"),
        (["run", "-o", "./link.json", "script.py"], "it is the program being run"),  # a link to it
        (["run", "-o", "prog/__main__.py", "-m", "prog"], "it is the program being run"),
        (["run", "-o", "", "script.py"], "cannot write report to an empty path"),
        (["run", "-o", "/proc/r.json", "script.py"], "cannot write report to /proc/r.json: "),  # even as root
        (["run"], "nothing to run"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["run", "--bogus", "script.py"], "unrecognized arguments: --bogus (see 'memscope-async run --help')"),
        ([], "a command is required"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(tmp_path: Path, script: Path, args: list[str], expected: str) -> None:
    (tmp_path / "link.json").symlink_to(script)
    (tmp_path / "prog").mkdir()
    (tmp_path / "prog" / "__init__.py").write_text("")
    (tmp_path / "prog" / "__main__.py").write_text("print('prog')\n")
    source = script.read_text()
    proc = cli(*args, cwd=tmp_path)
    assert script.read_text() == source and (tmp_path / "prog" / "__main__.py").read_text() == "print('prog')\n"
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("memscope-async: error: ")
    assert expected in lines[0]
    assert not (tmp_path / "report.json").exists()  # the program never ran


def test_report_subcommand_renders_and_reemits(tmp_path: Path, script: Path) -> None:
    assert cli("run", "-q", "-o", "r.json", script.name, cwd=tmp_path).returncode == 0
    text = cli("report", "r.json", "--top", "1", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("memscope-async report")
    assert "grabber (grab)" in text.stdout
    assert "... and 3 more tasks" in text.stdout
    as_json = cli("report", "r.json", "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    assert Report.from_dict(orjson.loads(as_json.stdout)) == Report.load(tmp_path / "r.json")


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read r.json: No such file or directory"), (b"{not json", "not valid JSON"),
     (b'{"schema_version": 1}', "not a memscope-async report")],
)
def test_report_subcommand_bad_file(tmp_path: Path, content: bytes | None, expected: str) -> None:
    if content is not None:
        (tmp_path / "r.json").write_bytes(content)
    proc = cli("report", "r.json", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("memscope-async: error: "), proc.stderr
    assert expected in lines[0]


def test_demo_shows_the_session_tracker_leak(tmp_path: Path) -> None:
    proc = cli("demo", "-o", "demo.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("demo: served 160 requests")
    report = Report.load(tmp_path / "demo.json")
    if report.leak_suspects:
        top = max(report.leak_suspects, key=lambda s: s.retained_bytes)
        assert top.coro == "session_tracker"
        assert top.retained_bytes >= 4 * MiB
    else:
        top = max(report.groups, key=lambda g: g.retained_after_done_bytes)
        assert top.coro == "session_tracker"
    handlers = {g.labels.get("route") for g in report.groups if g.coro == "handle_request"}
    assert handlers == {"/api/search", "/api/checkout"}
    assert "Leak suspects" in proc.stdout


def test_help_and_version_exit_0(tmp_path: Path) -> None:
    assert cli("--version", cwd=tmp_path).stdout.startswith("memscope-async ")
    proc = cli("run", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "--sample-interval BYTES" in proc.stdout


def test_console_script_matches_module(tmp_path: Path, script: Path) -> None:
    exe = Path(sys.executable).with_name("memscope-async")
    if not exe.exists():
        pytest.skip("memscope-async is not installed next to this interpreter")
    proc = subprocess.run([str(exe), "run", "-q", "-o", "r.json", script.name, "exit", "4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout == "argv: ['exit', '4']\n"


def test_demo_runs_plainly(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "memscope_async.demo"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("demo: served 160 requests")
    assert proc.stdout.count("\n") == 1


def test_the_script_sees_what_python_would_show_it(tmp_path: Path) -> None:
    # As `python prog.py`: sys.argv[0] as given, an absolute __file__, a __main__ module
    # whose classes pickle, and the program's own traceback when it fails.
    (tmp_path / "prog.py").write_text(textwrap.dedent("""
        import os, pickle, sys
        class Point:
            pass
        print(sys.argv[0], os.path.isabs(__file__), sys.modules["__main__"].__file__ == __file__,
              type(pickle.loads(pickle.dumps(Point()))).__name__)
        if sys.argv[1:] == ["fail"]:
            raise OSError("the program's own error")
    """))
    proc = cli("run", "-q", "-o", "r.json", "prog.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "prog.py True True Point\n"
    plain = subprocess.run([sys.executable, "prog.py", "fail"], cwd=tmp_path, capture_output=True, text=True)
    proc = cli("run", "-q", "-o", "r.json", "prog.py", "fail", cwd=tmp_path)
    assert proc.stdout == plain.stdout == "prog.py True True Point\n"  # ran once, not again elsewhere
    assert proc.returncode == plain.returncode == 1
    assert "OSError: the program's own error" in proc.stderr


SELF_PROFILING = """\
import asyncio, sys, memscope_async as ms

async def main():
    await asyncio.create_task(asyncio.sleep(0), name="inner")
    return 42

if sys.argv[1] == "run":
    print(ms.run(main(), report="own.json", mode="sampled"))
elif sys.argv[1] == "factory":
    with asyncio.Runner(loop_factory=ms.loop_factory(report="own.json", mode="sampled")) as runner:
        print(runner.run(main()))
else:
    profiler = ms.install_policy()
    print(asyncio.run(main()))
    print(ms.uninstall_policy() is profiler)
    print(asyncio.run(main()))
"""


DECORATED = """\
import asyncio, memscope_async as ms

KEEP = []

@ms.profile(report="job.json")
async def job():
    KEEP.append(bytearray(2 << 20))
    await asyncio.sleep(0)

asyncio.run(job())
print(max(job.last_report.tasks, key=lambda t: t.live_bytes).coro)
"""


def test_a_decorated_function_under_the_command_gets_its_report(tmp_path: Path) -> None:
    """@profile(report=) in a program run by the command: the call runs under the
    command's profiler, and its end still gives last_report and the file (that profiler's
    report so far), as ms.run(report=) does there."""
    (tmp_path / "deco.py").write_text(DECORATED)
    proc = cli("run", "-q", "-o", "r.json", "deco.py", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "job\n", "")
    assert len(Report.load(tmp_path / "job.json").find(coro="job")) == 1


def test_pytest_under_the_command_refuses_the_per_test_profiler_clearly(tmp_path: Path) -> None:
    """memscope-async run -m pytest: the command profiles the whole session; a test that
    asks for its own profile (the memscope fixture or marker) errors at setup saying so,
    the others run, and pytest's exit status is the command's."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n")
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""\
        import pytest

        def test_plain():
            pass

        @pytest.mark.memscope(max_live_bytes="1 MiB")
        def test_marked():
            pass
        """))
    proc = cli("run", "-q", "-o", "r.json", "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed, 1 error" in proc.stdout, proc.stdout
    assert "memscope: cannot profile this test: memscope-async run's profiler runs for the whole session" in proc.stdout


STRAY_UNINSTALL = """\
import asyncio, memscope_async as ms

async def job(name):
    await asyncio.create_task(asyncio.sleep(0), name=name)

asyncio.run(job("before"))
print(ms.uninstall_policy())  # the program never installed one
asyncio.run(job("after"))
"""


def test_a_programs_uninstall_policy_does_not_end_the_commands_profiling(tmp_path: Path) -> None:
    (tmp_path / "stray.py").write_text(STRAY_UNINSTALL)
    proc = cli("run", "-q", "-o", "r.json", "stray.py", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "None\n"), proc.stderr
    report = Report.load(tmp_path / "r.json")
    assert len(report.find(name="before")) == len(report.find(name="after")) == 1


UVLOOP_POLICY = """\
import asyncio, atexit, memscope_async as ms

async def main():
    await asyncio.create_task(asyncio.sleep(0), name="inner")
    return type(asyncio.get_running_loop()).__module__

profiler = ms.install_policy(uvloop=True)  # and never uninstalled
print(asyncio.run(main()))
# (atexit: after memscope-async run has ended its profiling)
atexit.register(lambda: print(profiler.active, type(asyncio.get_event_loop_policy()).__module__))
"""


def test_a_program_asking_for_uvloop_when_it_joins_gets_uvloop(tmp_path: Path) -> None:
    """install_policy(uvloop=True) in a program run by the command joins its profiler and
    still runs the program's loops on uvloop; what it set is undone when the command
    ends, even if the program never calls uninstall_policy() (the command's own profiling
    then ends too)."""
    pytest.importorskip("uvloop")
    (tmp_path / "uv.py").write_text(UVLOOP_POLICY)
    plain = subprocess.run([sys.executable, "uv.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert plain.stdout.split()[0] == "uvloop", plain.stderr
    proc = cli("run", "-q", "-o", "r.json", "uv.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["uvloop", "False", "asyncio.unix_events"], proc.stderr
    report = Report.load(tmp_path / "r.json")
    assert "uvloop" in report.run.loop and len(report.find(name="inner")) == 1


@pytest.mark.parametrize("how,line", [("run", 8), ("factory", 10)])
def test_the_joining_warning_names_the_programs_line(tmp_path: Path, how: str, line: int) -> None:
    """The warning that a joining profiler's options stay the command's names the
    program's line, not ours (loop_factory()'s named api.py: asyncio's Runner calls it)."""
    (tmp_path / "selfprof.py").write_text(SELF_PROFILING)
    proc = cli("run", "-q", "-o", "r.json", "selfprof.py", how, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"selfprof.py:{line}: RuntimeWarning: memscope-async: " in proc.stderr, proc.stderr


@pytest.mark.parametrize("how", ["run", "factory", "policy"])
def test_a_program_that_profiles_itself_joins_the_commands_profiler(tmp_path: Path, how: str) -> None:
    """ms.run(), loop_factory() and install_policy() in the program would be a second profiler: they join
    the command's instead of failing the program (under -W error too: what cannot be
    honoured, here mode="sampled", is said on stderr)."""
    (tmp_path / "selfprof.py").write_text(SELF_PROFILING)
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "memscope_async", "run", "-q", "-o", "r.json",
                           "selfprof.py", how], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == (["42", "True", "42"] if how == "policy" else ["42"])
    report = Report.load(tmp_path / "r.json")
    assert len(report.find(name="inner")) == (2 if how == "policy" else 1)  # the command still profiles every loop
    if how != "policy":
        what = "run()" if how == "run" else "loop_factory()"
        assert f"{what} joins the profiler of memscope-async run, whose mode='exact' stays" in proc.stderr
        own = Report.load(tmp_path / "own.json")  # the report the program asked for: the command's so far
        assert own.run.mode == "exact" and len(own.find(name="inner")) == 1
