"""LLaDA2 through the engine: every recorded strict `generate()` run (block-causal attention,
token editing, post-fill edit rounds), forward by forward: the block each forward saw, its
commit and edit sets, the block after it, each block's end and the final canvas; the same with
every case in flight at once; and the stream's properties (an edit never touches the prompt,
the streamed text only grows, no edits means the plain threshold rule)."""

from __future__ import annotations

import pytest

from marble.scheduler.engine import Engine, StepOutput
from marble.scheduler.sampling_params import InvalidParam
from marble.scheduler.step_result import EDIT
from tests.golden_cases import LLADA2_CHECKPOINT, drain, llada2_cases, llada2_params

CASES = llada2_cases()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(LLADA2_CHECKPOINT, progress=False)


def _run(engine: Engine, cases: list[dict]) -> dict[str, list[StepOutput]]:
    ids = {}
    for case in cases:
        request = engine.make_request(case["prompt_ids"], llada2_params(engine.defaults, case))
        ids[engine.add(request).request_id] = case["name"]
    outputs: dict[str, list[StepOutput]] = {name: [] for name in ids.values()}
    for out in drain(engine):
        outputs[ids[out.request_id]].append(out)
    return outputs


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_each_strict_run_replays_forward_by_forward(engine: Engine, case: dict):
    from tests.golden_cases import assert_llada2_replayed

    assert_llada2_replayed(case, _run(engine, [case])[case["name"]])


def test_every_run_in_flight_together_replays(engine: Engine):
    from tests.golden_cases import assert_llada2_replayed

    together = _run(engine, CASES)
    for case in CASES:
        assert_llada2_replayed(case, together[case["name"]])
    assert engine.runner.cache_bytes == 0 and not engine.runner.rows


def test_edits_never_touch_the_prompt_and_the_stream_only_grows(engine: Engine):
    """Speed mode on chat prompts: edits happen, every one after the prompt, and each step's
    text extends the one before."""
    total_edits = 0
    for case in CASES[:6]:
        params = engine.defaults.replace(
            max_tokens=40, block_length=8, threshold=0.5, editing_threshold=0.0, seed=1
        )
        request = engine.add(engine.make_request(case["prompt_ids"], params))
        text = ""
        for out in drain(engine):
            assert out.request_id == request.request_id
            for change in out.changes:
                assert change.op == EDIT and 0 <= change.pos < params.max_tokens
                total_edits += 1
            assert out.text.startswith(text)
            text = out.text
    assert total_edits > 0


def test_without_edits_the_plain_threshold_rule_holds(engine: Engine):
    """editing_threshold null: no edit and no post-fill round, each block ends once full;
    the same commits as a run whose edit threshold no probability passes."""
    case = CASES[0]
    base = llada2_params(engine.defaults, case)
    off = _steps(engine, case, base.replace(editing_threshold=None))
    never = _steps(engine, case, base.replace(editing_threshold=1.0, max_post_steps=0))
    assert [o.committed for o in off] == [o.committed for o in never]
    assert all(not o.changes for o in off)
    assert off[-1].tokens == never[-1].tokens


def _steps(engine: Engine, case: dict, params) -> list[StepOutput]:
    engine.add(engine.make_request(case["prompt_ids"], params))
    return drain(engine)


def test_what_the_model_cannot_do_is_refused_by_name(engine: Engine):
    for change, field in [
        ({"threshold": None, "steps": 8}, "threshold"),
        ({"block_length": None}, "block_length"),
        ({"cfg_scale": 1.0}, "cfg_scale"),
        ({"verify_threshold": 0.5}, "verify_threshold"),
    ]:
        with pytest.raises(InvalidParam) as err:
            engine.make_request([5, 6], engine.defaults.replace(**change))
        assert err.value.param == field
