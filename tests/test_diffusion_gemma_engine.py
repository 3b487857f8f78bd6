"""DiffusionGemma through the engine: every recorded generate() run at batch 1, reproduced
step by step from its seed (each request draws from its own generator, in upstream's order),
and the same results with every case in flight at once, and with rows drawn two at a time."""

from __future__ import annotations

import json

import pytest
import torch

from marble.model import draws
from marble.scheduler.engine import Engine, StepOutput
from marble.scheduler.sampling_params import InvalidParam
from tests.golden_cases import (
    DG_CHECKPOINT,
    DG_GOLDEN,
    assert_dg_replayed,
    dg_cases,
    dg_params,
)
from tests.golden_cases import drain as _drain

CASES = dg_cases()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(DG_CHECKPOINT, progress=False)


def _run(engine: Engine, cases: list[dict]) -> dict[str, list[StepOutput]]:
    """Every case's step outputs, all cases in flight together."""
    ids = {}
    for case in cases:
        request = engine.make_request(case["prompt_ids"][0], dg_params(engine.defaults, case))
        ids[engine.add(request).request_id] = case["name"]
    outputs: dict[str, list[StepOutput]] = {name: [] for name in ids.values()}
    for out in _drain(engine):
        outputs[ids[out.request_id]].append(out)
    return outputs


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_each_recorded_run_replays_step_by_step_from_its_seed(engine: Engine, case: dict):
    outs = _run(engine, [case])[case["name"]]
    assert_dg_replayed(case, outs, engine.model.cfg.canvas_length)


def test_every_run_in_flight_together_gets_its_result_alone(engine: Engine):
    alone = {c["name"]: _run(engine, [c])[c["name"]][-1].tokens for c in CASES}
    together = _run(engine, CASES)
    assert {name: outs[-1].tokens for name, outs in together.items()} == alone
    assert engine.runner.cache_bytes == 0  # every finished request freed its cache


def test_rows_drawn_two_at_a_time_give_what_one_at_a_time_does(engine: Engine, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the same forwards on both sides: only the draws' threads differ
    try:
        monkeypatch.setattr(draws, "ROWS_IN_FLIGHT", 1)
        one = {name: outs[-1].tokens for name, outs in _run(engine, CASES).items()}
        monkeypatch.setattr(draws, "ROWS_IN_FLIGHT", 2)
        monkeypatch.setattr(draws, "_row_pool", None)
        two = {name: outs[-1].tokens for name, outs in _run(engine, CASES).items()}
    finally:
        torch.set_num_threads(threads)
    assert draws._row_pool is not None and two == one


def test_what_the_model_cannot_do_is_refused_by_name(engine: Engine):
    for change, field in [
        ({"block_length": 8}, "block_length"),
        ({"cfg_scale": 1.0}, "cfg_scale"),
        ({"verify_threshold": 0.7}, "verify_threshold"),
        ({"editing_threshold": 0.5}, "editing_threshold"),
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
    golden = json.loads(DG_GOLDEN.read_text())["diffusers_cases"]
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


def test_non_finite_logits_fail_that_row_alone():
    """Before: NaN probabilities made `torch.multinomial` raise, and the row failed as a
    generic step failure; now its NaN entropy names the cause, and the batch runs on. The
    broken row is the one whose canvases start at its prompt's end, 6 (the LM head is tied
    to the embedding, so a poisoned embedding would reach every row's logits)."""
    engine = Engine.from_pretrained(DG_CHECKPOINT, progress=False)
    params = engine.defaults.replace(max_tokens=20, seed=3, ignore_eos=True)
    healthy = [[2, 5, 7, 9], [2, 11, 13]]
    alone = [list(engine.generate(p, params))[-1].tokens for p in healthy]
    decode = engine.model.decode

    def broken_decode(canvas, positions, *args, **kwargs):
        logits = decode(canvas, positions, *args, **kwargs)
        starts = positions[:, :1, None] % engine.model.cfg.canvas_length
        return logits.masked_fill(starts == 6, float("nan"))

    engine.model.decode = broken_decode
    prompts = [*healthy, [2, 3, 4, 5, 6, 7]]
    ids = [engine.add(engine.make_request(p, params)).request_id for p in prompts]
    final = {out.request_id: out for out in _drain(engine) if out.finished}
    assert final[ids[2]].finish_reason == "error"
    assert final[ids[2]].error_code == "non_finite_logits"
    assert [final[i].tokens for i in ids[:2]] == alone
    assert all(final[i].finish_reason == "length" for i in ids[:2])
