"""Several models in one engine: every recorded DiffusionGemma run, every strict LLaDA2 run,
every LLaDA and Dream reference trace that draws nothing at random, all in flight together in
the same steps, and each gets exactly its recorded result, as when it runs alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from marble.scheduler.engine import Engine
from marble.scheduler.scheduler import SchedulerConfig
from marble.scheduler.served_model import load_served
from marble.scheduler.step_result import DECODE
from tests.golden_cases import (
    DG_CHECKPOINT,
    LLADA2_CHECKPOINT,
    assert_dg_replayed,
    assert_llada2_replayed,
    assert_trace,
    dg_cases,
    dg_params,
    drain,
    dream_params,
    llada2_cases,
    llada2_params,
    llada_cases,
    llada_params,
    prompt_rows,
)


def _exact_llada(golden_dir: Path) -> list[dict]:
    """LLaDA cases replayed canvas by canvas: unseeded, and padded only in the variant that
    honours the padding (as tests/test_parity.py)."""
    return [
        c
        for c in llada_cases(golden_dir, "llada")
        if c["torch_manual_seed"] is None
        and not (c["model_variant"] == "original" and c["attention_mask"] is not None)
    ]


def _exact_dream(golden_dir: Path) -> list[dict]:
    return [
        c
        for c in llada_cases(golden_dir, "dream")
        if c["params"]["alg"] not in ("origin", "confidence_threshold")
    ]


@pytest.fixture(scope="module")
def engine(llada_dir: Path, dream_dir: Path) -> Engine:
    config = SchedulerConfig(max_batch_size=128, max_batch_tokens=1 << 20)
    engine = Engine.from_pretrained(DG_CHECKPOINT, config=config, progress=False, name="gemma")
    for name, folder in (("llada", llada_dir), ("dream", dream_dir), ("llada2", LLADA2_CHECKPOINT)):
        engine.add_model(load_served(folder, name, "cpu", "float32", progress=False))
    return engine


def test_every_family_batched_together_replays_its_goldens(engine: Engine, golden_dir: Path):
    gemma = engine.served("gemma")
    runs: dict[str, tuple[str, dict, int]] = {}  # request id -> (model, case, row)
    for case in dg_cases():
        params = dg_params(gemma.defaults, case)
        request = engine.make_request(case["prompt_ids"][0], params, model="gemma")
        runs[engine.add(request).request_id] = ("gemma", case, 0)
    for model, cases, to_params in (
        ("llada", _exact_llada(golden_dir), llada_params),
        ("dream", _exact_dream(golden_dir), dream_params),
    ):
        for case in cases:
            for row, prompt in enumerate(prompt_rows(case)):
                request = engine.make_request(prompt, to_params(case), model=model)
                runs[engine.add(request).request_id] = (model, case, row)
    llada2 = engine.served("llada2")
    for case in llada2_cases():
        params = llada2_params(llada2.defaults, case)
        request = engine.make_request(case["prompt_ids"], params, model="llada2")
        runs[engine.add(request).request_id] = ("llada2", case, 0)
    assert len({model for model, _, _ in runs.values()}) == 4

    outs = {request_id: [] for request_id in runs}
    mixed_steps = 0
    while engine.has_unfinished():
        step = engine.step()
        mixed_steps += len({runs[o.request_id][0] for o in step}) == 4
        for out in step:
            outs[out.request_id].append(out)
    assert mixed_steps > 0  # the families really shared steps

    length = gemma.model.cfg.canvas_length
    for request_id, (model, case, row) in runs.items():
        history = outs[request_id]
        if model == "gemma":
            assert_dg_replayed(case, history, length)
            continue
        if model == "llada2":
            assert_llada2_replayed(case, history)
            continue
        trace = ([o.tokens for o in history], [len(o.committed) for o in history])
        # A case's rows each check against their column of the recording.
        column = {**case, "committed_per_step": [[s[row]] for s in case["committed_per_step"]]}
        key = "canvases" if "canvases" in case else "output_history"
        column[key] = [[s[row]] for s in case[key]]
        column["final_ids"] = [case["final_ids"][row]]
        assert_trace(column, [trace], exact_canvas=True)
    assert all(m.runner.cache_bytes == 0 and not m.runner.rows for m in engine.models.values())


def test_a_request_names_its_model_and_an_unknown_name_is_refused(engine: Engine):
    from marble.scheduler.sampling_params import InvalidParam

    with pytest.raises(InvalidParam) as err:
        engine.make_request("hi", model="absent")
    assert err.value.param == "model"
    gemma = engine.make_request("hi", model="gemma")
    llada = engine.make_request(
        "hi", engine.served("llada").defaults.replace(max_tokens=8), model="llada"
    )
    assert engine.make_request("hi").model == "gemma"  # no name: the first model
    assert gemma.params == engine.served("gemma").defaults
    for request in (gemma, llada):
        engine.add(request)
    final = {o.request_id: o for o in drain(engine) if o.finished}
    assert final[gemma.request_id].forwards_total[DECODE] > 0
    assert final[llada.request_id].completion_tokens <= 8
