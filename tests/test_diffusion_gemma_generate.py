"""DiffusionGemma's generate() and pipeline goldens replayed exactly (../shared/reference).

Every recorded transformers `generate()` run is replayed with its recorded draws: accept sets,
renoised canvases, argmaxes, stop flags, appended canvases, forward counts and final ids must
be identical. B = 1 runs also reproduce from a seeded generator making upstream's torch calls.
The two diffusers pipeline runs (greedy block refinement, entropy bound) replay from their seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from marble.families.diffusion_gemma.config import DiffusionGemmaGenerationConfig
from marble.families.diffusion_gemma.loader import load_diffusion_gemma
from marble.families.diffusion_gemma.model import DiffusionGemma
from tests import diffusion_gemma_replay as replay

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODEL_DIR = REFERENCE / "diffusiongemma-tiny"
GOLDEN = REFERENCE / "golden" / "diffusiongemma" / "golden_generate.json"
if not GOLDEN.exists():
    pytest.skip(f"reference data {GOLDEN} is absent", allow_module_level=True)
CASES = json.loads(GOLDEN.read_text())
BY_NAME = {c["name"]: c for c in CASES["cases"]}
PIPELINE = {c["name"]: c for c in CASES["diffusers_cases"]}


@pytest.fixture(scope="module")
def model() -> DiffusionGemma:
    return load_diffusion_gemma(MODEL_DIR)


def _params(case: dict) -> dict:
    """The case's effective settings, checked against generation_config.json's defaults."""
    params = dict(case["effective_params"])
    defaults = DiffusionGemmaGenerationConfig.from_folder(MODEL_DIR)
    assert tuple(params["eos_token_id"]) == defaults.eos_token_ids
    assert params["pad_token_id"] == defaults.pad_token_id
    return params


def _run(model: DiffusionGemma, case: dict, draws) -> replay.GenerateTrace:
    prompt = torch.tensor(case["prompt_ids"])
    mask = torch.tensor(case["attention_mask"]) if case["passes_attention_mask"] else None
    return replay.generate(model, prompt, mask, _params(case), draws)


def _ids(t: torch.Tensor) -> list:
    return t.long().tolist()


def _flags(t: torch.Tensor) -> list[bool]:
    return [bool(v) for v in t]


def _check(trace: replay.GenerateTrace, case: dict) -> None:
    assert len(trace.canvases) == len(case["canvases"])
    for c, (got, want) in enumerate(zip(trace.canvases, case["canvases"], strict=True)):
        where = f"{case['name']} canvas {c}"
        commit = want["encoder_commit"]
        assert _ids(got.encoded_ids) == commit["input_ids"], where
        assert _ids(got.encoded_positions) == commit["position_ids"], where
        assert _ids(got.initial) == want["initial_canvas"], where
        assert len(got.steps) == len(want["steps"]), where
        for s, (g, w) in enumerate(zip(got.steps, want["steps"], strict=True)):
            at = f"{where} step {s} (cur_step {w['cur_step']})"
            assert g.temperature == w["temperature"], at
            assert _ids(g.decoder_input) == w["decoder_input_canvas"], at
            assert _ids(g.positions) == w["decoder_position_ids"], at
            assert _ids(g.argmax) == w["argmax_canvas"], at
            assert _ids(g.accepted) == w["accepted_mask"], at
            assert _ids(g.canvas) == w["renoised_canvas"], at
            stop = w["stop"]
            assert _ids(g.argmax_in) == stop["argmax_in"], at
            assert _flags(g.stable) == stop["stable"], at
            assert _flags(g.confident) == stop["confident"], at
            assert _flags(g.fired) == stop["fired"], at
            assert _flags(g.frozen) == stop["finished_denoising_after"], at
        assert _ids(got.appended_argmax) == want["appended_argmax_canvas"], where
        assert _ids(got.appended) == want["appended_after_eos_handling"], where
        assert _flags(got.finished) == want["finished_sequences_after_this_canvas"], where
    forwards = case["num_forward_passes"]
    assert trace.encoder_forwards == forwards["encoder"]
    assert trace.decoder_forwards == forwards["decoder"]
    assert _ids(trace.counted) == forwards["decoder_per_row_counted_by_upstream"]
    assert trace.tokens_per_forward.tolist() == case["tokens_per_forward_returned"]
    assert _ids(trace.final_ids) == case["final_ids"]


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_generate_replays_recorded_draws(model: DiffusionGemma, name: str):
    case = BY_NAME[name]
    _check(_run(model, case, replay.RecordedDraws(case)), case)


@pytest.mark.parametrize(
    "name", ["c1_steps8_earlystop", "c3_eos_in_later_canvas", "c2_stability2_steps8"]
)
def test_generate_from_seed_makes_the_recorded_draws(model: DiffusionGemma, name: str):
    case = BY_NAME[name]
    _check(_run(model, case, replay.SeededDraws(case["torch_manual_seed"])), case)


def test_golden_covers_every_case_once():
    assert len(BY_NAME) == 14 and len(PIPELINE) == 2


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_pipeline_replays_from_its_generator(model: DiffusionGemma, name: str):
    case = PIPELINE[name]
    canvases, final_ids, enc, dec = replay.pipeline(model, torch.tensor([case["prompt_ids"]]), case)
    assert len(canvases) == len(case["canvases"])
    for c, (got, want) in enumerate(zip(canvases, case["canvases"], strict=True)):
        where = f"{name} canvas {c}"
        assert _ids(got.initial[0]) == want["initial_canvas"], where
        assert len(got.steps) == len(want["steps"]), where
        for s, (g, w) in enumerate(zip(got.steps, want["steps"], strict=True)):
            at = f"{where} step {s}"
            assert _ids(g.decoder_input[0]) == w["decoder_input_canvas"], at
            assert _ids(g.argmax[0]) == w["raw_argmax"], at
            assert _ids(g.committed_this_step[0]) == w["committed_or_accepted_this_step"], at
            assert _ids(g.canvas[0]) == w["prev_sample"], at
            assert g.mean_entropy == pytest.approx(w["mean_entropy_of_pred_logits"], abs=1e-4)
        assert got.stop_fired == want["stop_fired"], where
        assert _ids(got.appended[0]) == want["appended_canvas"], where
    assert _ids(final_ids[0]) == case["final_ids"]
    generated = final_ids[0, len(case["prompt_ids"]) :]
    assert [_ids(generated)] == case["sequences_returned"]
    assert (enc, dec) == (
        case["num_forward_passes"]["encoder"],
        case["num_forward_passes"]["decoder"],
    )
