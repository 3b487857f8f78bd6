"""LLaDA2.1's generate() goldens replayed exactly with the block cache (../shared/reference).

Every `strict` run (block-causal attention, what a KV cache computes) is replayed: each
forward's input block, commit and edit sets and resulting block, each block's exit, the
forward count, the final canvas and the returned ids must be identical; once per case alone,
and once with all cases in one batch whose rows advance independently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marble.families.llada2.config import (
    PRESETS,
    JointThresholdSettings,
    LLaDA2GenerationConfig,
)
from marble.families.llada2.loader import load_llada2
from marble.families.llada2.model import LLaDA2
from marble.model.tokenizer import TextTokenizer
from tests import llada2_replay as replay

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODEL_DIR = REFERENCE / "llada2-tiny"
GOLDEN = REFERENCE / "golden" / "llada2" / "golden_generate.json"
if not GOLDEN.exists():
    pytest.skip(f"reference data {GOLDEN} is absent", allow_module_level=True)
CASES = {c["name"]: c for c in json.loads(GOLDEN.read_text())["cases"]}
EXITS = {"settled": replay.SETTLED, "post_step_budget": replay.BUDGET}


@pytest.fixture(scope="module")
def model() -> LLaDA2:
    return load_llada2(MODEL_DIR)


@pytest.fixture(scope="module")
def ids() -> tuple[int, int]:
    """(mask, eos) from the checkpoint's files, checked against the goldens'."""
    special = TextTokenizer(MODEL_DIR).special
    eos = LLaDA2GenerationConfig.from_folder(MODEL_DIR).eos_token_id
    assert eos == special.eos
    return special.mask, eos


def _start(model: LLaDA2, case: dict, ids: tuple[int, int]) -> replay.Run:
    params = case["params"]
    assert (params["mask_id"], params["eos_id"]) == ids
    settings = JointThresholdSettings(
        threshold=params["threshold"],
        editing_threshold=params["editing_threshold"],
        max_post_steps=params["max_post_steps"],
        block_length=params["block_length"],
        num_to_transfer=params["num_to_transfer"],
        eos_early_stop=params["eos_early_stop"],
        temperature=params["temperature"],
    )
    return replay.start(model, case["prompt_ids"], settings, params["gen_length"], ids[0])


def _check(run: replay.Run, case: dict, eos: int) -> None:
    want = case["runs"]["strict"]
    name = case["name"]
    assert len(run.forwards) == want["num_forward_passes"] == len(want["forwards"]), name
    for i, (got, w) in enumerate(zip(run.forwards, want["forwards"], strict=True)):
        at = f"{name} forward {i}"
        assert got.block == w["block"] and got.post_step == w["post_step"], at
        assert got.input_block == w["input_block"], at
        assert got.committed == w["committed"], at
        assert got.edited == w["edited"], at
        assert got.block_after == w["block_after"], at
        assert got.settled == w["settled"], at
    assert [b.block for b in run.blocks] == want["blocks_run"], name
    for got, w in zip(run.blocks, want["blocks"], strict=True):
        assert got.exit == EXITS[w["exit"]], f"{name} block {w['block']}"
        assert got.final_block == w["final_block"], f"{name} block {w['block']}"
        # A block needs an encode of its own exactly when its last forward did not see it.
        assert (got.exit == replay.SETTLED) == w["last_forward_saw_final_block"]
    unseen = sum(not w["last_forward_saw_final_block"] for w in want["blocks"][:-1])
    assert run.encoded_blocks == unseen, name
    assert run.canvas.tolist() == want["final_canvas"], name
    assert run.final_ids(eos) == want["final_ids"], name


@pytest.mark.parametrize("name", sorted(CASES))
def test_strict_run_replays_alone(model: LLaDA2, ids: tuple[int, int], name: str):
    run = _start(model, CASES[name], ids)
    replay.generate(model, [run], *ids)
    _check(run, CASES[name], ids[1])


def test_all_cases_batched_replay_each_alone(model: LLaDA2, ids: tuple[int, int]):
    runs = [_start(model, case, ids) for case in CASES.values()]
    calls = replay.generate(model, runs, *ids)
    for run, case in zip(runs, CASES.values()):
        _check(run, case, ids[1])
    assert calls == max(len(r.forwards) for r in runs)


def test_golden_cases_cover_the_presets():
    """The goldens' settings are generate()'s defaults and the model card's presets."""
    assert len(CASES) == 13
    pairs = {(c["params"]["threshold"], c["params"]["editing_threshold"]) for c in CASES.values()}
    for preset in PRESETS.values():
        assert (preset.threshold, preset.editing_threshold) in pairs
