"""Work and time a request may take: each family's bound on worst-case forwards per decoded
position (refused by name before anything is queued; every golden setting and serving default
passes), the worst case it stores as an upper bound on the steps taken, and the per-request
deadline (finish_reason "error", error_code "deadline_exceeded", runner state freed, partial
text kept; HTTP 504 without a stream, an error chunk or event with one)."""

from __future__ import annotations

import time

import pytest

from marble.scheduler.engine import Engine
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import MAX_FORWARDS_PER_POSITION, InvalidParam
from marble.scheduler.scheduler import QueueFullError, SchedulerConfig
from marble.scheduler.served_model import load_served
from marble.server.settings import Settings
from tests.golden_cases import (
    DG_CHECKPOINT,
    LLADA2_CHECKPOINT,
    REFERENCE,
    dg_cases,
    dg_params,
    drain,
    llada2_cases,
    llada2_params,
    llada_cases,
    llada_params,
)
from tests.server_helpers import parse_sse, serving

LLADA = REFERENCE / "llada-tiny"


@pytest.fixture(scope="module")
def dg() -> Engine:
    return Engine.from_pretrained(DG_CHECKPOINT, progress=False)


@pytest.fixture(scope="module")
def llada2() -> Engine:
    return Engine.from_pretrained(LLADA2_CHECKPOINT, progress=False)


@pytest.fixture(scope="module")
def llada() -> Engine:
    return Engine.from_pretrained(LLADA, progress=False)


def _positions(request: Request) -> int:
    """Positions of every block (canvas) the request decodes: what the bound is relative to."""
    size = request.params.block_length or request.params.max_tokens
    return len(request.blocks) * size


def test_the_issues_maximal_work_requests_are_refused_naming_the_field(dg: Engine, llada2: Engine):
    endless = dg.defaults.replace(
        max_tokens=16, steps=1 << 20, stability_threshold=64, confidence_threshold=0
    )
    with pytest.raises(InvalidParam) as err:
        dg.make_request("x", endless)
    assert err.value.param == "steps" and str(3 * dg.model.cfg.canvas_length) in str(err.value)
    edits = llada2.defaults.replace(max_tokens=16, max_post_steps=1024)
    assert edits.editing_threshold is not None  # LLaDA2.1's defaults edit
    with pytest.raises(InvalidParam) as err:
        llada2.make_request("x", edits)
    assert err.value.param == "max_post_steps"
    # Edit rounds never run without editing: nothing to refuse then.
    llada2.make_request("x", edits.replace(editing_threshold=None))


def test_defaults_and_every_golden_setting_pass_the_bound(
    dg: Engine, llada2: Engine, llada: Engine, golden_dir
):
    made = [
        dg.make_request("Why is the sky blue?"),
        llada2.make_request("Why is the sky blue?"),
        llada.make_request("Why is the sky blue?"),
    ]
    made += [dg.make_request(c["prompt_ids"][0], dg_params(dg.defaults, c)) for c in dg_cases()]
    made += [
        llada2.make_request(c["prompt_ids"], llada2_params(llada2.defaults, c))
        for c in llada2_cases()
    ]
    made += [
        llada.make_request(c["prompt_ids"][0], llada_params(c))
        for c in llada_cases(golden_dir, "llada")
    ]
    for request in made:
        assert 0 < request.max_forwards <= MAX_FORWARDS_PER_POSITION * _positions(request)


def test_the_worst_case_bounds_the_steps_taken_and_is_reached(dg: Engine, llada2: Engine):
    """With the stop rule that never fires, a canvas runs every step: exactly the worst case."""
    longest = dg.defaults.replace(
        max_tokens=32,
        steps=MAX_FORWARDS_PER_POSITION * dg.model.cfg.canvas_length,
        stability_threshold=64,
        confidence_threshold=0,
        ignore_eos=True,
        seed=1,
    )
    requests = [dg.add(dg.make_request("x", longest))]
    requests += [
        llada2.add(llada2.make_request(c["prompt_ids"], llada2_params(llada2.defaults, c)))
        for c in llada2_cases()
    ]
    last = {o.request_id: o for o in drain(dg) + drain(llada2) if o.finished}
    for request in requests:
        assert last[request.request_id].step <= request.max_forwards
    assert last[requests[0].request_id].step == requests[0].max_forwards


