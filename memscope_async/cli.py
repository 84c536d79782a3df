"""The ``memscope-async`` command.

Each subcommand is a small class in :data:`COMMANDS`: its ``name`` is the subcommand, its
docstring is the help, ``prepare`` declares the arguments and ``run`` does the work and
returns the exit status.  Anything the user got wrong raises :class:`CommandError`, which
:func:`main` prints as one line, ``memscope-async: error: ...``, never as a traceback.

Exit statuses: the profiled program's own status for ``run`` and ``demo`` (1 if it raised;
after an uncaught KeyboardInterrupt, the end by SIGINT Python gives it; 1 for a module
that cannot be run, as ``python -m``), 2 for usage errors (bad options, a missing script,
an unwritable output directory), 1 for other failures.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import errno
import functools
import importlib.machinery
import importlib.util
import io
import marshal
import os
import runpy
import signal
import sys
import tempfile
import threading
import traceback
import types
import zipfile
from pathlib import Path
from typing import Any, ClassVar, Iterator, NoReturn, Sequence, TextIO

from . import api
from .attribution.report import Report, ReportError
from .attribution.tracker import MAX_FINISHED_TASKS, MAX_INTERVAL
from .sizes import parse_size
from .exporters.json_report import missing_directory, report_path, writes_through
from .exporters import ExportError, render_text, write_json
from .profiler import ProfilerError

__all__ = ["COMMANDS", "Command", "CommandError", "main", "parse_size"]

PROG = "memscope-async"
DEFAULT_REPORT = "report.json"
DEMO_MODULE = "memscope_async.demo"
USAGE_ERROR = 2


class CommandError(Exception):
    """A failure to report as one line, exiting with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# -- argument types ----------------------------------------------------------------------

def _size_arg(text: str, *, allow_zero: bool = False) -> int:
    try:
        value = parse_size(text, allow_zero=allow_zero)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value > MAX_INTERVAL:
        raise argparse.ArgumentTypeError(f"{text!r} is more than {MAX_INTERVAL} bytes (1 PiB)")
    return value


def _int_arg(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; it must be {bounds}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (a :class:`CommandError`), not usage + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise CommandError(f"{message} (see '{self.prog} --help')", USAGE_ERROR)


# -- commands ----------------------------------------------------------------------------


class Command:
    """Base of the subcommands: ``name``, help from the docstring, ``prepare`` and ``run``."""

    name: ClassVar[str]

    def prepare(self, parser: argparse.ArgumentParser) -> None:
        """Declare this command's arguments."""

    def run(self, args: argparse.Namespace) -> int | None:
        """Do the work; return the exit status, or None when the profiled program was ended
        by an uncaught KeyboardInterrupt (so must this process be).  Raises
        :class:`CommandError`."""
        raise NotImplementedError


def _add_profiling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", metavar="REPORT.json", default=DEFAULT_REPORT,
                        help=f"where to write the JSON report (default: ./{DEFAULT_REPORT})")
    parser.add_argument("--mode", choices=("exact", "sampled"), default=None,
                        help="exact: count every allocation (default); sampled: estimate from samples")
    parser.add_argument("--sample-interval", metavar="BYTES", type=_size_arg, default=None,
                        help="mean bytes between samples, e.g. 64K, 512KiB, 1M (implies --mode sampled)")
    parser.add_argument("--stack-depth", metavar="N", type=_int_arg(0, 256), default=None,
                        help="frames kept per allocation stack, 0-256 (0: no hotspots; default 32)")
    parser.add_argument("--stack-interval", metavar="BYTES", type=lambda text: _size_arg(text, allow_zero=True),
                        default=None, help="exact mode: mean bytes between stack samples (0: no stacks; "
                                           "default 64K)")
    parser.add_argument("--max-finished-tasks", metavar="N", type=_int_arg(0, MAX_FINISHED_TASKS), default=None,
                        help="finished tasks kept one by one in the report; more are folded into their "
                             "groups (default 10000)")
    parser.add_argument("--no-threads", dest="threads", action="store_false", default=None,
                        help="do not follow tasks' work into other threads")
    parser.add_argument("--uvloop", action="store_true", help="run the program's loops on uvloop")
    parser.add_argument("--top", metavar="N", type=_int_arg(1), default=15,
                        help="rows per table in the summary (default: 15)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print no summary")


