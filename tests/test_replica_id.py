"""The replica tag: validated once in the settings (flag and environment), it starts every request
id a server mints, and so the `X-Request-Id` header, the events' `request_id`, the OpenAI ids
and the attach path; `/health` says it. Without one, ids stay 32 hex digits."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from marble.model.default import CHECKPOINT_DIR
from marble.server import cli
from marble.server.middleware import new_request_id
from marble.server.settings import Settings
from tests.server_helpers import parse_sse, serving

HEX32 = "[0-9a-f]{32}"
SHORT = {"prompt": "Hello", "max_tokens": 4, "steps": 4}


def test_new_request_id_with_and_without_a_tag():
    assert re.fullmatch(f"r1-{HEX32}", new_request_id("r1"))
    assert re.fullmatch(HEX32, new_request_id(None))
    assert new_request_id("r1") != new_request_id("r1")


@pytest.mark.parametrize("tag", ["r1", "0", "gpu7east", "a" * 16])
def test_valid_tags(tag):
    assert Settings(replica_id=tag).replica_id == tag


@pytest.mark.parametrize("tag", ["", "R1", "r-1", "r_1", "r1 ", "a" * 17, "ré"])
def test_invalid_tags_name_the_field(tag):
    with pytest.raises(ValidationError) as exc:
        Settings(replica_id=tag)
    (error,) = exc.value.errors()
    assert error["loc"] == ("replica_id",) and error["type"] == "string_pattern_mismatch"


def test_tag_from_flag_and_environment(monkeypatch, capsys):
    assert Settings().replica_id is None
    monkeypatch.setenv("MARBLE_REPLICA_ID", "r2")
    assert Settings().replica_id == "r2"
    args = cli._parser().parse_args(["serve", "--replica-id", "r3"])
    assert cli.settings_from_args(args).replica_id == "r3"
    assert cli.main(["serve", "--replica-id", "R3"]) == 2  # refused before anything starts
    err = capsys.readouterr().err
    assert "replica_id" in err and "a-z0-9" in err


@pytest.mark.anyio
async def test_tagged_ids_everywhere_an_id_shows():
    async with serving(CHECKPOINT_DIR, Settings(replica_id="r7")) as (_, client):
        health = (await client.get("/health")).json()
        assert health["replica_id"] == "r7"

        r = await client.post("/v1/completions", json=SHORT)
        rid = r.headers["x-request-id"]
        assert re.fullmatch(f"r7-{HEX32}", rid)
        assert r.json()["id"] == f"cmpl-{rid}"

        r = await client.post("/v1/diffusion/generate", json=SHORT)
        rid = r.headers["x-request-id"]
        assert re.fullmatch(f"r7-{HEX32}", rid)
        assert {e.json()["request_id"] for e in parse_sse(r.text)} == {rid}
        for path in (rid, f"gen-{rid}"):
            attached = await client.get(f"/v1/diffusion/requests/{path}/events")
            assert attached.status_code == 200, attached.text
            assert parse_sse(attached.text)[-1].event == "request.completed"

        # Routes that touch no request get a tagged id too (a balancer's log correlates them).
        assert (await client.get("/v1/models")).headers["x-request-id"].startswith("r7-")


@pytest.mark.anyio
async def test_untagged_server_keeps_bare_ids():
    async with serving(CHECKPOINT_DIR) as (_, client):
        assert (await client.get("/health")).json()["replica_id"] is None
        r = await client.post("/v1/completions", json=SHORT)
        assert re.fullmatch(HEX32, r.headers["x-request-id"])
