"""Client values that used to reach a sampler, the chat renderer or the resume parser unchecked:
a tiny temperature samples at its limit on every family, `chat_template_kwargs` cannot replace
the renderer's own variables and a failing template is a 400, and a `Last-Event-ID` that is not
an event id is a 400, for the header and the query alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from marble.model.sampling import COLD_TEMPERATURE, scale_logits
from marble.model.uniform_sampling import entropy
from tests.golden_cases import REFERENCE
from tests.server_helpers import parse_sse, serving, tiny_engine

pytestmark = pytest.mark.anyio
MASKED = ["llada-tiny", "dream-tiny", "llada2-tiny"]
FAMILIES = [*MASKED, "diffusiongemma-tiny"]
# Subnormal in float32, rounded to 0 by float32, the smallest double.
TINY = [1e-40, 1e-46, 5e-324]
CHAT = [{"role": "user", "content": "Hi"}]


def _checkpoint(name: str) -> Path:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference data {path} is absent")
    return path


def test_scale_logits_is_the_plain_quotient_above_the_floor_and_the_limit_below():
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0)) * 30
    logits[0, 0, 7] = float("-inf")
    logits[2, 1, :] = logits[2, 1, 5]  # a position of ties
    warm = torch.tensor([0.7, 1.3, COLD_TEMPERATURE * 10])
    assert torch.equal(scale_logits(logits, warm), logits / warm.view(-1, 1, 1))
    for t in TINY:
        cold = torch.tensor([t, 0.5, t], dtype=torch.float64).float()
        scaled = scale_logits(logits, cold)
        probs = scaled.softmax(-1)
        assert torch.isfinite(probs).all() and torch.isfinite(entropy(scaled)).all()
        assert torch.equal(probs[0].argmax(-1), logits[0].argmax(-1))
        assert (probs[0].amax(-1) == 1).all() and (entropy(scaled[0]) == 0).all()
        assert torch.allclose(probs[2, 1], torch.full((50,), 1 / 50))  # uniform over ties
        assert torch.equal(scaled[1], logits[1] / 0.5)
    broken = logits.clone()
    broken[0, 2, 3] = float("nan")
    assert scale_logits(broken, torch.tensor([1e-40, 1.0, 1.0]))[0, 2].isnan().any()


@pytest.mark.parametrize("family", FAMILIES)
async def test_a_tiny_temperature_samples_at_its_limit(family):
    async with serving(_checkpoint(family)) as (_, client):
        for t in TINY:
            # DiffusionGemma's sampler has no top-k/top-p (refused by name).
            samplers = ({}, {"top_k": 3}, {"top_p": 0.5}) if family in MASKED else ({},)
            for sampler in samplers:
                body = {"prompt": "Hello", "max_tokens": 8, "temperature": t, **sampler}
                texts = set()
                for seed in (1, 2):
                    r = await client.post("/v1/completions", json={**body, "seed": seed})
                    assert r.status_code == 200, r.text
                    texts.add(r.json()["choices"][0]["text"])
                r = await client.post("/v1/diffusion/generate", json={**body, "seed": 1})
                events = parse_sse(r.text)
                assert events[-1].event == "request.completed", r.text[-300:]
                steps = [e.json() for e in events if e.event == "step"]
                if family in MASKED:
                    # The limit T -> 0+ draws the argmax: the seed no longer matters.
                    assert len(texts) == 1
                else:
                    # Every candidate then has entropy 0, inside any budget: none re-noised.
                    assert steps and all(s["renoised"] == 0 for s in steps)


@pytest.mark.parametrize("family", FAMILIES)
async def test_template_kwargs_cannot_replace_the_renderers_variables(family):
    reserved = ["messages", "self", "add_generation_prompt", "bos_token", "tools", "namespace"]
    async with serving(_checkpoint(family)) as (_, client):
        for name in reserved:
            for value in ("x", 1, None):
                body = {"messages": CHAT, "max_tokens": 1, "chat_template_kwargs": {name: value}}
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["param"] == "chat_template_kwargs" and name in error["message"]
        body = {"messages": CHAT, "max_tokens": 1, "chat_template_kwargs": {"unheard_of": 1}}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200


async def test_a_template_that_fails_is_a_400_naming_the_template(llada_tiny_path):
    failing = [
        "{{ messages[0].content + 1 }}",  # TypeError
        "{{ messages[0].nothing.deeper }}",  # UndefinedError
        "{{ raise_exception('no such role') }}",
        "{{ 1 // (messages | length - 1) }}",  # ZeroDivisionError
        "{{ messages.append(1) }}",  # SecurityError (the sandbox)
        "{% for %}",  # TemplateSyntaxError
    ]
    engine = tiny_engine(llada_tiny_path)
    async with serving(llada_tiny_path, engine=engine) as (_, client):
        for template in failing:
            engine.tokenizer.chat_template = template
            r = await client.post("/v1/chat/completions", json={"messages": CHAT})
            assert r.status_code == 400, (template, r.text)
            assert "chat template" in r.json()["error"]["message"]


BAD_EVENT_IDS: list[str | bytes] = [
    "9" * 5000,  # past int()'s digit limit
    "9" * 20,
    str(2**63),
    b"\xb2",  # latin-1 superscript two: str.isdigit() accepts it, int() does not
    "\u0661\u0662".encode(),  # Arabic-Indic digits, which int() reads
    "-1",
    "+3",
    "3.0",
    "3_0",
    "abc",
]


@pytest.mark.parametrize("where", ["header", "query"])
async def test_an_event_id_that_is_not_one_is_a_400_for_header_and_query(llada_tiny_path, where):
    param = "Last-Event-ID" if where == "header" else "last_event_id"
    async with serving(llada_tiny_path) as (_, client):
        r = await client.post("/v1/diffusion/generate", json={"prompt": "Hi", "max_tokens": 4})
        attach = f"/v1/diffusion/requests/{r.headers['x-request-id']}/events"
        for value in BAD_EVENT_IDS:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            sent = {"headers": {param: value}} if where == "header" else {"params": {param: text}}
            for url in (attach, "/v1/diffusion/events"):
                r = await client.get(url, **sent)
                assert r.status_code == 400, (url, value, r.text)
                assert r.json()["error"]["param"] == param
        for value in ("0" * 19, str(2**63 - 1)):
            sent = {"headers": {param: value}} if where == "header" else {"params": {param: value}}
            r = await client.get(attach, **sent)
            assert r.status_code == 200