class RunCommand(Command):
    """Run a Python program under the profiler and summarise its memory per asyncio task.

    Every event loop the program makes (asyncio.run, asyncio.Runner, new_event_loop) is
    instrumented.  When the program ends (after its non-daemon threads, as Python waits
    for them), the JSON report is written to -o and the summary is printed on stdout after
    the program's own output (-q: none).  Everything after the script or module is the
    program's own, "--" included.  The exit status is the program's.
    """

    name = "run"

    def prepare(self, parser: argparse.ArgumentParser) -> None:
        _add_profiling_options(parser)
        parser.add_argument("-m", dest="module", action="store_true",
                            help="run a library module as a script, like python -m")
        # One positional that takes the rest verbatim: the program's arguments are its own
        # ("--" included), never parsed by us
        parser.add_argument("program", metavar="script.py | -m module | - [args]", nargs=argparse.REMAINDER,
                            help="the program to run (a script, a directory or zip with a __main__.py, "
                                 "-m module, or - to read it from stdin) and its arguments")

    def run(self, args: argparse.Namespace) -> int | None:
        program = args.program[1:] if args.program[:1] == ["--"] else args.program  # "--" ends our options
        if not program:
            raise CommandError("nothing to run: give a script or -m module (see 'memscope-async run --help')",
                               USAGE_ERROR)
        return _profile(_Target(program[0], args.module, program[1:]), args)


