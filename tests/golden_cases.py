"""Golden `generate()` runs of the reference data as engine requests, and the checks that an
engine's step outputs replay them: shared by the per-family parity tests and the test that
serves several families in one engine. Also the golden tensors, on the tests' device."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from marble.scheduler.engine import Engine, StepOutput
from marble.scheduler.sampling_params import SamplingParams

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
DG_GOLDEN = REFERENCE / "golden" / "diffusiongemma" / "golden_generate.json"
DG_CHECKPOINT = REFERENCE / "diffusiongemma-tiny"
DG_EOS = (1, 106, 50)


def golden_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """A golden safetensors file's tensors on `device` (any torch device: safetensors' own
    device argument refuses some, such as meta)."""
    return {name: t.to(device) for name, t in load_file(str(path)).items()}


def dg_cases() -> list[dict]:
    """The recorded DiffusionGemma runs of one prompt each."""
    return [c for c in json.loads(DG_GOLDEN.read_text())["cases"] if len(c["prompt_ids"]) == 1]


def dg_params(defaults: SamplingParams, case: dict) -> SamplingParams:
    p = case["effective_params"]
    return defaults.replace(
        max_tokens=p["max_new_tokens"],
        steps=p["max_denoising_steps"],
        t_min=p["t_min"],
        t_max=p["t_max"],
        entropy_bound=p["entropy_bound"],
        stability_threshold=p["stability_threshold"],
        confidence_threshold=p["confidence_threshold"],
        seed=case["torch_manual_seed"],
    )


def _dg_expected_tokens(case: dict) -> list[int]:
    """The golden's generated ids cut to max_tokens and at the first stop id (kept)."""
    ids = case["generated_ids"][0][: case["effective_params"]["max_new_tokens"]]
    cut = next((i for i, t in enumerate(ids) if t in DG_EOS), None)
    return ids if cut is None else ids[: cut + 1]


def assert_dg_replayed(case: dict, outs: list[StepOutput], canvas_length: int) -> None:
    """Every step's shown canvas, accept count, changed positions and canvas end as recorded;
    the final ids, forwards of each kind and finish reason too."""
    max_tokens = case["effective_params"]["max_new_tokens"]
    steps = [(c, s) for c in case["canvases"] for s in c["steps"]]
    assert len(outs) == len(steps)
    for out, (canvas, step) in zip(outs, steps):
        index = canvas["canvas_index"]
        start, end = index * canvas_length, min((index + 1) * canvas_length, max_tokens)
        last = step is canvas["steps"][-1]
        shown = canvas["appended_argmax_canvas"][0] if last else step["renoised_canvas"][0]
        assert out.tokens[start:end] == shown[: end - start]
        assert out.extras["accepted"] == step["num_accepted"][0]
        assert out.extras["canvas_completed"] == last
        before = step["decoder_input_canvas"][0]
        changed = {c.pos - start for c in out.changes}
        assert changed == {i for i in range(end - start) if shown[i] != before[i]}
    final = outs[-1]
    expected = _dg_expected_tokens(case)
    assert final.tokens[: len(expected)] == expected
    counts = case["num_forward_passes"]
    assert final.forwards_total == {"encode": counts["encoder"], "decode": counts["decoder"]}
    stopped = expected[-1] in DG_EOS and len(expected) <= max_tokens
    assert final.finish_reason == ("stop" if stopped else "length")


def llada_cases(golden_dir: Path, name: str) -> list[dict]:
    return json.loads((golden_dir / name / "golden_generate.json").read_text())["cases"]


def llada_params(case: dict) -> SamplingParams:
    p = case["params"]
    return SamplingParams(
        max_tokens=p["gen_length"],
        steps=p["steps"],
        block_length=p["block_length"],
        threshold=p.get("threshold"),
        remasking=p["remasking"],
        temperature=p["temperature"],
        cfg_scale=p.get("cfg_scale", 0.0),
        schedule="llada",
        ignore_eos=True,
        cache="none",
    )


def dream_params(case: dict) -> SamplingParams:
    p = case["params"]
    return SamplingParams(
        max_tokens=p["max_new_tokens"],
        steps=p["steps"],
        block_length=None,
        threshold=None,
        remasking=p["alg"],
        temperature=p["temperature"],
        schedule="dream",
        ignore_eos=True,
        cache="none",
    )


def prompt_rows(case: dict) -> list[list[int]]:
    """A case's prompts without their padding."""
    masks = case["attention_mask"]
    return [
        ids if masks is None else [t for t, m in zip(ids, masks[b]) if m]
        for b, ids in enumerate(case["prompt_ids"])
    ]


def assert_trace(case: dict, traces, exact_canvas: bool) -> None:
    """Per row (canvases, commits per step) as recorded: NFE and commits per step always,
    every canvas and the final ids when the run drew nothing at random."""
    steps = case["canvases"] if "canvases" in case else case["output_history"]
    prompt_len = len(case["prompt_ids"][0])
    assert all(len(canvases) == case["num_forward_passes"] for canvases, _ in traces)
    for b, (canvases, commits) in enumerate(traces):
        assert commits == [per_step[b] for per_step in case["committed_per_step"]]
        if exact_canvas:
            assert canvases == [step[b][prompt_len:] for step in steps]
            assert canvases[-1] == case["final_ids"][b][prompt_len:]


def drain(engine: Engine) -> list[StepOutput]:
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


LLADA2_GOLDEN = REFERENCE / "golden" / "llada2" / "golden_generate.json"
LLADA2_CHECKPOINT = REFERENCE / "llada2-tiny"


def llada2_cases() -> list[dict]:
    return json.loads(LLADA2_GOLDEN.read_text())["cases"]


def llada2_params(defaults: SamplingParams, case: dict) -> SamplingParams:
    """A case's generate() settings as a request. Upstream runs every block unless
    `eos_early_stop`; the engine stops at a finished block holding EOS unless `ignore_eos`."""
    p = case["params"]
    return defaults.replace(
        max_tokens=p["gen_length"],
        block_length=p["block_length"],
        threshold=p["threshold"],
        editing_threshold=p["editing_threshold"],
        max_post_steps=p["max_post_steps"],
        num_to_transfer=p["num_to_transfer"],
        temperature=p["temperature"],
        ignore_eos=not p["eos_early_stop"],
    )


def assert_llada2_replayed(case: dict, outs: list[StepOutput]) -> None:
    """One step per recorded forward of the strict run: its commit and edit sets, the block
    after it and where each block ended; then NFE, the final ids and canvas."""
    run = case["runs"]["strict"]
    prompt, gen = case["prompt_length"], case["params"]["gen_length"]
    forwards = run["forwards"]
    assert len(outs) == len(forwards) == run["num_forward_passes"]

    def shown(positions: list[int]) -> set[int]:
        return {x - prompt for x in positions if 0 <= x - prompt < gen}

    for i, (out, f) in enumerate(zip(outs, forwards)):
        assert {c.pos for c in out.committed} == shown(f["committed"])
        assert {c.pos for c in out.changes} == shown(f["edited"])
        start, end = f["block_range"]
        lo, hi = max(start, prompt), min(end, prompt + gen)
        assert out.tokens[lo - prompt : hi - prompt] == f["block_after"][lo - start : hi - start]
        last_of_block = i + 1 == len(forwards) or forwards[i + 1]["block"] != f["block"]
        assert (out.block_completed is not None) == last_of_block
    final = outs[-1]
    assert final.tokens[: len(run["final_ids"])] == run["final_ids"]
    if not run["stopped_early"]:
        assert final.tokens == run["final_canvas"][prompt : prompt + gen]
