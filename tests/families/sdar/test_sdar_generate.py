"""SDAR's model and decoding functions replay upstream block_diffusion_generate()
(../shared/reference/golden/sdar/golden_generate.json) through a test-side loop written from
the reference's section 8.5: prefill of the prompt's full blocks, per block a denoising forward
per step over the cache, a store call once the block has no mask, the stop test after a block.

The 14 cases without an overwrite match call for call (kind, positions, cache lengths, inputs),
selection for selection, canvas for canvas, NFE and final ids; the two sampled ones by seed.
The two `*overwrite*` cases agree up to the recorded overwrite and differ exactly there, since
Marble commits only masked positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from marble.families.sdar.config import Remasking
from marble.families.sdar.loader import load_sdar
from marble.families.sdar.model import SDAR
from marble.families.sdar.sampling import commit, first_stop, select
from marble.model.sampling import joint_predict, llada_counts
from tests.sdar_golden import EXACT, OVERWRITE, SDAR_TINY

PROB_TOLERANCE = 2e-5  # recorded x0_prob is rounded to 1e-6; measured max |delta| 4.3e-6


@dataclass
class Run:
    canvas: torch.Tensor
    forwards: list[dict] = field(default_factory=list)


def _long(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def generate(model: SDAR, case: dict) -> Run:
    """generate.py's loop over Marble's model and sampling functions, one row, every call
    recorded in the golden's terms."""
    p = case["params"]
    prompt, mask = case["prompt_ids"], p["mask_id"]
    size, steps = p["block_length"], p["denoising_steps"]
    num_blocks = math.ceil((len(prompt) + p["gen_length"]) / size)
    run = Run(torch.full((num_blocks * size,), mask, dtype=torch.long))
    run.canvas[: len(prompt)] = torch.tensor(prompt)
    cache = model.new_cache(1)
    seed = case["seed"]
    generators = [None if seed is None else torch.Generator().manual_seed(seed)]
    knobs = [torch.tensor([float(p["temperature"])]), _long(p["top_k"]), torch.tensor([p["top_p"]])]
    rule = _long(Remasking.from_name(p["remasking_strategy"]))
    threshold = torch.tensor([p["confidence_threshold"]])
    stops = None if p["stopping_criteria_idx"] is None else torch.tensor(p["stopping_criteria_idx"])

    def call(kind: str, start: int, end: int, store: bool) -> torch.Tensor:
        ids = run.canvas[start:end].clone()
        before = cache.length
        hidden = model(ids[None], torch.arange(start, end)[None], cache, store, block_length=size)
        run.forwards.append(
            {
                "kind": kind,
                "positions": [start, end],
                "cache_length_before": before,
                "cache_length_after": cache.length,
                "input_ids": ids.tolist(),
            }
        )
        return hidden

    first = len(prompt) // size
    if first:
        call("prefill", 0, first * size, True)
    for block in range(first, num_blocks):
        s, e = block * size, (block + 1) * size
        for step in range(steps + 1):
            cur = run.canvas[s:e]
            masked = (cur == mask)[None]
            if not bool(masked.any()):
                call("store", s, e, True)
                break
            logits = model.project(call("denoise", s, e, False)[0])[None]
            x0, conf = joint_predict(logits, *knobs, generators)
            k = llada_counts(_long(size), _long(steps), _long(step))
            chosen = select(conf, masked, k, rule, threshold)
            run.canvas[s:e] = commit(cur[None], x0, chosen)[0]
            picked = (chosen[0].nonzero().flatten() + s).tolist()
            run.forwards[-1] |= {
                "step": step,
                "num_transfer_tokens": int(k),
                "x0": x0[0].tolist(),
                "x0_prob": conf[0].tolist(),
                "selected": picked,
                "committed": picked,
                "canvas_after": run.canvas.tolist(),
            }
        generated = run.canvas[len(prompt) :][None]
        if stops is not None and int(first_stop(generated, stops)) < generated.shape[1]:
            break
    return run


@pytest.fixture(scope="module")
def model() -> SDAR:
    return load_sdar(SDAR_TINY)


KEYS = ("kind", "positions", "cache_length_before", "cache_length_after", "input_ids")
DENOISE_KEYS = ("step", "num_transfer_tokens", "committed", "canvas_after")


def _same_forward(got: dict, want: dict, where: str) -> None:
    for key in KEYS:
        assert got[key] == want[key], f"{where}: {key}"
    if want["kind"] != "denoise":
        return
    for key in DENOISE_KEYS:
        assert got[key] == want[key], f"{where}: {key}"
    assert sorted(got["selected"]) == sorted(want["selected"]), f"{where}: selected"
    assert got["x0"] == want["x0"], f"{where}: x0"
    delta = max(abs(a - b) for a, b in zip(got["x0_prob"], want["x0_prob"]))
    assert delta <= PROB_TOLERANCE, f"{where}: x0_prob off by {delta:.1e}"


@pytest.mark.parametrize("case", EXACT, ids=[c["name"] for c in EXACT])
def test_replays_every_call_and_decision(model: SDAR, case: dict):
    run = generate(model, case)
    assert len(run.forwards) == len(case["forwards"]) == case["num_forward_passes"]
    for i, (got, want) in enumerate(zip(run.forwards, case["forwards"])):
        _same_forward(got, want, f"{case['name']} call {i}")
    kinds = [f["kind"] for f in run.forwards]
    assert kinds.count("prefill") == case["num_prefill_forwards"]
    assert kinds.count("denoise") == case["num_denoise_forwards"]
    assert kinds.count("store") == case["num_store_forwards"]
    assert run.canvas.tolist() == case["final_ids"]


@pytest.mark.parametrize("case", OVERWRITE, ids=[c["name"] for c in OVERWRITE])
def test_overwrite_cases_differ_only_at_the_overwrite(model: SDAR, case: dict):
    """Identical up to the step where upstream's top-k took non-masked positions; at that step
    the same masked positions are committed and the block differs exactly at the overwritten
    positions (ours keeps the old tokens); the prompt and every decoded token stay put."""
    (event,) = case["overwrite_events"]
    run = generate(model, case)
    for i in range(event["call"]):
        _same_forward(run.forwards[i], case["forwards"][i], f"{case['name']} call {i}")
    got, want = run.forwards[event["call"]], case["forwards"][event["call"]]
    for key in KEYS:
        assert got[key] == want[key]
    assert got["committed"] == want["committed"] and got["x0"] == want["x0"]
    overwritten = {o["position"]: o for o in event["overwritten"]}
    for pos, (ours, theirs) in enumerate(zip(got["canvas_after"], want["canvas_after"])):
        if pos in overwritten:
            assert (ours, theirs) == (overwritten[pos]["old"], overwritten[pos]["new"])
        else:
            assert ours == theirs, f"position {pos}"
    prompt = case["prompt_ids"]
    assert run.canvas[: len(prompt)].tolist() == prompt
    mask = case["params"]["mask_id"]
    for f in run.forwards:
        if f["kind"] == "denoise":
            before = torch.tensor(f["input_ids"])
            after = torch.tensor(f["canvas_after"][f["positions"][0] : f["positions"][1]])
            changed = (before != after).nonzero().flatten() + f["positions"][0]
            assert changed.tolist() == sorted(f["committed"])
            assert all(f["input_ids"][c - f["positions"][0]] == mask for c in f["committed"])