class ReportCommand(Command):
    """Print the summary of a saved JSON report (or re-emit it as JSON)."""

    name = "report"

    def prepare(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("report", metavar="REPORT.json", help="a report written by run, demo or export()")
        parser.add_argument("--top", metavar="N", type=_int_arg(1), default=15,
                            help="rows per table (default: 15)")
        parser.add_argument("--json", action="store_true", help="print the report as indented JSON instead")

    def run(self, args: argparse.Namespace) -> int:
        try:
            report = Report.load(args.report)
        except OSError as exc:
            raise CommandError(f"cannot read {args.report}: {exc.strerror or exc}") from None
        except ReportError as exc:  # (its message starts with the path)
            raise CommandError(str(exc)) from None
        if args.json:
            error = _emit(sys.stdout, report.to_json_bytes(indent=True) + b"\n")
        else:
            error = _emit(sys.stdout, render_text(report, top=args.top, width=_width(sys.stdout)))
        if isinstance(error, BrokenPipeError):  # the reader went away (e.g. `| head`): stop quietly
            return 1
        if error is not None:
            raise CommandError(f"cannot write to stdout: {error.strerror or error}")
        return 0


class DemoCommand(Command):
    """Profile the bundled demo service (a shortcut for: run -m memscope_async.demo)."""

    name = "demo"

    def prepare(self, parser: argparse.ArgumentParser) -> None:
        _add_profiling_options(parser)

    def run(self, args: argparse.Namespace) -> int | None:
        return _profile(_Target(DEMO_MODULE, True, []), args)


COMMANDS: list[Command] = [RunCommand(), ReportCommand(), DemoCommand()]


# -- running a program -------------------------------------------------------------------


class _Target:
    """The program to run: a script path (file, directory or zip) or a module name."""

    def __init__(self, name: str, is_module: bool, args: Sequence[str]) -> None:
        self.name = name
        self.is_module = is_module
        self.args = list(args)
        self.origin: str | None = None  # the module's file, once check_module found it
        # Python's absolute path: the working directory joined to the path as given, not
        # normalised (``./app.py`` runs as ``/cwd/./app.py``: __file__, code, sys.path)
        self.path = name if is_module else os.path.join(os.getcwd(), name)
        self.stdin = not is_module and name == "-"  # ``python -``: the program comes on stdin
        if self.stdin:
            self.path = "<stdin>"
        elif not is_module:
            if not os.path.exists(self.path):
                raise CommandError(f"cannot run {name}: no such file", USAGE_ERROR)
            if os.path.isdir(self.path) and not os.path.isfile(os.path.join(self.path, "__main__.py")):
                raise CommandError(f"cannot run {name}: a directory needs a __main__.py", USAGE_ERROR)
        # a directory or a zip file runs its __main__ module, found through sys.path[0]
        self.importable = not is_module and not self.stdin and (os.path.isdir(self.path) or
                                                                zipfile.is_zipfile(self.path))

    def path0(self) -> str:
        """What Python puts in ``sys.path[0]`` for this program."""
        if self.is_module:
            return os.getcwd()
        if self.stdin:
            return ""  # as for ``python -``: the working directory, whatever it becomes
        if self.importable:
            return self.path
        return os.path.dirname(os.path.realpath(self.path))

    def check_module(self) -> None:
        """Find the module the way ``python -m`` would; run with sys.path already set.
        A module that cannot be run exits 1, as ``python -m`` does (a missing script: 2)."""
        if not self.is_module:
            return
        try:
            spec = importlib.util.find_spec(self.name)
            if spec is not None and spec.submodule_search_locations is not None:
                if importlib.util.find_spec(f"{self.name}.__main__") is None:
                    raise CommandError(f"cannot run -m {self.name}: it is a package with no __main__ module")
        except CommandError:
            raise
        except Exception as exc:  # a parent package failing to import, a bad name
            raise CommandError(f"cannot run -m {self.name}: {type(exc).__name__}: {exc}") from None
        if spec is None:
            raise CommandError(f"cannot run -m {self.name}: no module named {self.name!r}")
        if spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(f"{self.name}.__main__")
        self.origin = spec.origin if spec is not None and spec.has_location else None

    def file(self) -> str | None:
        """The program's own file, which a report must never replace: the script (or zip)
        run, or the module's file (its real path; None: none, e.g. a directory)."""
        if self.stdin:
            return None
        found = self.origin if self.is_module else self.path
        return os.path.realpath(found) if found and os.path.isfile(found) else None

    def execute(self, module: types.ModuleType) -> None:
        """Run the program in ``module``, the ``__main__`` in sys.modules, as Python does."""
        if self.is_module:
            # what ``python -m`` runs (CPython calls it by this name): sys.argv[0] becomes the file
            runpy._run_module_as_main(self.name)
        elif self.importable:
            runpy._run_module_as_main("__main__", alter_argv=False)  # ``python app.zip``: argv[0] as given
        elif self.stdin:
            # (its encoding, as for a file: a coding line or UTF-8; no stdin at all: an empty program)
            source = sys.stdin.buffer.read() if sys.stdin is not None else b""
            vars(module).update(__file__=self.path, __cached__=None, __loader__=importlib.machinery.BuiltinImporter)
            exec(compile(source, self.path, "exec", dont_inherit=True), vars(module))
        else:
            code, loader = self._compile()
            vars(module).update(__file__=self.path, __cached__=None, __loader__=loader("__main__", self.path))
            exec(code, vars(module))

    def _compile(self) -> tuple[types.CodeType, type]:
        """The script's code and the loader Python gives its ``__main__``: a source file, or
        a compiled one (named .pyc, or starting as one does)."""
        with io.open_code(self.path) as f:
            data = f.read()
        magic = importlib.util.MAGIC_NUMBER
        if self.path.endswith(".pyc") or data[:2] == magic[:2]:
            if not data.startswith(magic):
                raise RuntimeError("Bad magic number in .pyc file")
            return marshal.loads(data[16:]), importlib.machinery.SourcelessFileLoader
        return compile(data, self.path, "exec", dont_inherit=True), importlib.machinery.SourceFileLoader


def _main_module() -> types.ModuleType:
    """A new ``__main__`` holding what the interpreter puts in its own at startup: the
    builtins module itself (exec would put its dict), and before 3.14 ``__annotations__``."""
    module = types.ModuleType("__main__")
    if sys.version_info < (3, 14):
        vars(module)["__annotations__"] = {}
    vars(module)["__builtins__"] = builtins
    return module


@contextlib.contextmanager
def _program_environment(target: _Target) -> Iterator[types.ModuleType]:
    """sys.argv, sys.path[0] and a ``__main__`` module as ``python script.py args`` /
    ``python -m mod args`` set them; yields the module.  Restored afterwards."""
    saved_argv, saved_path, saved_main = sys.argv, sys.path[:], sys.modules.get("__main__")
    sys.argv = [target.name, *target.args]
    if sys.path:
        sys.path[0] = target.path0()
    else:
        sys.path.insert(0, target.path0())
    module = sys.modules["__main__"] = _main_module()
    try:
        yield module
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        if saved_main is None:
            sys.modules.pop("__main__", None)
        else:
            sys.modules["__main__"] = saved_main


def _profiler_options(args: argparse.Namespace) -> dict[str, Any]:
    # (a sample interval without a mode means sampled mode: the Profiler decides that)
    if args.sample_interval is not None and args.mode == "exact":
        raise CommandError("--sample-interval only applies to --mode sampled", USAGE_ERROR)
    options: dict[str, Any] = {}
    if args.mode is not None:
        options["mode"] = args.mode
    if args.sample_interval is not None:
        options["sample_interval"] = args.sample_interval
    for name in ("stack_depth", "stack_interval", "max_finished_tasks", "threads"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def _check_output(name: str) -> Path:
    """Fail before running the program, not after, if the report cannot be written.
    Returns the path made absolute now: the program may change directory."""
    try:
        path = report_path(name)  # not empty, not a directory
    except ExportError as exc:
        raise CommandError(str(exc), USAGE_ERROR) from None
    if writes_through(path):  # /dev/null, /dev/stdout, a FIFO: written through, by this name
        if not os.access(path, os.W_OK):
            raise CommandError(f"cannot write report to {name}: permission denied", USAGE_ERROR)
        return path.absolute()
    real = Path(os.path.realpath(path))
    parent = real.parent if path.is_symlink() else path.parent
    if not parent.is_dir():
        raise CommandError(f"cannot write report to {name}: {missing_directory(parent)}", USAGE_ERROR)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write report to {name}: directory {parent} is not writable", USAGE_ERROR)
    # os.access says yes to root everywhere, and not to what the file system refuses
    # (/proc, /sys, a read-only mount): the report goes through a file made beside it, so
    # make one now
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".memscope-check-"):
            pass
    except OSError as exc:
        raise CommandError(f"cannot write report to {name}: {exc.strerror or exc}", USAGE_ERROR) from None
    return path.absolute()


def _profile(target: _Target, args: argparse.Namespace) -> int | None:
    """Run the program profiled, write the report, print the summary; return the program's
    exit status (None: it was ended by an uncaught KeyboardInterrupt)."""
    options = _profiler_options(args)
    output = _check_output(args.output)
    out, err = sys.stdout, sys.stderr  # the program may replace them; the summary goes to ours
    ending: _Terminated | None = None  # its signal handlers go when this ends, however it ends
    try:
        with _program_environment(target) as module:
            target.check_module()
            if os.path.realpath(output) == target.file():
                raise CommandError(f"cannot write report to {args.output}: it is the program being run",
                                   USAGE_ERROR)
            try:
                profiler = api.install_policy(uvloop=args.uvloop, **options)
            except ProfilerError as exc:
                raise CommandError(str(exc)) from None
            profiler.ambient = True  # the program's own ms.run() / install_policy() join it (api)
            started_in = os.getpid()
            ending = _Terminated(profiler, output, args, out, err)
            status = _run_program(target, module, err)
        if os.getpid() != started_in:
            # a child the program forked, which ran on to the program's end: the report and
            # summary are its parent's (a child writing the same -o would replace the parent's)
            return status
        # The program's output first.  If it cannot be written, that is the program's error,
        # left in place for Python to report at exit as it would have.
        stuck: Exception | None = None
        try:
            sys.stdout.flush()
        except (OSError, ValueError, AttributeError) as exc:  # (AttributeError: no stdout at all)
            stuck = exc

        written = True
        try:
            with ending.writing:
                try:
                    report = profiler.snapshot()
                except MemoryError:  # (the program ended near its memory limit)
                    report = None
                    raise ExportError(f"cannot write report to {args.output}: out of memory") from None
                write_json(report, output)
                ending.written = True
            ending.end_if_asked()
        except KeyboardInterrupt:  # (a large report takes a while): say so, then end as interrupted
            _emit(err, f"{PROG}: interrupted: the report was not written (what was at {args.output} is unchanged)\n")
            raise
        except ExportError as exc:
            _emit(err, f"{PROG}: error: {exc}\n")
            written = False
            if status == 0:
                status = 1
    finally:
        if ending is not None:
            ending.uninstall()
    if not args.quiet and report is not None:
        _summarise(report, args, out, err, written, stuck)
    return status


def _summarise(report: Report, args: argparse.Namespace, out: TextIO, err: TextIO, written: bool,
               stuck: Exception | None) -> None:
    """The summary on ``out``, notes on ``err``.  If ``out`` cannot take it (a full disk, a
    closed pipe; ``stuck``: the program's own output could not be written there), one line
    on ``err`` says so: the exit status stays the program's."""
    if out is None or out.closed:  # no stdout, or the program closed it: the summary goes where errors go
        out = err
    if out is sys.stdout and stuck is not None:
        error: Exception | None = stuck
    else:
        error = _emit(out, "\n" + render_text(report, top=args.top, width=_width(out)))
    if report.totals.tasks == 0:
        _emit(err, f"{PROG}: note: no asyncio task was seen (the program ran no event loop, or ran it "
                   "in a way we do not see, e.g. a loop made directly as a uvloop.Loop)\n")
    if error is None and written:
        error = _emit(out, f"{PROG}: report written to {args.output} "
                           f"(view it again with: {PROG} report {args.output})\n")
    if error is not None:
        reason = getattr(error, "strerror", None) or error
        saved = f"; the report is in {args.output}" if written else ""
        _emit(err, f"{PROG}: error: cannot write the summary: {reason}{saved}\n")


def _emit(stream: TextIO | None, data: str | bytes) -> Exception | None:
    """Write ``data`` (bytes: to the stream's buffer) and flush.  On failure (a full disk,
    a closed pipe or file) return the error, after dropping what could not be written:
    Python would try it again at exit and fail again ("Exception ignored ...", status 120).
    ``None`` (Python's sys.stdout or sys.stderr when the process started with that file
    descriptor closed) takes nothing: the error says so."""
    if stream is None:
        return OSError(errno.EBADF, "it is closed")
    try:
        if isinstance(data, bytes):
            stream.buffer.write(data)
        else:
            stream.write(data)
        stream.flush()
    except (OSError, ValueError) as exc:
        _discard_pending(stream)
        return exc
    return None


def _discard_pending(stream: TextIO) -> None:
    """Flush ``stream`` into /dev/null, its file descriptor then put back."""
    with contextlib.suppress(OSError, ValueError):
        fd = stream.fileno()
        saved = os.dup(fd)
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd)
                stream.flush()
            finally:
                os.close(null)
                os.dup2(saved, fd)
        finally:
            os.close(saved)


