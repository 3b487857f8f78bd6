"""DiffusionGemma through the engine: every recorded generate() run at batch 1, reproduced
step by step from its seed (each request draws from its own generator, in upstream's order),
and the same results with every case in flight at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marble.scheduler.engine import Engine, StepOutput
from marble.scheduler.sampling_params import InvalidParam

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
GOLDEN = REFERENCE / "golden" / "diffusiongemma" / "golden_generate.json"
CHECKPOINT = REFERENCE / "diffusiongemma-tiny"
CASES = [c for c in json.loads(GOLDEN.read_text())["cases"] if len(c["prompt_ids"]) == 1]
EOS = (1, 106, 50)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(CHECKPOINT, progress=False)


def _params(engine: Engine, case: dict):
    p = case["effective_params"]
    return engine.defaults.replace(
        max_tokens=p["max_new_tokens"],
        steps=p["max_denoising_steps"],
        t_min=p["t_min"],
        t_max=p["t_max"],
        entropy_bound=p["entropy_bound"],
        stability_threshold=p["stability_threshold"],
        confidence_threshold=p["confidence_threshold"],
        seed=case["torch_manual_seed"],
    )


def _run(engine: Engine, cases: list[dict]) -> dict[str, list[StepOutput]]:
    """Every case's step outputs, all cases in flight together."""
    ids = {}
    for case in cases:
        request = engine.make_request(case["prompt_ids"][0], _params(engine, case))
        ids[engine.add(request).request_id] = case["name"]
    outputs: dict[str, list[StepOutput]] = {name: [] for name in ids.values()}
    for out in _drain(engine):
        outputs[ids[out.request_id]].append(out)
    return outputs


def _expected_tokens(case: dict) -> list[int]:
    """The golden's generated ids cut to max_tokens and at the first stop id (kept)."""
    ids = case["generated_ids"][0][: case["effective_params"]["max_new_tokens"]]
    cut = next((i for i, t in enumerate(ids) if t in EOS), None)
    return ids if cut is None else ids[: cut + 1]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_each_recorded_run_replays_step_by_step_from_its_seed(engine: Engine, case: dict):
    outs = _run(engine, [case])[case["name"]]
    length = engine.model.cfg.canvas_length
    max_tokens = case["effective_params"]["max_new_tokens"]
    steps = [(c, s) for c in case["canvases"] for s in c["steps"]]
    assert len(outs) == len(steps)
    for out, (canvas, step) in zip(outs, steps):
        index = canvas["canvas_index"]
        start, end = index * length, min((index + 1) * length, max_tokens)
        last = step is canvas["steps"][-1]
        shown = canvas["appended_argmax_canvas"][0] if last else step["renoised_canvas"][0]
        assert out.tokens[start:end] == shown[: end - start]
        assert out.accepted == step["num_accepted"][0]
        assert out.canvas_completed == last
        before = step["decoder_input_canvas"][0]
        changed = {c.pos - start for c in out.changes}
        assert changed == {i for i in range(end - start) if shown[i] != before[i]}
    final = outs[-1]
    expected = _expected_tokens(case)
    assert final.tokens[: len(expected)] == expected
    counts = case["num_forward_passes"]
    assert final.forwards_total == {"encode": counts["encoder"], "decode": counts["decoder"]}
    stopped = expected[-1] in EOS and len(expected) <= max_tokens
    assert final.finish_reason == ("stop" if stopped else "length")


def test_every_run_in_flight_together_gets_its_result_alone(engine: Engine):
    alone = {c["name"]: _run(engine, [c])[c["name"]][-1].tokens for c in CASES}
    together = _run(engine, CASES)
    assert {name: outs[-1].tokens for name, outs in together.items()} == alone
    assert engine.runner.cache_bytes == 0  # every finished request freed its cache


def test_what_the_model_cannot_do_is_refused_by_name(engine: Engine):
    for change, field in [
        ({"block_length": 8}, "block_length"),
        ({"cfg_scale": 1.0}, "cfg_scale"),
        ({"t_min": 0.9, "t_max": 0.5}, "t_min"),
    ]:
        with pytest.raises(InvalidParam) as err:
            engine.make_request([2, 5], engine.defaults.replace(**change))
        assert err.value.param == field
    with pytest.raises(InvalidParam) as err:
        engine.make_request([2, 5], engine.defaults, suffix=[7])
    assert err.value.param == "suffix"


def test_greedy_block_refinement_equals_the_pipeline_golden(engine: Engine):
    """Temperature 0: the diffusers pipeline's greedy block refinement, every step's canvas
    and the final ids, from the pipeline's generator seed (the renoise draws)."""
    golden = json.loads(GOLDEN.read_text())["diffusers_cases"]
    case = next(c for c in golden if c["scheduler"] == "BlockRefinementScheduler")
    call = case["pipeline_call"]
    params = engine.defaults.replace(
        max_tokens=call["gen_length"],
        steps=call["num_inference_steps"],
        temperature=0.0,
        threshold=case["scheduler_config"]["threshold"],
        stability_threshold=call["stability_threshold"],
        confidence_threshold=call["confidence_threshold"],
        seed=case["generator_seed"],
    )
    request = engine.add(engine.make_request(case["prompt_ids"], params))
    outs = [o for o in _drain(engine) if o.request_id == request.request_id]
    length = engine.model.cfg.canvas_length
    steps = [(c, s) for c in case["canvases"] for s in c["steps"]]
    assert len(outs) == len(steps)
    for out, (canvas, step) in zip(outs, steps):
        start = canvas["canvas_index"] * length
        assert out.tokens[start : start + length] == step["prev_sample"]
    assert outs[-1].tokens == case["sequences_returned"][0]
    assert outs[-1].forwards_total == {
        "encode": case["num_forward_passes"]["encoder"],
        "decode": case["num_forward_passes"]["decoder"],
    }


def _drain(engine: Engine) -> list[StepOutput]:
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs
