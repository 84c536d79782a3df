"""The shadow map's edges, checked in C (tests/c/shadow_check.c): the allocator hooks rely
on them, and a Python test reaches only the common case.  Built with the compiler that
builds the extension."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compiler() -> list[str]:
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if shutil.which(cc[0]) is None:  # pragma: no cover - the extension needs one to build
        pytest.skip(f"no C compiler ({cc[0]})")
    return cc


@pytest.mark.parametrize("addr_bits", [47, 48])
def test_shadow_map_edges(tmp_path: Path, addr_bits: int) -> None:
    exe = tmp_path / "shadow_check"
    build = [
        *_compiler(), "-std=c11", "-O2", "-Wall", "-Werror", "-Wno-unused-function", f"-DSHADOW_ADDR_BITS={addr_bits}",
        "-I", str(ROOT / "attribution"), str(ROOT / "tests" / "c" / "shadow_check.c"), "-o", str(exe),
    ]
    done = subprocess.run(build, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout) == (0, "ok\n"), run.stdout + run.stderr