def test_a_request_past_its_deadline_ends_with_its_partial_text_and_state_freed(
    llada: Engine,
):
    params = llada.defaults.replace(max_tokens=32, block_length=8, steps=32, ignore_eos=True)
    late = llada.add(llada.make_request("Once upon a time", params))
    queued = llada.add(llada.make_request("Hello", params.replace(max_tokens=8, steps=8)))
    queued.deadline = time.monotonic() - 1  # expires while it waits, or at its first step
    for _ in range(12):
        llada.step()
    assert late.request_id in llada.runner.rows and late.stable_len > 0
    late.deadline = time.monotonic() - 1
    outs = {o.request_id: o for o in llada.step()}
    out = outs[late.request_id]
    assert out.finished and out.finish_reason == "error"
    assert out.error_code == "deadline_exceeded" and out.error
    assert out.text and out.completion_tokens > 0  # what was stable stays
    assert late.request_id not in llada.runner.rows and late.request_id not in llada.requests
    assert llada.last_stats.finished.get("error", 0) >= 1
    assert queued.is_finished() and queued.error_code == "deadline_exceeded"
    assert not llada.has_unfinished()


@pytest.mark.anyio
async def test_the_server_answers_a_request_past_its_deadline_with_504_or_an_error():
    settings = Settings(request_timeout_s=1e-9)  # past before its first step
    body = {"prompt": "Hello", "max_tokens": 8, "steps": 8}
    async with serving(LLADA, settings) as (_, client):
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "deadline_exceeded"
        r = await client.post("/v1/completions", json={**body, "stream": True})
        chunks = [e.data for e in parse_sse(r.text)]
        assert chunks[-1] == "[DONE]" and "deadline_exceeded" in chunks[-2]
        r = await client.post("/v1/diffusion/generate", json=body)
        events = parse_sse(r.text)
        assert [e.json()["code"] for e in events if e.event == "error"] == ["deadline_exceeded"]
        metrics = (await client.get("/metrics")).text
        assert 'marble_request_errors_total{code="deadline_exceeded"} 3.0' in metrics


def test_an_engine_serving_two_models_gives_each_its_share_of_the_queue():
    engine = Engine.from_pretrained(LLADA, config=SchedulerConfig(max_queue=2), progress=False)
    engine.add_model(load_served(DG_CHECKPOINT, "dg", "cpu", "float32", progress=False))
    engine.add(engine.make_request("a"))
    with pytest.raises(QueueFullError):
        engine.add(engine.make_request("b"))
    engine.add(engine.make_request("c", model="dg"))  # the other model's share is free
    assert engine.scheduler.num_waiting == 2


def test_a_short_request_starts_at_once_beside_a_full_batch_of_long_ones():
    """Long requests fill every slot but the reserved one; a short request then runs from the
    next step and takes no more engine steps than its own worst case."""
    engine = Engine.from_pretrained(
        DG_CHECKPOINT, config=SchedulerConfig(max_batch_size=4, short_slots=1), progress=False
    )
    long = engine.defaults.replace(
        max_tokens=6 * engine.model.cfg.canvas_length,
        steps=48,
        stability_threshold=64,
        confidence_threshold=0,
        ignore_eos=True,
    )
    longs = [engine.add(engine.make_request("x", long)) for _ in range(4)]
    assert all(engine.scheduler.is_long(r) for r in longs)
    engine.step()
    short = engine.add(engine.make_request("y", engine.defaults.replace(seed=0)))
    assert not engine.scheduler.is_long(short)
    taken = 0
    while not short.is_finished() and taken < 10 * short.max_forwards:
        engine.step()
        taken += 1
    assert short.is_finished() and taken <= short.max_forwards
    assert not any(r.is_finished() for r in longs)
