"""The server's torch thread count: every core but one unless told (one core is left to the
event loop and the sockets; benchmarks/serve.py measured why), at least one, and the flag or
`MARBLE_TORCH_THREADS` wins over the default."""

from __future__ import annotations

import pytest

from marble.server import cli, settings
from marble.server.settings import Settings


@pytest.mark.parametrize("cores,expected", [(None, 1), (1, 1), (2, 1), (3, 2), (16, 15)])
def test_default_leaves_one_core(
    monkeypatch: pytest.MonkeyPatch, cores: int | None, expected: int
) -> None:
    monkeypatch.setattr(settings.os, "cpu_count", lambda: cores)
    assert Settings().torch_threads == expected


def test_flag_and_env_override_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.os, "cpu_count", lambda: 8)
    parser = cli._parser()
    assert cli.settings_from_args(parser.parse_args(["serve"])).torch_threads == 7
    given = parser.parse_args(["serve", "--torch-threads", "8"])
    assert cli.settings_from_args(given).torch_threads == 8
    monkeypatch.setenv("MARBLE_TORCH_THREADS", "2")
    assert cli.settings_from_args(parser.parse_args(["serve"])).torch_threads == 2
