"""KV cache invariants: a cached forward on an unchanged canvas is the full forward; memory
is a budget known at admission (a request's slots), held exactly while it runs, queued when it
does not fit now, refused when it never can, freed on finish and abort; the gauge is what the
running requests hold."""

from __future__ import annotations

import pytest
import torch

from marble.families.masked.config import preset
from marble.families.masked.model import CachedPart, Denoiser
from marble.model.kv_slots import capacity_class
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams
from marble.server.metrics import Metrics
from tests.server_helpers import serving, tiny_engine

CACHED = SamplingParams(max_tokens=16, block_length=8, threshold=None, steps=16, cache="dual")


@pytest.mark.parametrize("shift", [False, True])
def test_cached_forward_on_an_unchanged_canvas_is_the_full_forward(shift: bool):
    torch.manual_seed(0)
    cfg = preset("tiny", shift_logits=shift)
    model = Denoiser(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        keep: list = []
        full = model(ids, keep=keep, align=False)
        for q0, q1 in [(10, 40), (10, 18), (0, 40)]:  # prefix, dual, everything
            cache = [(k.clone(), v.clone()) for k, v in keep]
            span = torch.arange(q0, q1).expand(2, -1)
            gather = torch.arange(q1 - q0).expand(2, -1)
            part = CachedPart(slice(None), cache)
            out = model.forward_cached(ids[:, q0:q1], span, [part], span, gather)
            assert (out - full[:, q0:q1]).abs().max() < 1e-4


def _run_some(engine: Engine, steps: int, *requests) -> None:
    for request in requests:
        engine.add(request)
    for _ in range(steps):
        engine.step()


def _held(engine: Engine) -> int:
    return sum(r.kv_bytes for r in engine.scheduler.running)


def _slot(request) -> int:
    """Positions of one of a request's slots: its canvas's capacity class and a sink column."""
    return capacity_class(request.canvas_len) + 1


def test_capacity_classes_are_the_smallest_of_four_per_octave():
    sizes = [capacity_class(n) for n in range(1, 200)]
    assert sorted(set(sizes)) == [
        16,
        20,
        24,
        28,
        32,
        40,
        48,
        56,
        64,
        80,
        96,
        112,
        128,
        160,
        192,
        224,
    ]
    assert all(n <= capacity_class(n) < max(16, 1.25 * n) + 1 for n in range(1, 5000))


def test_finish_and_abort_give_the_cache_back(llada_dir):
    engine = tiny_engine(llada_dir)
    a = engine.make_request("hello there", CACHED)
    a2 = engine.make_request("hello here", CACHED)  # a's class: the same store
    b = engine.make_request("a longer prompt than the other one", CACHED)
    plain = engine.make_request("no cache", CACHED.replace(cache="none"))
    assert capacity_class(a.canvas_len) == capacity_class(a2.canvas_len)
    assert capacity_class(a.canvas_len) != capacity_class(b.canvas_len)
    assert a.kv_bytes == _slot(a) * engine.first.kv_bytes_per_token > 0 and plain.kv_bytes == 0
    _run_some(engine, 2, a, a2, b, plain)
    assert engine.runner.cache_bytes == a.kv_bytes + a2.kv_bytes + b.kv_bytes == _held(engine)
    assert engine.runner.spare_kv_bytes == 0
    engine.abort(a.request_id)  # the first slot of its store: a2 moves into it
    engine.step()
    assert _held(engine) == a2.kv_bytes + b.kv_bytes
    assert engine.runner.spare_kv_bytes == a.kv_bytes  # its slot, left for the next request
    assert engine.runner.cache_bytes == _held(engine) + a.kv_bytes
    assert engine.runner.release_kv(1) == a.kv_bytes and engine.runner.spare_kv_bytes == 0
    assert engine.runner.cache_bytes == _held(engine)
    while engine.has_unfinished():
        engine.step()
    assert engine.runner.cache_bytes == 0 and not engine.runner.rows


def test_the_kv_gauge_is_what_running_requests_hold(llada_dir):
    engine = tiny_engine(llada_dir)
    metrics = Metrics()
    cfg_request = engine.make_request("guided", CACHED.replace(cfg_scale=1.0))
    assert cfg_request.kv_bytes == 2 * _slot(cfg_request) * engine.first.kv_bytes_per_token
    _run_some(engine, 1, cfg_request, engine.make_request("plain", CACHED))
    metrics.observe_step(engine.last_stats, 0.0, 0.0, [])
    text = metrics.render()[0].decode()
    held = engine.runner.cache_bytes
    assert held == _held(engine) > 0
    assert f"marble_kv_cache_bytes {float(held)}" in text


def test_a_request_waits_for_kv_room_and_one_that_can_never_fit_is_refused(llada_dir):
    probe = tiny_engine(llada_dir).make_request("hello there", CACHED)
    engine = tiny_engine(llada_dir, max_kv_bytes=probe.kv_bytes)  # room for exactly one
    first = engine.make_request("hello there", CACHED)
    second = engine.make_request("hello there", CACHED)
    _run_some(engine, 1, first, second)
    assert [r.request_id for r in engine.scheduler.running] == [first.request_id]
    assert engine.scheduler.num_waiting == 1  # not refused: it runs once there is room
    while first.request_id in engine.requests:
        engine.step()
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == [second.request_id]
    with pytest.raises(ValueError, match="KV budget"):
        engine.add(engine.make_request("a prompt that is longer", CACHED))


@pytest.mark.anyio
async def test_over_http_a_request_past_the_kv_budget_is_a_400(llada_dir):
    async with serving(llada_dir, max_kv_bytes=1000) as (_, client):
        body = {"prompt": "hi", "max_tokens": 16, "cache": "dual"}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache"
        assert "KV budget" in r.json()["error"]["message"]
        ok = await client.post("/v1/completions", json={**body, "cache": "none"})
        assert ok.status_code == 200
        metrics = (await client.get("/metrics")).text
        assert "marble_kv_cache_budget_bytes 1000.0" in metrics


def test_rows_in_every_phase_share_steps_and_each_gets_what_it_gets_alone(llada_dir):
    """Cache rebuilds, cached steps of both kinds, no cache, suffixes and CFG (each copy with
    its own cache), at different lengths and block sizes, in the same engine steps."""
    jobs = [
        ("short", CACHED),
        ("a somewhat longer prompt here", CACHED.replace(cache="prefix", block_length=4)),
        ("guided", CACHED.replace(cfg_scale=1.5)),
        ("no cache at all", CACHED.replace(cache="none", block_length=16)),
        ("with a suffix", CACHED.replace(cache="prefix")),
        ("sampled", CACHED.replace(temperature=0.8, seed=5, threshold=0.5, steps=None)),
    ]
    suffixes = {4: " and then the end"}

    def run(indices):
        engine = tiny_engine(llada_dir)
        ids = {}
        for i in indices:
            prompt, params = jobs[i]
            ids[
                engine.add(engine.make_request(prompt, params, suffix=suffixes.get(i))).request_id
            ] = i
        outs: dict[int, list] = {i: [] for i in indices}
        while engine.has_unfinished():
            for out in engine.step():
                outs[ids[out.request_id]].append((out.forward, out.tokens))
        return outs

    together = run(range(len(jobs)))
    kinds = {kind for trace in together.values() for kind, _ in trace}
    assert kinds == {"full", "prefix_cached", "dual_cached"}
    for i in range(len(jobs)):
        assert together[i] == run([i])[i], jobs[i][0]


def test_a_row_whose_slot_moves_goes_on_as_it_would_alone(llada_dir):
    """Aborting the first row of a store moves the last into its slot and shrinks the store:
    the moved row's kept keys and values go with it."""

    def trace(engine: Engine, request) -> list:
        steps = []
        while engine.has_unfinished():
            steps += [(o.forward, o.tokens) for o in engine.step() if o.request_id == request]
        return steps

    engine = tiny_engine(llada_dir)
    first = engine.add(engine.make_request("hello there", CACHED))
    moved = engine.add(engine.make_request("hello here", CACHED.replace(cache="prefix")))
    early = [(o.forward, o.tokens) for o in engine.step() if o.request_id == moved.request_id]
    early += [(o.forward, o.tokens) for o in engine.step() if o.request_id == moved.request_id]
    (store,) = engine.runner.stores.stores.values()
    assert store.order.index(f"{moved.request_id}\x000") == 1
    engine.abort(first.request_id)
    early += [(o.forward, o.tokens) for o in engine.step() if o.request_id == moved.request_id]
    assert store.order == [f"{moved.request_id}\x000"] and engine.runner.release_kv(1) > 0
    later = trace(engine, moved.request_id)

    alone = tiny_engine(llada_dir)
    again = alone.add(alone.make_request("hello here", CACHED.replace(cache="prefix")))
    assert early + later == trace(alone, again.request_id)
    assert {kind for kind, _ in later} >= {"prefix_cached"}


def test_a_spare_slot_counts_against_the_budget_and_yields_to_a_request(llada_dir):
    """An aborted row leaves its slot spare: the budget counts it, and a request of another
    class that needs the room gets it at once, while the spare slot's store still runs."""
    probe = tiny_engine(llada_dir)
    short = probe.make_request("hello there", CACHED)
    long = probe.make_request("a longer prompt than the other one", CACHED)
    assert capacity_class(short.canvas_len) != capacity_class(long.canvas_len)
    engine = tiny_engine(llada_dir, max_kv_bytes=short.kv_bytes + long.kv_bytes)
    first = engine.make_request("hello there", CACHED)
    second = engine.make_request("hello here", CACHED)
    _run_some(engine, 1, first, second)
    waiting = engine.make_request("a longer prompt than the other one", CACHED)
    _run_some(engine, 1, waiting)
    assert engine.scheduler.num_waiting == 1  # two short slots leave no room for it
    engine.abort(first.request_id)
    engine.step()  # its slot is the runner's until the step's end: no room yet
    assert engine.scheduler.num_waiting == 1
    assert engine.runner.spare_kv_bytes == first.kv_bytes
    assert engine.runner.cache_bytes <= engine.scheduler.kv_budget
    engine.step()
    running = {r.request_id for r in engine.scheduler.running}
    assert running == {second.request_id, waiting.request_id}
    assert engine.runner.spare_kv_bytes == 0  # given up for it
    assert engine.runner.cache_bytes == _held(engine) <= engine.scheduler.kv_budget
