"""The ``memscope-async`` command.

Each subcommand is a small class in :data:`COMMANDS`: its ``name`` is the subcommand, its
docstring is the help, ``prepare`` declares the arguments and ``run`` does the work and
returns the exit status.  Anything the user got wrong raises :class:`CommandError`, which
:func:`main` prints as one line, ``memscope-async: error: ...``, never as a traceback.

Exit statuses: the profiled program's own status for ``run`` and ``demo`` (1 if it raised),
2 for usage errors (bad options, a missing script, an unknown module, an unwritable
output directory), 1 for other failures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import io
import os
import re
import runpy
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence, TextIO

from . import api
from .attribution.report import Report, ReportError
from .attribution.tracker import MAX_INTERVAL
from .exporters import ExportError, render_text, write_json
from .loop_hooks.policy import InstrumentedPolicy, policies_available
from .profiler import ProfilerError, current_profiler

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

_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmg]?)(?:i?b)?", re.IGNORECASE)
_UNIT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str | int) -> int:
    """A size in bytes from ``65536``, ``64K``, ``512KiB``, ``1M``, ``1.5 MiB``...

    Units are binary whatever their spelling (``K``, ``KB`` and ``KiB`` are all 1024 bytes).
    Returns a positive integer; raises ``ValueError`` with a readable message otherwise.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.fullmatch(str(text).strip())
        if match is None:
            if str(text).strip().startswith("-"):
                raise ValueError(f"{text!r} is negative; a size must be a positive number of bytes")
            raise ValueError(f"invalid size {text!r}; use bytes or a binary unit, e.g. 65536, 64K, 512KiB, 1M")
        number, unit = match["number"], _UNIT[match["unit"].lower()]
        whole, _, frac = number.partition(".")
        # exact arithmetic: 1.5K is 1536 bytes, 1.5 (bytes) is not a size
        scaled = int(whole) * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        if frac and int(frac) * unit % 10 ** len(frac):
            raise ValueError(f"{text!r} is not a whole number of bytes")
        value = scaled
    if value < 1:
        raise ValueError(f"{text!r} is not a positive number of bytes")
    return value


def _size_arg(text: str) -> int:
    try:
        value = parse_size(text)
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

    def run(self, args: argparse.Namespace) -> int:
        """Do the work; return the exit status.  Raises :class:`CommandError`."""
        raise NotImplementedError


def _add_profiling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", metavar="REPORT.json", default=DEFAULT_REPORT,
                        help=f"where to write the JSON report (default: ./{DEFAULT_REPORT})")
    parser.add_argument("--mode", choices=("exact", "sampled"), default=None,
                        help="exact: count every allocation (default); sampled: estimate from samples")
    parser.add_argument("--sample-interval", metavar="BYTES", type=_size_arg, default=None,
                        help="mean bytes between samples, e.g. 64K, 512KiB, 1M (implies --mode sampled)")
    parser.add_argument("--stack-depth", metavar="N", type=_int_arg(0, 256), default=None,
                        help="frames kept per allocation stack, 0-256 (0: no hotspots)")
    parser.add_argument("--uvloop", action="store_true", help="run the program's loops on uvloop")
    parser.add_argument("--top", metavar="N", type=_int_arg(1), default=15,
                        help="rows per table in the summary (default: 15)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print no summary")


class RunCommand(Command):
    """Run a Python program under the profiler and summarise its memory per asyncio task.

    Every event loop the program makes (asyncio.run, asyncio.Runner, new_event_loop) is
    instrumented.  When the program ends, the summary is printed on stdout after its own
    output (-q: none) and the JSON report is written to -o.  The exit status is the
    program's.
    """

    name = "run"

    def prepare(self, parser: argparse.ArgumentParser) -> None:
        _add_profiling_options(parser)
        parser.add_argument("-m", dest="module", action="store_true",
                            help="run a library module as a script, like python -m")
        parser.add_argument("target", metavar="script.py | -m module", nargs="?", help="the program to run")
        parser.add_argument("program_args", metavar="args", nargs=argparse.REMAINDER,
                            help="arguments passed to the program")

    def run(self, args: argparse.Namespace) -> int:
        if args.target is None:
            raise CommandError("nothing to run: give a script or -m module (see 'memscope-async run --help')",
                               USAGE_ERROR)
        return _profile(_Target(args.target, args.module, args.program_args), args)


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
        except ReportError as exc:
            raise CommandError(f"{args.report}: {exc}") from None
        if args.json:
            sys.stdout.buffer.write(report.to_json_bytes(indent=True) + b"\n")
            sys.stdout.flush()
        else:
            sys.stdout.write(render_text(report, top=args.top, width=_width(sys.stdout)))
            sys.stdout.flush()
        return 0


