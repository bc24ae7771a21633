"""The C kernels' code paths checked without Python (tests/kernels/check_paths.c): each path this CPU has against
the scalar one and for exact batch invariance; and the NEON path, cross-compiled for aarch64 and run under qemu,
where `gcc-aarch64-linux-gnu` and `qemu-user` are installed (skipped otherwise)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "kernels" / "check_paths.c"


def build_and_run(cc: str, out: Path, runner: list[str]) -> str:
    build = subprocess.run([cc, "-O2", "-std=c11", "-pthread", "-static", str(SOURCE), "-o", str(out), "-lm"],
                           capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"{cc} cannot build a static test binary here: {build.stderr.strip()[-200:]}")
    run = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_native_paths_agree_with_scalar_and_are_batch_invariant(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    out = build_and_run(cc, tmp_path / "check", [])
    assert out.count(": ok") >= 2  # scalar q4 and q8 at least


def test_neon_path_under_qemu(tmp_path):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        pytest.skip("needs gcc-aarch64-linux-gnu and qemu-user")
    out = build_and_run(cc, tmp_path / "check", [qemu])
    assert "neon q4" in out and "neon q8" in out
