"""The API key and what it guards: keys a client could never send (or that would switch
authentication off) are refused at start-up for flag and environment alike, without echoing
them; with a key, the operations pages need it unless `public_ops`; the CLI's `--version` and
`serve --help`'s environment epilog."""

from __future__ import annotations

import importlib.metadata

import pytest
from pydantic import ValidationError

from marble.server import cli
from marble.server.settings import Settings
from tests.server_helpers import serving

pytestmark = pytest.mark.anyio

UNSENDABLE = {
    "empty": "",
    "space only": "   ",
    "inner space": "open s3same",
    "tab": "s3same\ttab",
    "newline": "s3same\n",
    "control": "s3same\x01",
    "delete": "s3same\x7f",
    "latin-1": "s3samé",
    "beyond latin-1": "ключ",
}
GUARDED = ("/metrics", "/openapi.json", "/docs", "/redoc")
PUBLIC = ("/health", "/live", "/")


@pytest.mark.parametrize("key", UNSENDABLE.values(), ids=UNSENDABLE.keys())
def test_unsendable_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(api_key=key)
    assert [e["loc"] for e in info.value.errors()] == [("api_key",)]


@pytest.mark.parametrize("key", UNSENDABLE.values(), ids=UNSENDABLE.keys())
def test_serve_exits_2_naming_the_key_by_flag_and_env(
    key: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "serve", lambda settings: 0)  # a key let through starts nothing
    secret_part = key.strip() or None
    assert cli.main(["serve", "--api-key", key]) == 2
    flag_err = capsys.readouterr().err
    monkeypatch.setenv("MARBLE_API_KEY", key)
    assert cli.main(["serve"]) == 2
    env_err = capsys.readouterr().err
    for err in (flag_err, env_err):
        assert "--api-key" in err and "MARBLE_API_KEY" in err
        assert secret_part is None or secret_part not in err  # never echoed into logs


def test_printable_ascii_keys_are_kept() -> None:
    key = "".join(chr(c) for c in range(0x21, 0x7F))
    assert Settings(api_key=key).api_key == key


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_operations_pages_need_the_key(llada_tiny_path) -> None:
    async with serving(llada_tiny_path, Settings(api_key="sesame")) as (_, client):
        for path in GUARDED:
            r = await client.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert (await client.get(path, headers=_bearer("wrong"))).status_code == 401, path
            assert (await client.get(path, headers=_bearer("sesame"))).status_code == 200, path
        for path in PUBLIC:
            assert (await client.get(path)).status_code == 200, path


async def test_docs_opened_with_a_query_key_fetch_the_spec_with_it(llada_tiny_path) -> None:
    key = "a'b\"<c>&d"  # printable, and every character that could break out of the page
    async with serving(llada_tiny_path, Settings(api_key=key)) as (_, client):
        for page in ("/docs", "/redoc"):
            r = await client.get(page, params={"api_key": key})
            assert r.status_code == 200
            assert key not in r.text  # only its URL-quoted form
            quoted = "/openapi.json?api_key=a%27b%22%3Cc%3E%26d"
            assert quoted in r.text
        spec = await client.get("/openapi.json", params={"api_key": key})
        assert spec.status_code == 200 and "paths" in spec.json()


async def test_public_ops_leaves_operations_pages_open(llada_tiny_path) -> None:
    settings = Settings(api_key="sesame", public_ops=True)
    async with serving(llada_tiny_path, settings) as (_, client):
        for path in GUARDED + PUBLIC:
            assert (await client.get(path)).status_code == 200, path
        r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 401  # the API itself still needs the key


async def test_without_a_key_everything_is_public(llada_tiny_path) -> None:
    async with serving(llada_tiny_path, Settings()) as (_, client):
        for path in GUARDED + PUBLIC + ("/v1/models",):
            assert (await client.get(path)).status_code == 200, path


def test_public_ops_from_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = cli._parser()
    assert cli.settings_from_args(parser.parse_args(["serve", "--public-ops"])).public_ops
    assert not cli.settings_from_args(parser.parse_args(["serve"])).public_ops
    monkeypatch.setenv("MARBLE_PUBLIC_OPS", "true")
    assert cli.settings_from_args(parser.parse_args(["serve"])).public_ops
    assert not cli.settings_from_args(parser.parse_args(["serve", "--no-public-ops"])).public_ops


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert importlib.metadata.version("marble") in capsys.readouterr().out


def test_serve_help_names_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "MARBLE_MAX_BATCH_SIZE" in out and "MARBLE_ALSO_SERVE" in out
    flags = {a.dest for a in cli._parser()._subparsers._group_actions[0].choices["serve"]._actions}
    env_only = [name for name in Settings.model_fields if name not in flags]
    assert env_only  # e.g. max_body_bytes, send_timeout_s
    for name in env_only:
        assert f"MARBLE_{name.upper()}" in out, name