class DemoCommand(Command):
    """Profile the bundled demo service (a shortcut for: run -m memscope_async.demo)."""

    name = "demo"

    def prepare(self, parser: argparse.ArgumentParser) -> None:
        _add_profiling_options(parser)

    def run(self, args: argparse.Namespace) -> int:
        return _profile(_Target(DEMO_MODULE, True, []), args)


COMMANDS: list[Command] = [RunCommand(), ReportCommand(), DemoCommand()]


# -- running a program -------------------------------------------------------------------


class _Target:
    """The program to run: a script path (file, directory or zip) or a module name."""

    def __init__(self, name: str, is_module: bool, args: Sequence[str]) -> None:
        self.name = name
        self.is_module = is_module
        self.args = list(args)
        if not is_module:
            path = Path(name)
            if not path.exists():
                raise CommandError(f"cannot run {name}: no such file", USAGE_ERROR)
            if path.is_dir() and not (path / "__main__.py").is_file():
                raise CommandError(f"cannot run {name}: a directory needs a __main__.py", USAGE_ERROR)

    def path0(self) -> str:
        """What Python puts in ``sys.path[0]`` for this program."""
        if self.is_module:
            return os.getcwd()
        path = Path(self.name)
        return str(path.resolve() if path.is_dir() else path.resolve().parent)

    def check_module(self) -> None:
        """Find the module the way ``python -m`` would; run with sys.path already set."""
        if not self.is_module:
            return
        try:
            spec = importlib.util.find_spec(self.name)
            if spec is not None and spec.submodule_search_locations is not None:
                if importlib.util.find_spec(f"{self.name}.__main__") is None:
                    raise CommandError(f"cannot run -m {self.name}: it is a package with no __main__ module",
                                       USAGE_ERROR)
        except CommandError:
            raise
        except Exception as exc:  # a parent package failing to import, a bad name
            raise CommandError(f"cannot run -m {self.name}: {type(exc).__name__}: {exc}", USAGE_ERROR) from None
        if spec is None:
            raise CommandError(f"cannot run -m {self.name}: no module named {self.name!r}", USAGE_ERROR)

    def execute(self) -> dict[str, Any]:
        """Run the program as ``__main__``; returns its globals (keeping them alive)."""
        if self.is_module:
            return runpy.run_module(self.name, run_name="__main__", alter_sys=True)
        # As Python (3.9+) does, a script runs under its absolute path (__file__, code
        # objects, tracebacks) while sys.argv[0] stays as given.  runpy.run_path sets
        # sys.argv[0] to the path it runs, so a source file is run here the way runpy
        # runs one, in a __main__ module of its own; a directory, a zip file or a compiled
        # file goes to runpy (sys.argv[0] absolute then).
        fname = os.path.abspath(self.name)
        source = None
        if os.path.isfile(fname) and not zipfile.is_zipfile(fname):
            with io.open_code(fname) as f:
                source = f.read()
        if source is None or source.startswith(importlib.util.MAGIC_NUMBER):
            return runpy.run_path(fname, run_name="__main__")
        return self._exec_source(source, fname)

    @staticmethod
    def _exec_source(source: bytes, fname: str) -> dict[str, Any]:
        code = compile(source, fname, "exec", dont_inherit=True)
        module = types.ModuleType("__main__")
        module.__dict__.update(__file__=fname, __cached__=None, __loader__=None, __package__="", __spec__=None)
        saved = sys.modules.get("__main__")
        sys.modules["__main__"] = module
        try:
            exec(code, module.__dict__)
        finally:
            if saved is not None:
                sys.modules["__main__"] = saved
        return module.__dict__


