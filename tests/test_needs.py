"""A missing optional module or program skips a test on a developer's machine and fails it in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

MISSING_MODULE = '''
import needs
needs.module("evl_no_such_module_xyz", "pip install evl-no-such-module")

def test_uses_it():
    pass
'''

MISSING_PROGRAM = '''
import needs

def test_uses_it():
    needs.program("evl-no-such-program-xyz", install="apt-get install evl-no-such-program")
'''


def _pytest(tmp_path: Path, source: str, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("source, what", [(MISSING_MODULE, "evl_no_such_module_xyz"),
                                          (MISSING_PROGRAM, "evl-no-such-program-xyz")])
def test_missing_dependency_fails_in_ci_naming_it(tmp_path, source, what):
    proc = _pytest(tmp_path, source, ci="true")
    assert proc.returncode != 0, proc.stdout
    assert what in proc.stdout and "CI=true" in proc.stdout
    assert "skipped" not in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize("source, install", [(MISSING_MODULE, "pip install evl-no-such-module"),
                                             (MISSING_PROGRAM, "apt-get install evl-no-such-program")])
@pytest.mark.parametrize("ci", [None, "false", ""])
def test_missing_dependency_skips_outside_ci_saying_how_to_get_it(tmp_path, source, install, ci):
    proc = _pytest(tmp_path, source, ci=ci)
    assert proc.returncode in (0, 5), proc.stdout   # 5: a module-level skip leaves no test collected
    assert "1 skipped" in proc.stdout and install in proc.stdout


def test_present_dependencies_are_returned(monkeypatch):
    import needs

    monkeypatch.setenv("CI", "true")
    assert needs.module("json", "stdlib").dumps([1]) == "[1]"
    assert Path(needs.program("evl-no-such-program-xyz", "sh", install="-")).name == "sh"


def test_ci_script_fails_when_the_browser_cannot_be_installed(tmp_path):
    """.ci/run: no chromium, no way to install it -> a non-zero exit naming what is missing (it used to
    print a message and let the browser test skip)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "id", "cat", "env"):
        (bin_dir / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package chromium' >&2\nexit 100\n")
    (bin_dir / "apt-get").chmod(0o755)
    (bin_dir / "make").write_text("#!/bin/sh\necho 'make must not run'\nexit 0\n")
    (bin_dir / "make").chmod(0o755)
    proc = subprocess.run([str(bin_dir / "bash"), str(HERE.parent / ".ci" / "run")], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "chromium" in proc.stderr and "make must not run" not in proc.stdout
