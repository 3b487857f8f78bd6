"""Training-free remasking (WINO's verify, `verify_threshold`) on the masked full-attention
runner: off is the plain rule bit for bit, remasks happen where they should and only there,
and every stream stays append-only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from marble.families.masked.config import preset
from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import Engine, StepOutput
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.step_result import REMASK
from tests.test_engine import tiny_engine


@pytest.fixture(scope="module")
def tokenizer(llada_dir: Path) -> TextTokenizer:
    return TextTokenizer(llada_dir)


class FrontierModel(nn.Module):
    """A model that doubts every filled position: at a masked generated position it predicts
    `script[g]`, confidently for the two leftmost masks only; at a filled one it predicts
    another token, so the token there falls to a probability near 0. Full forwards only."""

    def __init__(self, cfg, script: list[int], prompt_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList()  # no keys or values to keep
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script = torch.tensor(script)
        self.prompt_len = prompt_len

    def forward(self, ids, attention_mask=None, position_ids=None, gather=None, **_):
        gen = (position_ids - self.prompt_len).clamp(0, len(self.script) - 1)
        masked = ids == self.cfg.mask_token_id
        frontier = masked & (masked.long().cumsum(-1) <= 2)
        target = torch.where(masked, self.script[gen], (self.script[gen] + 1) % 300)
        logits = torch.zeros(*ids.shape, self.cfg.vocab_size)
        value = torch.where(frontier | ~masked, 10.0, 1.0)
        logits.scatter_(-1, target[..., None], value[..., None])
        return logits.gather(1, gather[..., None].expand(-1, -1, logits.shape[-1]))

    def project(self, hidden, out=None):
        return hidden if out is None else out.copy_(hidden)


def frontier_engine(tokenizer: TextTokenizer, script: list[int], prompt_len: int) -> Engine:
    special = tokenizer.special
    cfg = preset("tiny", mask_token_id=special.mask, eos_token_id=special.eos)
    return Engine(FrontierModel(cfg, script, prompt_len), tokenizer)


def run(engine: Engine, jobs: list[tuple], check=None) -> dict[str, list[StepOutput]]:
    """Queue (prompt, params[, suffix]) jobs and step to the end: each one's outputs, in order,
    each passed with its request to `check` as it comes."""
    requests = {}
    for job in jobs:
        request = engine.add(engine.make_request(*job))
        requests[request.request_id] = request
    ids = list(requests)
    outs: dict[str, list[StepOutput]] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            if check is not None:
                check(out, requests[out.request_id])
            outs[out.request_id].append(out)
    return {str(i): outs[rid] for i, rid in enumerate(ids)}


def trace(outs: list[StepOutput], text: bool = True) -> list[tuple]:
    """Everything a step shows, floats included, compared bit for bit; the text only where
    asked (verifying holds back the current block's text until the block is final)."""
    return [
        (o.committed, o.changes, o.tokens, o.num_masked, o.finish_reason, text and o.text)
        for o in outs
    ]


# Every commit rule and sampler the runner has, with healing, CFG and a suffix among them.
PLAIN = [
    ("def add(a, b):\n", SamplingParams(max_tokens=16, threshold=0.05, token_healing=True)),
    ("x", SamplingParams(max_tokens=24, steps=12, block_length=8, temperature=0.8, seed=3)),
    ("Once upon", SamplingParams(max_tokens=16, steps=8, remasking="random", seed=1)),
    ("import os", SamplingParams(max_tokens=16, steps=8, schedule="dream", remasking="entropy")),
    ("a b", SamplingParams(max_tokens=12, threshold=0.02, top_k=20, temperature=1.0, seed=9)),
    ("c", SamplingParams(max_tokens=16, steps=8, remasking="margin", top_p=0.9, seed=2)),
    ("guided", SamplingParams(max_tokens=10, steps=5, cfg_scale=1.5)),
    ("def f(", SamplingParams(max_tokens=12, steps=6, block_length=4), ") -> int:"),
]
CACHES = ("none", "prefix", "dual")


def with_params(jobs: list[tuple], **changes) -> list[tuple]:
    return [(job[0], job[1].replace(**changes), *job[2:]) for job in jobs]


def alternate(jobs: list[tuple], parity: int, **changes) -> list[tuple]:
    """`changes` on every other job (those whose index has `parity`)."""
    return [
        with_params([job], **changes)[0] if i % 2 == parity else job for i, job in enumerate(jobs)
    ]


def shown(outs: list[StepOutput]) -> list[tuple]:
    """What a step shows, as integers and text."""
    return [([(c.pos, c.token_id) for c in o.committed], o.tokens, o.text) for o in outs]


@pytest.mark.parametrize("cache", CACHES)
def test_verify_off_or_silent_is_the_plain_rule_bit_for_bit(tokenizer: TextTokenizer, cache: str):
    """verify_threshold 0 scores every filled position and remasks none (no probability is
    below 0): in a batch mixing such rows with rows that do not verify, every row's commits,
    confidences and log-probabilities equal the plain rule's, bit for bit. Rows that do not
    verify beside rows that remask show what they show beside plain rows."""
    plain = with_params(PLAIN, cache=cache)
    before = run(tiny_engine(tokenizer), plain)
    for parity in (0, 1):
        mixed = run(tiny_engine(tokenizer), alternate(plain, parity, verify_threshold=0.0))
        for i in before:
            assert trace(mixed[i], text=False) == trace(before[i], text=False)
            assert mixed[i][-1].text == before[i][-1].text
    beside = run(tiny_engine(tokenizer), alternate(plain, 0, verify_threshold=1.0))
    for i in range(1, len(plain), 2):
        assert shown(beside[str(i)]) == shown(before[str(i)])
    assert any(o.changes for i in range(0, len(plain), 2) for o in beside[str(i)])


@pytest.mark.parametrize("rule", ["threshold", "count"])
def test_a_doubted_token_is_remasked_and_filled_again(tokenizer: TextTokenizer, rule: str):
    """The frontier model commits two masks a step and doubts every filled token: each step
    remasks at most one fewer than it commits (lowest probability first, lower index on
    ties), never a token it commits in the same step, and the block still fills with the
    masked-position predictions. The count rule keeps its plan: remasked positions join the
    next step's count and the block ends in its planned steps."""
    prompt = tokenizer.encode("say:")
    script = tokenizer.encode(" alpha beta gamma delta")[:8]
    assert len(script) == 8
    engine = frontier_engine(tokenizer, script, len(prompt))
    base = SamplingParams(max_tokens=8, block_length=8, cache="none", verify_threshold=0.5)
    params = base.replace(threshold=0.5) if rule == "threshold" else base.replace(steps=4)
    outs = run(engine, [(prompt, params)])["0"]
    remasked = [[c.pos for c in o.changes] for o in outs]
    if rule == "threshold":
        # Two commits a step, one taken back (the lowest index among equally doubted ones),
        # until the last mask commits alone: 8 positions in 7 steps.
        assert remasked == [[], [0], [1], [0], [1], [0], []]
    else:
        # Plan 2, 2, 2, 2: step 1 commits 2 and takes back 1, step 2 commits 3 and takes
        # back 2, the last planned step commits the 4 left and takes back nothing.
        assert remasked == [[], [0], [1, 2], []]
        assert [len(o.committed) for o in outs] == [2, 2, 3, 4]
        assert len(outs) == outs[-1].total_steps == 4
    for prev, out in zip(outs, outs[1:]):
        committed = {c.pos for c in out.committed}
        assert len(out.changes) <= max(len(out.committed) - 1, 0)
        for change in out.changes:
            assert change.op == REMASK and change.token_id == tokenizer.special.mask
            assert change.pos not in committed and change.previous == prev.tokens[change.pos]
            assert change.score < 0.5
    assert outs[-1].tokens == script and outs[-1].finish_reason == "length"


def check_invariants(engine: Engine):
    """A per-step check: the prompt and suffix never change on the device canvas; a remask
    takes a token filled earlier in the current block; masks are counted right; the
    streamed text only grows."""
    mask = engine.special.mask
    last: dict[str, StepOutput] = {}

    def check(out: StepOutput, request: Request) -> None:
        row = engine.runner.rows.get(out.request_id)
        if row is not None:
            n = request.gen_start
            assert row.canvas[:n].tolist() == request.prompt_ids
            assert row.canvas[n + request.params.max_tokens :].tolist() == request.suffix_ids
        prev = last.get(out.request_id)
        committed = {c.pos for c in out.committed}
        start, end = request.blocks[out.block_index]
        for change in out.changes:
            assert change.op == REMASK and start <= change.pos < end
            assert change.pos not in committed and change.previous != mask
            assert prev is not None and prev.tokens[change.pos] == change.previous
        if prev is not None:
            assert out.text.startswith(prev.text)
        if request.heal_ids is not None:  # a re-checked first token keeps its constraint
            assert out.tokens[0] in (mask, *request.heal_ids)
        assert out.num_masked == sum(t == mask for t in out.tokens)
        last[out.request_id] = out

    return check


@pytest.mark.parametrize("cache", CACHES)
def test_remasks_only_take_back_generated_tokens_and_every_request_ends(
    tokenizer: TextTokenizer, cache: str
):
    """A random model doubts nearly everything: with verify_threshold 1 each row remasks as
    much as it may, under every cache and rule, and every request still ends."""
    engine = tiny_engine(tokenizer)
    jobs = with_params(PLAIN, cache=cache, verify_threshold=1.0)
    outs = run(engine, jobs, check_invariants(engine))
    assert sum(len(o.changes) for row in outs.values() for o in row) > 0
    for (_, params, *_), row in zip(jobs, outs.values()):
        final = row[-1]
        assert final.finish_reason in ("stop", "length")
        if final.finish_reason == "length":
            assert final.num_masked == 0
            # The threshold rule fills at least one net position a step; the count rule
            # ends on plan.
            limit = params.max_tokens if final.total_steps is None else final.total_steps
            assert len(row) <= limit
    assert engine.runner.rows == {} and engine.requests == {}


VERIFY = SamplingParams(
    max_tokens=24, block_length=8, threshold=0.003, temperature=0.9, seed=1234, verify_threshold=0.9
)


@pytest.mark.parametrize("params", [VERIFY, VERIFY.replace(steps=12, cache="prefix")])
def test_seeds_reproduce_and_batched_is_alone(tokenizer: TextTokenizer, params: SamplingParams):
    alone = run(tiny_engine(tokenizer), [("def add(a, b):", params)])["0"]
    again = run(tiny_engine(tokenizer), [("def add(a, b):", params)])["0"]
    batched = run(tiny_engine(tokenizer), [("def add(a, b):", params), *PLAIN])["0"]
    assert trace(again) == trace(alone)
    remasks = [[(c.pos, c.previous) for c in o.changes] for o in alone]
    assert shown(batched) == shown(alone)
    assert [[(c.pos, c.previous) for c in o.changes] for o in batched] == remasks
    assert any(o.changes for o in alone)
    reseeded = run(tiny_engine(tokenizer), [("def add(a, b):", params.replace(seed=5))])["0"]
    assert reseeded[-1].tokens != alone[-1].tokens


@pytest.fixture(scope="module")
def dream(dream_dir: Path) -> Engine:
    return Engine.from_pretrained(dream_dir, progress=False)


@pytest.mark.parametrize("cache", CACHES)
def test_a_shifted_model_checks_the_right_positions(dream: Engine, cache: str):
    """Dream scores position p with the output at p - 1 (the cached forwards' queries start
    one earlier): its checked positions follow the same alignment, so a silent verify is its
    plain rule bit for bit, and remasking keeps every invariant."""
    engine = dream
    jobs = with_params(PLAIN, cache=cache)
    before = run(engine, jobs)
    silent = run(engine, with_params(jobs, verify_threshold=0.0))
    for i in before:
        assert trace(silent[i], text=False) == trace(before[i], text=False)
    outs = run(engine, with_params(jobs, verify_threshold=1.0), check_invariants(engine))
    assert sum(len(o.changes) for row in outs.values() for o in row) > 0
    assert all(row[-1].finish_reason in ("stop", "length") for row in outs.values())