@contextlib.contextmanager
def _program_environment(target: _Target) -> Iterator[None]:
    """sys.argv and sys.path[0] as ``python script.py args`` / ``python -m mod args`` set
    them, restored afterwards."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target.name, *target.args]
    if sys.path:
        sys.path[0] = target.path0()
    else:
        sys.path.insert(0, target.path0())
    try:
        yield
    finally:
        sys.argv[:] = saved_argv
        sys.path[:] = saved_path


def _profiler_options(args: argparse.Namespace) -> dict[str, Any]:
    # (a sample interval without a mode means sampled mode: the Profiler decides that)
    if args.sample_interval is not None and args.mode == "exact":
        raise CommandError("--sample-interval only applies to --mode sampled", USAGE_ERROR)
    options: dict[str, Any] = {}
    if args.mode is not None:
        options["mode"] = args.mode
    if args.sample_interval is not None:
        options["sample_interval"] = args.sample_interval
    if args.stack_depth is not None:
        options["stack_depth"] = args.stack_depth
    return options


def _check_output(name: str) -> Path:
    """Fail before running the program, not after, if the report cannot be written."""
    if not name.strip():
        raise CommandError("cannot write report to an empty path", USAGE_ERROR)
    path = Path(name)
    if path.is_dir():
        raise CommandError(f"cannot write report to {name}: it is a directory", USAGE_ERROR)
    parent = path.parent
    if not parent.is_dir():
        raise CommandError(f"cannot write report to {name}: directory {parent} does not exist", USAGE_ERROR)
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
    return path


def _profile(target: _Target, args: argparse.Namespace) -> int:
    options = _profiler_options(args)
    output = _check_output(args.output)
    out, err = sys.stdout, sys.stderr  # the program may replace them; the summary goes to ours
    with _program_environment(target):
        target.check_module()
        try:
            profiler = api.install_policy(uvloop=args.uvloop, **options)
        except ProfilerError as exc:
            raise CommandError(str(exc)) from None
        status = _run_program(target, err)
    with contextlib.suppress(Exception):
        sys.stdout.flush()

    report = profiler.snapshot()
    try:
        write_json(report, output)
    except ExportError as exc:
        print(f"{PROG}: error: {exc}", file=err)
        status = status or 1
        output = None
    if out.closed:  # the program closed our stdout: the summary goes where errors go
        out = err
    if not args.quiet:
        out.write("\n" + render_text(report, top=args.top, width=_width(out)))
        out.flush()
        if report.totals.tasks == 0:
            print(f"{PROG}: note: no asyncio task was seen (the program ran no event loop, or ran it "
                  "in a way we do not see, e.g. a loop made directly as a uvloop.Loop)", file=err)
        if output is not None:
            print(f"{PROG}: report written to {output} (view it again with: {PROG} report {output})", file=out)
    return status


@contextlib.contextmanager
def _loops_made_any_way_instrumented() -> Iterator[None]:
    """While the program runs, loops that bypass the policy we installed are instrumented
    too: those an ``asyncio.Runner`` makes with a ``loop_factory`` (``asyncio.run(...,
    loop_factory=)``, ``uvloop.run``) and those of a policy the program installs itself
    (``uvloop.install()``, ``asyncio.set_event_loop_policy(...)``)."""
    profiler = current_profiler()
    runner_init = asyncio.runners.Runner.__init__
    set_policy = asyncio.events.set_event_loop_policy if policies_available() else None

    @functools.wraps(runner_init)
    def init(self, *args: Any, loop_factory: Any = None, **kwargs: Any) -> None:
        if loop_factory is not None and not isinstance(loop_factory, api.LoopFactory):
            loop_factory = api.LoopFactory(loop_factory, profiler=profiler)
        runner_init(self, *args, loop_factory=loop_factory, **kwargs)

    def set_event_loop_policy(policy: Any) -> None:
        if policy is None:
            policy = asyncio.events.DefaultEventLoopPolicy()  # what None means
        if not isinstance(policy, InstrumentedPolicy):
            # the program keeps its own object (get_event_loop_policy() is it, isinstance
            # holds): its new loops are instrumented through an instance attribute, or,
            # for a policy that takes none (__slots__), through a wrapper
            make = policy.new_event_loop
            try:
                policy.new_event_loop = lambda: profiler.instrument_loop(make())
            except (AttributeError, TypeError):
                policy = InstrumentedPolicy(policy, profiler.instrument_loop)
        set_policy(policy)

    asyncio.runners.Runner.__init__ = init  # type: ignore[method-assign]
    if set_policy is not None:
        functools.update_wrapper(set_event_loop_policy, set_policy)
        asyncio.events.set_event_loop_policy = asyncio.set_event_loop_policy = set_event_loop_policy
    try:
        yield
    finally:
        asyncio.runners.Runner.__init__ = runner_init  # type: ignore[method-assign]
        if set_policy is not None:
            asyncio.events.set_event_loop_policy = asyncio.set_event_loop_policy = set_policy


def _run_program(target: _Target, err: TextIO) -> int:
    """Run the program with the profiler on; return its exit status.  The profiler is
    stopped before the program's globals (or its exception's frames) can be released, so
    what the program still held when it ended shows as live."""
    try:
        try:
            with _loops_made_any_way_instrumented():
                namespace = target.execute()  # noqa: F841 - held until the profiler has stopped
        finally:
            api.uninstall_policy()
    except SystemExit as exc:
        return _exit_status(exc.code, err)
    except KeyboardInterrupt as exc:
        _print_user_traceback(exc)
        return 130
    except BaseException as exc:  # the program's own error: its traceback, as Python shows it
        _print_user_traceback(exc)
        return 1
    return 0


def _exit_status(code: object, err: TextIO) -> int:
    """The status Python itself exits with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _build_parser()
    try:
        try:
            args, unknown = parser.parse_known_args(argv)
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        command = getattr(args, "command", None)
        if command is None:
            names = ", ".join(c.name for c in COMMANDS)
            raise CommandError(f"a command is required: one of {names} (see '{PROG} --help')", USAGE_ERROR)
        if unknown:
            raise CommandError(f"unrecognized arguments: {' '.join(unknown)} (see '{PROG} {command.name} --help')",
                               USAGE_ERROR)
        return command.run(args)
    except CommandError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