class _Terminated:
    """SIGTERM and SIGHUP while the program runs (``timeout``, ``kill``, a closed
    terminal, a container stopped): Python's default is to die at once, and the report
    would be lost.  Where the program has not set a handler of its own for them (its own
    replaces ours, as it would replace the default), the report is written at the signal,
    in the main thread where the program stopped, the summary printed (unless -q) and one
    line on stderr says so; the process then ends by the same signal, as it would have,
    its status the shell's 128 + signal.  The program does not go on meanwhile (a server
    serves no more requests), except when the signal stopped it inside the profiler's own
    code, which may hold a lock the report needs: then a thread writes the report once
    that code lets go.  A second signal ends it at once.  Installed from the main thread
    only (the one that receives signals)."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
    # the profiler's machinery (not its entry points: the program runs inside api.run and cli)
    MACHINERY = tuple(f"{__package__}.{m}" for m in ("attribution", "loop_hooks", "exporters", "profiler"))

    def __init__(self, profiler: Any, output: Path, args: argparse.Namespace, out: TextIO | None,
                 err: TextIO) -> None:
        self.profiler, self.output, self.args, self.out, self.err = profiler, output, args, out, err
        self.writing = threading.Lock()  # one report written at a time: ours or the end's
        self.written = False
        self.signum: int | None = None
        self.installed: list[int] = []
        self.pid = os.getpid()
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            with contextlib.suppress(ValueError, OSError):
                if signal.getsignal(signum) is signal.SIG_DFL:
                    signal.signal(signum, self._handle)
                    self.installed.append(signum)

    def uninstall(self) -> None:
        for signum in self.installed:
            with contextlib.suppress(ValueError, OSError):
                if signal.getsignal(signum) == self._handle:  # (not replaced by the program)
                    signal.signal(signum, signal.SIG_DFL)
        self.installed = []

    def _handle(self, signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second one: at once
        if os.getpid() != self.pid:  # a child the program forked: its end is the default one
            os.kill(os.getpid(), signum)
            return
        first, self.signum = self.signum is None, signum
        # (at the program's end, the report being written: ended after it; end_if_asked)
        if not first or self.writing.locked():
            return
        if self._in_machinery(frame):
            threading.Thread(target=self._write_and_end, name="memscope-async-report", daemon=True).start()
        else:
            self._write_and_end()

    def _in_machinery(self, frame: Any) -> bool:
        while frame is not None:
            if str(frame.f_globals.get("__name__")).startswith(self.MACHINERY):
                return True
            frame = frame.f_back
        return False

    def _write_and_end(self) -> None:
        with self.writing:
            if not self.written:
                report = None
                try:
                    report = self.profiler.snapshot()
                    write_json(report, self.output)
                    self.written = True
                    note = f"the report was written to {self.args.output}"
                except KeyboardInterrupt:
                    note = "interrupted: the report was not written"
                except BaseException as exc:  # noqa: BLE001 - said, and the end goes on
                    note = f"the report was not written: {exc}"
                if self.written and not self.args.quiet:
                    self._summary(report)
                _emit(self.err, f"{PROG}: {signal.Signals(self.signum).name}: {note}\n")
        self._end()

    def _summary(self, report: Report) -> None:
        """The summary, after the program's own output (as at the end).  The program may
        have been stopped inside a write to the same stream: then it is not printed."""
        out = self.out if self.out is not None and not self.out.closed else self.err
        try:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            error = _emit(out, "\n" + render_text(report, top=self.args.top, width=_width(out)))
        except Exception as exc:  # noqa: BLE001 - (a reentrant write: RuntimeError)
            error = exc
        if error is not None:
            _emit(self.err, f"{PROG}: error: cannot write the summary: {getattr(error, 'strerror', None) or error}\n")

    def end_if_asked(self) -> None:
        """After the end's own report: a signal that came meanwhile ends the process now."""
        if self.signum is not None:
            _emit(self.err, f"{PROG}: {signal.Signals(self.signum).name}: the report was written to {self.args.output}\n")
            self._end()

    def _end(self) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.kill(os.getpid(), self.signum or signal.SIGTERM)


