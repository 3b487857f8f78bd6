"""Token healing on the shipped tokenizer (which merges a newline with the indentation after
it) and a tiny random model: the constraint, the text, the token counts, the API's defaults."""

from __future__ import annotations

import pytest
import torch

from marble.families.masked.config import preset
from marble.families.masked.model import Denoiser
from marble.model.default import CHECKPOINT_DIR
from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import Engine
from marble.scheduler.healing import heal
from marble.scheduler.sampling_params import SamplingParams
from marble.server.protocol import ChatCompletionRequest, CompletionRequest
from tests.server_helpers import parse_sse, serving

PROMPT = "def area(r):\n"
HEALED = SamplingParams(
    max_tokens=12, threshold=None, remasking="random", temperature=1.0, token_healing=True
)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(CHECKPOINT_DIR)


def random_engine(tokenizer: TextTokenizer) -> Engine:
    torch.manual_seed(0)
    s = tokenizer.special
    cfg = preset(
        "tiny",
        vocab_size=len(tokenizer),
        mask_token_id=s.mask,
        eos_token_id=s.eos,
        pad_token_id=s.eos,
    )
    return Engine(Denoiser(cfg).eval(), tokenizer)


def test_heal_takes_off_a_trailing_whitespace_token(tokenizer: TextTokenizer):
    banned = frozenset({tokenizer.special.mask, tokenizer.special.eos})
    ids = tokenizer.encode(PROMPT)
    healed, text, allowed = heal(tokenizer, ids, len(tokenizer), banned)
    assert healed == ids[:-1] and text == "\n"
    texts = [tokenizer.token_texts[i] for i in allowed]
    assert all(t.startswith("\n") for t in texts) and "\n   " in texts and "\n" in texts
    assert not banned & set(allowed)
    for unhealed in ("def area(r):", "\n"):  # no trailing whitespace; nothing left to keep
        ids = tokenizer.encode(unhealed)
        assert heal(tokenizer, ids, len(tokenizer), banned) == (ids, "", None)


def final_output(engine: Engine):
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    return outputs[-1]


@pytest.mark.parametrize("seed", range(6))
def test_healed_completion_starts_with_the_healed_text_and_reads_on(tokenizer, seed):
    engine = random_engine(tokenizer)
    request = engine.add(engine.make_request(PROMPT, HEALED.replace(seed=seed)))
    healed_prompt = list(request.prompt_ids)
    out = final_output(engine)
    assert out.prompt_tokens == len(tokenizer.encode(PROMPT)) == len(healed_prompt) + 1
    assert tokenizer.token_texts[out.tokens[0]].startswith("\n")
    # The prompt as sent plus the completion's text is what the model's tokens spell.
    spelled = tokenizer.decode(healed_prompt + out.tokens[: out.completion_tokens])
    assert PROMPT + out.text == spelled


def test_token_id_prompts_and_unhealed_params_stay_as_given(tokenizer):
    engine = random_engine(tokenizer)
    ids = tokenizer.encode(PROMPT)
    assert engine.add(engine.make_request(ids, HEALED)).prompt_ids == ids
    assert (
        engine.add(engine.make_request(PROMPT, HEALED.replace(token_healing=False))).prompt_ids
        == ids
    )


def test_chat_heals_only_when_asked():
    defaults = SamplingParams(token_healing=True)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert not ChatCompletionRequest(**chat).sampling_params(defaults).token_healing
    asked = ChatCompletionRequest(**chat, token_healing=True)
    assert asked.sampling_params(defaults).token_healing
    assert CompletionRequest(prompt="x").sampling_params(defaults).token_healing
    off = CompletionRequest(prompt="x", token_healing=False)
    assert not off.sampling_params(defaults).token_healing


@pytest.mark.anyio
async def test_api_text_logprobs_drafts_and_usage_leave_the_healed_text_out(tokenizer):
    body = {
        "prompt": PROMPT,
        "max_tokens": 12,
        "steps": 12,
        "remasking": "random",
        "temperature": 1.0,
        "seed": 1,
        "ignore_eos": True,
        "token_healing": True,
    }
    async with serving(CHECKPOINT_DIR, engine=random_engine(tokenizer)) as (_, client):
        full = (await client.post("/v1/completions", json={**body, "logprobs": 0})).json()
        (choice,) = full["choices"]
        assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
        assert full["usage"]["prompt_tokens"] == len(tokenizer.encode(PROMPT))
        r = await client.post("/v1/diffusion/generate", json={**body, "draft_every": 1})
        events = parse_sse(r.text)
        drafts = [e.json()["draft"] for e in events if e.event == "step"]
        done = next(e.json() for e in events if e.event == "request.completed")
        assert drafts[-1] == done["text"] == choice["text"]
        assert done["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"]
