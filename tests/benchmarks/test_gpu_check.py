"""benchmarks/gpu_check.sh must fail when any of its steps fails (pytest included), run every
step regardless, and pass only when all do. Run with a stand-in interpreter (no GPU needed)."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _fake_python(tmp_path: Path, fail_on: str | None) -> Path:
    """A 'python' that logs its arguments and exits 1 when they contain ``fail_on``."""
    log = tmp_path / "calls.log"
    exe = tmp_path / "fakepython"
    exe.write_text("#!/bin/sh\n"
                   f'echo "$*" >> "{log}"\n'
                   + (f'case "$*" in *{fail_on}*) echo "3 failed"; exit 1;; esac\n' if fail_on else "")
                   + "exit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def _run(tmp_path, fail_on):
    exe = _fake_python(tmp_path, fail_on)
    env = {**os.environ, "PYTHON": str(exe)}
    env.pop("OUT", None)
    env.pop("SPEED_ONLY", None)
    env.pop("SCALING", None)
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    return r, (tmp_path / "calls.log").read_text().splitlines()


@pytest.mark.skipif(not SCRIPT.exists() or os.name != "posix", reason="bash script")
def test_failing_pytest_fails_the_check_and_later_steps_still_run(tmp_path):
    r, calls = _run(tmp_path, "pytest")
    assert r.returncode == 1, r.stdout
    assert "tests (exit 1)" in r.stdout and "3 failed" in r.stdout  # output not filtered
    assert any("sample_speed.py" in c for c in calls)  # the benchmark still ran
    pytest_call = next(c for c in calls if "pytest" in c)
    assert " -x" not in pytest_call and "tests/training" in pytest_call and "gpu" in pytest_call


@pytest.mark.skipif(not SCRIPT.exists() or os.name != "posix", reason="bash script")
def test_all_steps_passing_exits_zero(tmp_path):
    r, calls = _run(tmp_path, None)
    assert r.returncode == 0, r.stdout
    assert "all steps passed" in r.stdout
    assert len(calls) == 5  # device, backends, tests, langevin_step, sample_speed