def _run_program(target: _Target, module: types.ModuleType, err: TextIO) -> int | None:
    """Run the program with the profiler on and end it as Python does: its traceback (or
    SystemExit message) first, then a wait for its non-daemon threads.  Returns its exit
    status, or None if an uncaught KeyboardInterrupt ended it.  The profiler is stopped
    before the program's exception (with its frames) can be released, so what the program
    still held when it ended shows as live (``module``, its globals, is held by the caller)."""
    held: BaseException | None = None  # noqa: F841 - held until the profiler has stopped
    status: int | None = 1
    try:
        try:
            target.execute(module)
            status = 0
        except SystemExit as exc:
            held, status = exc, _exit_status(exc.code, err)
        except BaseException as exc:  # the program's own error: its traceback, as Python shows it
            held = exc
            _print_user_traceback(exc)
            # Python ends by SIGINT for a KeyboardInterrupt, not for a subclass of it
            status = None if type(exc) is KeyboardInterrupt else 1
        _wait_for_threads()
    finally:
        try:
            api.end_command_policy()
        except KeyboardInterrupt:
            # Ctrl-C while profiling ends (its full collections take a while in a big heap):
            # the hooks are out all the same; the report is written, then the end by SIGINT
            status = None
    return status


def _wait_for_threads() -> None:
    """Wait for the program's non-daemon threads, as Python does after the main module
    and before atexit handlers: their tasks belong in the report.  This is the
    interpreter's own wait (``threading._shutdown``, which CPython calls by that name; its
    call at exit then returns at once).  An exception in it (Ctrl-C) is shown as an
    exception ignored, as Python shows it (3.11 and 3.12 word the header so), and the run
    goes on."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may shut threading down
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except BaseException as exc:  # noqa: BLE001 - reported as Python reports it
        tb = exc.__traceback__
        with contextlib.suppress(Exception):
            sys.stderr.write(f"Exception ignored in: {threading!r}\n")
            traceback.print_exception(type(exc), exc, tb.tb_next if tb is not None else None)


def _exit_status(code: object, err: TextIO) -> int:
    """The status Python itself exits with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    if err is not None:  # (no stderr: Python prints it nowhere)
        with contextlib.suppress(OSError, ValueError):
            print(code, file=err)
    return 1


