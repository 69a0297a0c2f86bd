"""README's code runs as written: its embedding snippets and its validator package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TWISTD = Path(sys.executable).parent / "twistd"

# A snippet runs unchanged; around it, the reactor is stopped after a moment and
# port 8080 becomes any free port, so that the test needs nothing of the machine.
_HARNESS = """
import runpy, sys
from twisted.internet import endpoints, reactor
_server_from_string = endpoints.serverFromString
endpoints.serverFromString = lambda r, d: _server_from_string(r, d.replace("tcp:8080", "tcp:0"))
reactor.callLater(1.0, reactor.stop)
runpy.run_path(sys.argv[1], run_name="__main__")
print("snippet ran to the end")
"""


def _blocks(marker: str) -> list[tuple[str, str]]:
    """(what the marker says, code) for every fenced block right after ``<!-- marker... -->``."""
    text = README.read_text(encoding="utf-8")
    pattern = rf"<!-- {marker}(.*?) -->\n```\w*\n(.*?)```"
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(pattern, text, re.S)]


SNIPPETS = [code for _, code in _blocks("runnable")]


def test_readme_marks_its_embedding_snippets() -> None:
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet-{i}" for i in range(len(SNIPPETS))])
def test_an_embedding_snippet_runs_as_written(code: str, tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", _HARNESS, str(snippet)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "snippet ran to the end" in done.stdout, output
    assert "Traceback" not in output and "Unhandled" not in output, output


@pytest.fixture
def validator_package(tmp_path: Path) -> Path:
    """README's validator package, written out file by file."""
    files = _blocks("file: ")
    assert {name for name, _ in files} == {
        "backup-token-required/backup_token_required.py",
        "backup-token-required/upgradeproxy/plugins/backup_token_required.py",
        "backup-token-required/pyproject.toml",
    }
    for name, code in files:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code, encoding="utf-8")
    return tmp_path / "backup-token-required"


def _twistd(package: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [str(TWISTD), "-n", "upgradeproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=package,
    )


def test_the_validator_package_is_found_by_twistd(validator_package: Path) -> None:
    listed = _twistd(validator_package, "--list-validators")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "x-backup-token" in listed.stdout
    assert "upgrades need the right X-Backup-Token" in listed.stdout


def test_the_validator_package_checks_as_a_configuration(validator_package: Path) -> None:
    checked = _twistd(
        validator_package,
        "--backend", "http://127.0.0.1:9000", "--validator", "x-backup-token", "--check",
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "validators x-backup-token;" in checked.stdout
