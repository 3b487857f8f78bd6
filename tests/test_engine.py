"""Engine invariants on tiny models: properties, not exact strings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from marble.families.masked.config import preset
from marble.families.masked.family import MaskedFamily
from marble.families.masked.model import Denoiser
from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.scheduler import SchedulerConfig


@pytest.fixture(scope="module")
def tokenizer(llada_dir: Path) -> TextTokenizer:
    return TextTokenizer(llada_dir)


def tiny_engine(tokenizer: TextTokenizer, **config) -> Engine:
    torch.manual_seed(0)
    special = tokenizer.special
    cfg = preset(
        "tiny", mask_token_id=special.mask, eos_token_id=special.eos, pad_token_id=special.pad
    )
    model = Denoiser(cfg).eval()
    return Engine(model, tokenizer, SchedulerConfig(**config))


class ScriptedModel(nn.Module):
    """Predicts `script[pos]` at each generated position, with confidence rising left to right.

    Its "hidden states" are already those logits, so its projection is the identity."""

    def __init__(self, cfg, script: list[int], prompt_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList()  # no keys or values to keep
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script = torch.tensor(script)
        self.prompt_len = prompt_len

    def forward(
        self,
        ids,
        attention_mask=None,
        position_ids=None,
        gather=None,
        align=True,
        keep=None,
        project=True,
    ):
        return self._script(position_ids.gather(1, gather))

    def forward_cached(self, ids, position_ids, parts, slots, gather, project=True):
        return self._script(position_ids.gather(1, gather))

    def project(self, hidden, out=None):
        return hidden if out is None else out.copy_(hidden)

    def _script(self, positions):
        b, w = positions.shape
        gen_pos = (positions - self.prompt_len).clamp(0, len(self.script) - 1)
        logits = torch.zeros(b, w, self.cfg.vocab_size)
        logits.scatter_(-1, self.script[gen_pos][..., None], 10.0 - 0.01 * gen_pos[..., None])
        return logits


def scripted_engine(tokenizer: TextTokenizer, script: list[int], prompt_len: int) -> Engine:
    special = tokenizer.special
    cfg = preset("tiny", mask_token_id=special.mask, eos_token_id=special.eos)
    return Engine(ScriptedModel(cfg, script, prompt_len), tokenizer)


PROMPTS = ["def add(a, b):", "x", "Once upon a time there was a", "import os\nimport sys\n"]
SAMPLERS = [
    SamplingParams(max_tokens=16),
    SamplingParams(max_tokens=24, threshold=None, steps=12, block_length=8),
    SamplingParams(max_tokens=20, threshold=None, remasking="random", temperature=0.8, seed=3),
    SamplingParams(
        max_tokens=16, threshold=None, schedule="dream", block_length=None, remasking="entropy"
    ),
    SamplingParams(max_tokens=12, threshold=0.5, top_k=20, temperature=1.0, seed=9),
    SamplingParams(
        max_tokens=16,
        threshold=None,
        steps=8,
        remasking="margin",
        top_p=0.9,
        temperature=0.5,
        seed=1,
    ),
    SamplingParams(max_tokens=10, cfg_scale=1.5),
]


def test_invariants_hold_every_step(tokenizer: TextTokenizer):
    engine = tiny_engine(tokenizer)
    requests = {}
    for i, params in enumerate(SAMPLERS):
        prompt = PROMPTS[i % len(PROMPTS)]
        r = engine.add(engine.make_request(prompt, params))
        requests[r.request_id] = (tokenizer.encode(prompt), r)
    last = {rid: None for rid in requests}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            prompt_ids, request = requests[out.request_id]
            row = engine.runner.rows.get(out.request_id)
            if row is not None:  # prompt tokens never change on the device canvas
                assert row.canvas[: len(prompt_ids)].tolist() == prompt_ids
            previous = last[out.request_id]
            if previous is not None:
                assert out.num_masked <= previous.num_masked  # masks never grow
                for old, new in zip(previous.tokens, out.tokens):  # commits are final
                    assert old == tokenizer.special.mask or old == new
                assert out.text.startswith(previous.text)  # stable text only grows
            assert out.num_masked == sum(t == tokenizer.special.mask for t in out.tokens)
            last[out.request_id] = out
            if out.finished:
                finals[out.request_id] = out
    assert set(finals) == set(requests)
    for out in finals.values():
        assert out.finish_reason in ("stop", "length")
        if out.finish_reason == "length":
            assert out.num_masked == 0
    assert engine.runner.rows == {} and engine.requests == {}


def final_tokens(engine: Engine, prompt: str, params: SamplingParams, others=()) -> list[int]:
    target = engine.add(engine.make_request(prompt, params))
    for i, other in enumerate(others):
        engine.add(engine.make_request(PROMPTS[i % len(PROMPTS)] * (i + 1), other))
    result = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == target.request_id and out.finished:
                result = out.tokens
    return result


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(
            max_tokens=24,
            threshold=None,
            steps=12,
            block_length=8,
            temperature=0.9,
            remasking="random",
            seed=1234,
        ),
        SamplingParams(max_tokens=24, threshold=0.3, temperature=1.0, top_p=0.95, seed=77),
    ],
)
def test_same_seed_alone_or_batched(tokenizer: TextTokenizer, params: SamplingParams):
    alone = final_tokens(tiny_engine(tokenizer), "def add(a, b):", params)
    batched = final_tokens(tiny_engine(tokenizer), "def add(a, b):", params, others=SAMPLERS)
    assert alone == batched
    reseeded = final_tokens(tiny_engine(tokenizer), "def add(a, b):", params.replace(seed=5))
    assert reseeded != alone  # the seed does matter when sampling


def test_temperature_zero_ignores_seed(tokenizer: TextTokenizer):
    params = SamplingParams(max_tokens=16, threshold=None, steps=8)
    runs = {
        tuple(final_tokens(tiny_engine(tokenizer), "hello", params.replace(seed=s)))
        for s in (None, 1, 2)
    }
    assert len(runs) == 1


def test_abort_frees_the_slot(tokenizer: TextTokenizer):
    engine = tiny_engine(tokenizer, max_batch_size=2)
    params = SamplingParams(max_tokens=32, threshold=None)
    a, b, c = (engine.add(engine.make_request("hi", params)) for _ in range(3))
    engine.step()
    assert engine.scheduler.num_running == 2 and engine.scheduler.num_waiting == 1
    engine.abort(a.request_id)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[a.request_id].finished and outs[a.request_id].finish_reason == "abort"
    assert a.request_id not in engine.runner.rows
    assert {r.request_id for r in engine.scheduler.running} == {b.request_id, c.request_id}
    assert c.request_id in outs and not outs[c.request_id].finished


def test_eos_stops_after_its_block(tokenizer: TextTokenizer):
    prompt = tokenizer.encode("hello")
    word = tokenizer.encode(" world")[0]
    eos = tokenizer.special.eos
    script = [word] * 6 + [eos] * 10
    engine = scripted_engine(tokenizer, script, len(prompt))
    params = SamplingParams(max_tokens=16, block_length=4, threshold=None, steps=16)
    outs = list(engine.generate(prompt, params))
    final = outs[-1]
    assert final.finish_reason == "stop"
    assert final.step < 16  # no forwards after the block holding EOS completed
    assert final.text == tokenizer.decode([word] * 6)
    assert final.completion_tokens == 6 and final.num_masked == 0


@pytest.mark.parametrize("which", ["eos", "eot"])
def test_a_model_that_prefers_a_stop_token_stops_at_once(tokenizer: TextTokenizer, which: str):
    """EOS and the end-of-turn token end the text where they stand in the stable prefix, and
    no forward is spent after that; with ignore_eos they are text like any other token."""
    prompt = tokenizer.encode("hello")
    token = getattr(tokenizer.special, which)
    engine = scripted_engine(tokenizer, [token] * 16, len(prompt))
    outs = list(engine.generate(prompt, SamplingParams(max_tokens=16, block_length=4)))
    assert len(outs) == 1 and outs[-1].finish_reason == "stop"
    assert outs[-1].text == "" and outs[-1].completion_tokens == 0 and outs[-1].num_masked == 0
    params = SamplingParams(max_tokens=16, block_length=4, ignore_eos=True)
    outs = list(engine.generate(prompt, params))
    assert outs[-1].finish_reason == "length" and len(outs) == 4  # one forward per block
    assert outs[-1].tokens == [token] * 16


@pytest.mark.parametrize("stop", [" gamma", "gamma", "a g", "ta"])
def test_stop_string_cuts_text_and_nothing_shown_is_taken_back(tokenizer: TextTokenizer, stop: str):
    prompt = tokenizer.encode("say:")
    words = " alpha beta gamma delta epsilon zeta eta theta"
    script = tokenizer.encode(words)
    engine = scripted_engine(tokenizer, script, len(prompt))
    # One token per step, left to right: the stable text passes through every prefix, so some
    # step ends exactly one character short of the stop string.
    params = SamplingParams(
        max_tokens=len(script), block_length=None, steps=len(script), stop=(stop,)
    )
    texts = [o.text for o in engine.generate(prompt, params)]
    assert texts[-1] == words[: words.index(stop)]
    assert len(texts) >= 8  # one step per token: the intermediate texts were there to check
    assert all(texts[-1].startswith(t) for t in texts)  # held back until the stop was decided


@pytest.mark.parametrize("banned", ["mask", "undecodable"])
def test_a_model_that_prefers_a_banned_id_never_commits_it(tokenizer: TextTokenizer, banned):
    """The mask (a committed mask would never resolve) and ids the tokenizer cannot decode
    (embedding rows past its vocabulary) are never committed, however strongly predicted."""
    prompt = tokenizer.encode("hi")
    cfg_vocab = preset("tiny").vocab_size
    assert cfg_vocab > len(tokenizer)  # the tiny model has rows the tokenizer cannot decode
    token = tokenizer.special.mask if banned == "mask" else cfg_vocab - 1
    engine = scripted_engine(tokenizer, [token] * 8, len(prompt))
    params = SamplingParams(max_tokens=8, block_length=4, steps=8)
    engine.add(engine.make_request(prompt, params))
    outs = []
    for _ in range(8):  # bounded: a committed mask would keep the request running forever
        outs += engine.step()
        if outs[-1].finished:
            break
    committed = [c.token_id for o in outs for c in o.committed]
    assert len(committed) == 8 and token not in committed
    assert outs[-1].finished and outs[-1].num_masked == 0
    assert all(0 <= t < len(tokenizer) and t != tokenizer.special.mask for t in outs[-1].tokens)


def test_bad_requests_raise_value_error(tokenizer: TextTokenizer):
    engine = tiny_engine(tokenizer)
    with pytest.raises(ValueError):
        engine.add(engine.make_request("", SamplingParams()))
    with pytest.raises(ValueError):
        engine.add(engine.make_request([tokenizer.special.mask], SamplingParams()))
    with pytest.raises(ValueError):
        engine.add(engine.make_request([10_000], SamplingParams()))
    with pytest.raises(ValueError):
        engine.add(engine.make_request("x", SamplingParams(max_tokens=10_000)))
    assert not engine.has_unfinished()


def test_a_loaded_checkpoint_builds_its_runner_once(monkeypatch):
    built = []
    runner = MaskedFamily.runner.__func__
    monkeypatch.setattr(
        MaskedFamily,
        "runner",
        classmethod(lambda cls, served: built.append(1) or runner(cls, served)),
    )
    engine = Engine.from_pretrained(progress=False)
    assert len(built) == 1 and engine.runner is engine.first.runner