def _print_user_traceback(exc: BaseException) -> None:
    """Print ``exc`` through sys.excepthook, without our frames and runpy's on top."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in (__name__, "runpy"):
        tb = tb.tb_next
    # the default hook prints the exception's own traceback; with none left (the script
    # did not compile: a SyntaxError) it prints what Python prints, the error alone
    exc.__traceback__ = tb
    sys.excepthook(type(exc), exc, tb)


def _end_interrupted() -> NoReturn:
    """End as Python ends a program stopped by an uncaught KeyboardInterrupt (its
    traceback already shown): killed by SIGINT once the interpreter has shut down (atexit
    handlers run), so the shell sees the interrupt.  Python does that only for a
    KeyboardInterrupt that reaches its top level, so one is raised; the hook that would
    print it prints nothing, once."""
    interrupt = KeyboardInterrupt()
    hook = sys.excepthook

    def quiet(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        sys.excepthook = hook
        if exc is not interrupt:
            hook(exc_type, exc, tb)

    sys.excepthook = quiet
    raise interrupt


def _width(stream: TextIO) -> int:
    """The terminal width if ``stream`` is a terminal, else 100 (render_text needs >= 40)."""
    try:
        if stream.isatty():
            return max(40, os.get_terminal_size(stream.fileno()).columns)
    except (OSError, ValueError, AttributeError):
        pass
    return 100


# -- entry point -------------------------------------------------------------------------


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("memscope-async")
    except Exception:
        return "unknown"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=(__doc__ or "").splitlines()[0].rstrip(".").replace("``", ""))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        doc = command.__doc__ or ""
        sub = subparsers.add_parser(command.name, help=doc.splitlines()[0], description=doc,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        command.prepare(sub)
        sub.set_defaults(command=command)
    return parser


@functools.cache
def _run_options() -> dict[str, bool]:
    """run's options as its parser has them (``--output``, ``-o``, ...), and whether each
    takes a value as the next argument."""
    parser = argparse.ArgumentParser()
    RunCommand().prepare(parser)
    return {name: action.nargs != 0 for action in parser._actions for name in action.option_strings}


def _plain_flags() -> str:
    """run's one-letter options that take no value, which may run together (``-qm...``);
    -m not among them: what follows it is the program."""
    return "".join(name[1] for name, takes in _run_options().items()
                   if len(name) == 2 and name != "-m" and not takes)


def _takes_value(arg: str) -> bool:
    """Whether option ``arg`` (before the program) takes the next argument as its value
    (``--output x``; ``--output=x`` takes none; argparse also takes any unambiguous prefix
    of a long option)."""
    if arg.startswith("--"):
        if "=" in arg:
            return False
        found = [takes for name, takes in _run_options().items() if name.startswith(arg)]
        return len(found) == 1 and found[0]
    # one dash: one-letter flags run together, then one that takes a value: it takes the
    # rest of the argument, or with none left, the next one
    rest = arg[1:].lstrip(_plain_flags())
    return len(rest) == 1 and _run_options().get(f"-{rest}", False)


def _split_module_option(argv: Sequence[str]) -> list[str]:
    """``run -mpkg.mod`` (and ``-qmpkg.mod``) as ``run -m pkg.mod``, as Python takes
    ``-mpkg.mod`` (argparse would read the rest as more one-letter flags).  Only before
    the program: what follows it is the program's own."""
    argv = list(argv)
    if not argv or argv[0] != "run":
        return argv
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            flags = arg[1:]
            lead = len(flags) - len(flags.lstrip(_plain_flags()))
            if flags[lead:lead + 1] == "m" and len(flags) > lead + 1:
                return [*argv[:i], *(f"-{c}" for c in flags[:lead]), "-m", flags[lead + 1:], *argv[i + 1:]]
        if arg in ("-", "--", "-m") or not arg.startswith("-"):
            break  # the program (a script, "-", "--", or -m's module): the rest is its own
        i += 2 if _takes_value(arg) else 1
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status.
    Raises KeyboardInterrupt if the program it ran was ended by one (see _end_interrupted)."""
    parser = _build_parser()
    try:
        try:
            args, unknown = parser.parse_known_args(_split_module_option(sys.argv[1:] if argv is None else argv))
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        command = getattr(args, "command", None)
        if command is None:
            names = ", ".join(c.name for c in COMMANDS)
            raise CommandError(f"a command is required: one of {names} (see '{PROG} --help')", USAGE_ERROR)
        if unknown:
            raise CommandError(f"unrecognized arguments: {' '.join(unknown)} (see '{PROG} {command.name} --help')",
                               USAGE_ERROR)
        status = command.run(args)
    except CommandError as exc:
        _emit(sys.stderr, f"{PROG}: error: {exc.message}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if status is None:
        _end_interrupted()
    return status
