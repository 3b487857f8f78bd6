"""README's "First requests", run as a new user would: every curl command and the `openai`
client snippet, against `marble serve` on the embedded model with no API key, exactly as
README shows them but for the port. Keeps the quick start true to the server."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import running_server

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
QUICK_START_URL = "http://127.0.0.1:8000"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"### {title}\n")
    end = re.search(r"\n##+ ", text[start + 1 :]).start() + start + 1
    return text[start:end]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def _commands(block: str) -> list[str]:
    """A bash block's commands, continuation lines joined, comments left out."""
    joined = block.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server(None) as url:  # `marble serve`: the embedded model, named marble
        yield url


def test_first_requests_need_no_key_and_succeed(server: str) -> None:
    section = _section("First requests")
    commands = [c for block in _blocks(section, "bash") for c in _commands(block)]
    assert len(commands) >= 3 and all(c.startswith("curl") for c in commands), commands
    for command in commands:
        assert "authorization" not in command.lower(), "the quick-start server has no key"
        run = subprocess.run(
            command.replace(QUICK_START_URL, server) + " --fail-with-body --max-time 60",
            shell=True,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
        assert '"error"' not in run.stdout, run.stdout
        streamed = '"stream": true' in command or "generate" in command
        assert ("data:" in run.stdout) == streamed, run.stdout[:500]


def test_the_openai_snippet_runs(server: str) -> None:
    (snippet,) = _blocks(_section("First requests"), "python")
    script = snippet.replace(QUICK_START_URL, server)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "the snippet printed nothing"
