"""One request's bad luck fails that request alone: non-finite logits, an exception in its
step, whatever sits in padding. Its batch mates go on and get what they would alone."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from marble.families.masked.loader import load_model
from marble.model.loader import CheckpointError
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams
from tests.server_helpers import serving, tiny_engine

PROMPTS = [[5 + i, 40 + 3 * i, 7] * (1 + i % 3) for i in range(7)]


def _params(i: int) -> SamplingParams:
    # Sampled and seeded: a batch mate's tokens then depend on its generator surviving the
    # failed step untouched, not only on its canvas.
    return SamplingParams(max_tokens=16, block_length=8, temperature=0.9, seed=i, ignore_eos=True)


def _alone(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return list(engine.generate(prompt, params))[-1].tokens


def _unused(engine: Engine, outputs: list[list[int]]) -> int:
    """A token no prompt holds and no healthy request commits (their tokens are known from
    their runs alone): poisoning it touches only the request that sends it."""
    used = {t for ids in [*PROMPTS, *outputs] for t in ids} | engine.special.stop_ids
    return next(t for t in range(len(engine.tokenizer)) if t not in used)


def _run_batch(engine: Engine, prompts: list[list[int]]) -> dict[int, object]:
    ids = [engine.add(engine.make_request(p, _params(i))).request_id for i, p in enumerate(prompts)]
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[ids.index(out.request_id)] = out
    return final


def _poison_embedding(engine: Engine, token: int) -> None:
    with torch.no_grad():
        engine.model.embed.weight[token] = float("nan")


def test_non_finite_logits_fail_that_row_alone(llada_tiny_path: Path):
    engine = tiny_engine(llada_tiny_path)
    expected = [_alone(engine, p, _params(i)) for i, p in enumerate(PROMPTS)]
    poison = _unused(engine, expected)
    _poison_embedding(engine, poison)
    final = _run_batch(engine, [*PROMPTS, [poison, 9, 10]])
    poisoned = final[len(PROMPTS)]
    assert poisoned.finish_reason == "error" and poisoned.error_code == "non_finite_logits"
    for i in range(len(PROMPTS)):
        assert final[i].finish_reason == "length" and final[i].tokens == expected[i]


class _Raises(torch.nn.Module):
    """The tiny model, except that a forward over a canvas holding `trigger` raises."""

    def __init__(self, model: torch.nn.Module, trigger: int) -> None:
        super().__init__()
        self.inner, self.cfg, self.trigger = model, model.cfg, trigger
        self.project, self.layers = model.project, model.layers

    def forward(self, input_ids, *args, **kwargs):
        if bool((input_ids == self.trigger).any()):
            raise RuntimeError("boom")
        return self.inner(input_ids, *args, **kwargs)

    def forward_cached(self, input_ids, *args, **kwargs):
        if bool((input_ids == self.trigger).any()):
            raise RuntimeError("boom")
        return self.inner.forward_cached(input_ids, *args, **kwargs)


def test_an_exception_in_a_step_fails_only_the_row_that_raised(llada_tiny_path: Path):
    """Before: one row's exception failed all 8 requests of its batch."""
    base = tiny_engine(llada_tiny_path)
    expected = [_alone(base, p, _params(i)) for i, p in enumerate(PROMPTS)]
    trigger = _unused(base, expected)
    engine = Engine(_Raises(base.model, trigger), base.tokenizer)
    final = _run_batch(engine, [*PROMPTS, [trigger, 9, 10]])
    assert final[len(PROMPTS)].finish_reason == "error"
    assert final[len(PROMPTS)].error_code == "step_failed"
    assert "boom" in final[len(PROMPTS)].error
    for i in range(len(PROMPTS)):
        assert final[i].finish_reason == "length" and final[i].tokens == expected[i]


def test_padding_cannot_influence_real_positions(llada_tiny_path: Path):
    """Before: NaN only in the pad token's embedding row turned a short request batched with
    a longer one into garbage, while alone it was fine."""
    engine = tiny_engine(llada_tiny_path)
    pad = 200  # an ordinary id as the pad, so only padding ever embeds it
    engine.runner.pad_id = pad
    short, long = [5, 6, 7], [8, 9, 10, 11] * 20
    expected = [_alone(engine, p, _params(i)) for i, p in enumerate([short, long])]
    _poison_embedding(engine, pad)
    final = _run_batch(engine, [short, long])
    assert [final[0].tokens, final[1].tokens] == expected
    assert {final[0].finish_reason, final[1].finish_reason} == {"length"}


@pytest.mark.anyio
async def test_a_poisoned_request_in_a_batch_of_8_fails_alone_over_http(llada_tiny_path: Path):
    engine = tiny_engine(llada_tiny_path)
    poison = _unused(engine, [_alone(engine, p, _params(i)) for i, p in enumerate(PROMPTS)])
    _poison_embedding(engine, poison)
    async with serving(llada_tiny_path, engine=engine) as (_, client):
        bodies = [
            {"prompt": p, "max_tokens": 16, "block_length": 8, "seed": i, "temperature": 0.9}
            for i, p in enumerate([*PROMPTS, [poison, 9, 10]])
        ]
        for body in bodies:
            body["ignore_eos"] = True  # the same work as `_params`, so `poison` stays unused
        responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200] * 7 + [500]
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in responses[:7])
    assert responses[7].json()["error"]["code"] == "non_finite_logits"
    assert 'marble_request_errors_total{code="non_finite_logits"} 1.0' in metrics


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(
    llada_tiny_path: Path, tmp_path: Path
):
    """Before: a NaN LM head was served silently ("!!!!", 200)."""
    folder = tmp_path / "nan-head"
    shutil.copytree(llada_tiny_path, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.transformer.ff_out.weight"][3, 5] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.transformer.ff_out.weight"):
        load_model(folder, progress=False)
    # float32 weights beyond float16's range turn infinite in the cast: refused too.
    tensors["model.transformer.ff_out.weight"][3, 5] = 1e6
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_model(folder, dtype=torch.float16, progress=False)
    assert load_model(folder, progress=False) is not None
