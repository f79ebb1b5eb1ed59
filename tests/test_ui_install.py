"""install.py, run the way the WebUI runs it (a subprocess with the WebUI's root on PYTHONPATH): it installs
nothing, says what is missing, and never fails, with or without the WebUI's `launch` module."""

import os
import subprocess
import sys
from pathlib import Path

INSTALL = Path(__file__).resolve().parent.parent / "install.py"


def run_installer(pythonpath: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, str(INSTALL)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=INSTALL.parent)


def test_installs_nothing_and_reports_what_is_missing(tmp_path):
    # the WebUI's launch module: is_installed() and run_pip(), which must never be called
    (tmp_path / "launch.py").write_text(
        "def is_installed(name):\n    return name != 'numpy'\n\n"
        "def run_pip(*args, **kwargs):\n    raise SystemExit('run_pip called')\n")
    result = run_installer(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[Delta Sampling] 'numpy' is missing from the WebUI's environment; the " \
                                    "extension needs it."


def test_silent_when_everything_is_there(tmp_path):
    (tmp_path / "launch.py").write_text("def is_installed(name):\n    return True\n")
    result = run_installer(tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_never_fails_without_the_webui(tmp_path):
    result = run_installer(tmp_path)
    assert result.returncode == 0
    assert "install check skipped" in result.stdout
