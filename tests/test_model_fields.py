"""Each model shows the settings it reads: `/v1/models` defaults and `request.queued` params
list only its kind's SamplingParams fields (uniform-state, block-causal, full-attention masked),
while a request setting a field its model's family does not read is refused by name (one
generic rule, whatever the family)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from marble.families.diffusion_gemma.family import DiffusionGemmaFamily
from marble.families.llada2.family import LLaDA2Family
from marble.families.masked.family import MaskedFamily
from marble.scheduler.sampling_params import SamplingParams
from marble.server.settings import Settings
from tests.golden_cases import DG_CHECKPOINT, LLADA2_CHECKPOINT, REFERENCE
from tests.server_helpers import parse_sse, serving_loaded

pytestmark = pytest.mark.anyio
KINDS = {
    "llada-tiny": MaskedFamily.fields,
    "diffusiongemma-tiny": DiffusionGemmaFamily.fields,
    "llada2-tiny": LLaDA2Family.fields,
}
# Fields one kind reads and another never does: each must be missing from the other's view.
FOREIGN = {
    "llada-tiny": {"entropy_bound", "t_min", "t_max", "max_post_steps", "num_to_transfer"},
    "diffusiongemma-tiny": {"cache", "remasking", "verify_threshold", "max_post_steps", "top_k"},
    "llada2-tiny": {"steps", "cache", "entropy_bound", "t_min", "verify_threshold", "remasking"},
}
BODIES = {
    "llada-tiny": {"max_tokens": 8},
    "diffusiongemma-tiny": {"max_tokens": 8},
    "llada2-tiny": {"max_tokens": 8, "block_length": 8, "threshold": 0.5},
}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        model=REFERENCE / "llada-tiny", also_serve=[DG_CHECKPOINT, LLADA2_CHECKPOINT]
    )
    async with serving_loaded(settings) as c:
        yield c


def test_every_field_is_read_by_some_kind() -> None:
    assert MaskedFamily.fields | DiffusionGemmaFamily.fields | LLaDA2Family.fields == set(
        SamplingParams.field_names()
    )


async def test_model_cards_show_only_their_kinds_defaults(client: httpx.AsyncClient) -> None:
    cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
    assert set(cards) == set(KINDS)
    for name, fields in KINDS.items():
        assert set(cards[name]["defaults"]) == fields, name
        assert not FOREIGN[name] & set(cards[name]["defaults"]), name
        one = (await client.get(f"/v1/models/{name}")).json()
        assert one["defaults"] == cards[name]["defaults"]


async def _queued(client: httpx.AsyncClient, body: dict) -> tuple[int, dict | None]:
    r = await client.post("/v1/diffusion/generate", json={"prompt": "a", **body})
    if r.status_code != 200:
        return r.status_code, r.json()
    (queued,) = [e.json() for e in parse_sse(r.text) if e.event == "request.queued"]
    return 200, queued


async def test_queued_events_show_only_their_kinds_params(client: httpx.AsyncClient) -> None:
    for name, fields in KINDS.items():
        status, queued = await _queued(client, {"model": name, **BODIES[name]})
        assert status == 200, queued
        assert set(queued["params"]) == fields, name
        assert queued["params"]["max_tokens"] == 8


async def test_another_kinds_fields_are_refused_by_name(client: httpx.AsyncClient) -> None:
    # Every field a family does not read, set away from its defaults, is refused by name.
    for name in KINDS:
        for field, value in (
            ("entropy_bound", 0.3),
            ("t_min", 0.1),
            ("max_post_steps", 2),
            ("editing_threshold", 0.5),
            ("verify_threshold", 0.5),
            ("top_k", 3),
        ):
            body = {"model": name, **BODIES[name], field: value}
            status, queued = await _queued(client, body)
            if field in KINDS[name]:
                assert status == 200, (name, field, queued)
            else:
                assert status == 400 and queued["error"]["param"] == field, (name, field, queued)
    # A foreign field left at its default is no request for anything: accepted, not shown.
    status, queued = await _queued(
        client, {"model": "llada-tiny", **BODIES["llada-tiny"], "t_min": SamplingParams().t_min}
    )
    assert status == 200 and "t_min" not in queued["params"]
