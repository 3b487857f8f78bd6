"""The prefix cache of finished prompt blocks (block-causal LLaDA2 and SDAR, and DiffusionGemma's
causal encoder): exact (the golden replays hold with every prompt block taken from it, and
outputs equal the cache-off ones alone and batched, a tree of shared prompts included); held
once (a row reads the blocks in place and reserves only the slot after them, a run a row
reads is never evicted, a request left waiting pins nothing); and correct under each hazard: a
request whose prompt is a prefix of another's, two arrivals of one prompt in the same step,
several models, a prompt block next to generated tokens, a request that opts out, a budget
that needs its room back, a budget with no room for blocks beside the running requests, a
step that failed, and a random walk of arrivals and aborts under a tight budget.

"Equal" is compared on token ids, the engine's output: a block taken from the cache was
computed in another request's window, whose shape may round differently from the window the
request would have computed it in, and read in place its attention is merged from two
softmaxes, so floats are not promised bit for bit."""

from __future__ import annotations

import json
import random

import pytest

from marble.families.diffusion_gemma.runner import PROMPT_PAGE
from marble.scheduler.engine import Engine, StepOutput
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.scheduler import SchedulerConfig
from marble.scheduler.served_model import load_served
from tests.conftest import REFERENCE
from tests.families.sdar.test_sdar_engine import expected_ids, sdar_params
from tests.golden_cases import (
    LLADA2_CHECKPOINT,
    assert_llada2_replayed,
    llada2_cases,
    llada2_params,
)
from tests.sdar_golden import EXACT, SDAR_TINY
from tests.server_helpers import serving

SYSTEM = "You are a careful assistant who answers briefly. " * 6
# Each family's request fields, and its prefix-cache block: a block-causal model's block, a
# page of DiffusionGemma's encoder.
FAMILIES = {
    "llada2-tiny": {"block_length": 8},
    "sdar-tiny": {"block_length": 4, "steps": 4},
    "diffusiongemma-tiny": {"block_length": 16},
}
BLOCK = {"llada2-tiny": 8, "sdar-tiny": 4, "diffusiongemma-tiny": PROMPT_PAGE}


def engine_for(name: str, **config) -> Engine:
    return Engine.from_pretrained(
        REFERENCE / name, progress=False, config=SchedulerConfig(**config)
    )


def run(engine: Engine, requests: list[tuple[str | list[int], dict]]) -> list[list[StepOutput]]:
    """Add (prompt, fields) requests at once and step until they end (bounded)."""
    made = [
        engine.make_request(p, engine.defaults.replace(**{"max_tokens": 16, "seed": i, **fields}))
        for i, (p, fields) in enumerate(requests)
    ]
    outs: dict[str, list[StepOutput]] = {r.request_id: [] for r in made}
    for r in made:
        engine.add(r)
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outs[out.request_id].append(out)
    assert not engine.has_unfinished(), "requests were left waiting"
    return [outs[r.request_id] for r in made]


def tokens(outs: list[list[StepOutput]]) -> list[list[int]]:
    return [o[-1].tokens for o in outs]


# ---------------------------------------------------------------------------- exactness
def test_llada2_replays_its_goldens_from_a_warm_cache():
    engine = Engine.from_pretrained(LLADA2_CHECKPOINT, progress=False)
    cases = llada2_cases()
    requests = [(c["prompt_ids"], c) for c in cases]
    for warm in (False, True):
        made = [engine.make_request(p, llada2_params(engine.defaults, c)) for p, c in requests]
        outs: dict[str, list[StepOutput]] = {r.request_id: [] for r in made}
        for r in made:
            engine.add(r)
        while engine.has_unfinished():
            for out in engine.step():
                outs[out.request_id].append(out)
        for request, case in zip(made, cases):
            assert_llada2_replayed(case, outs[request.request_id])
        if warm:
            firsts = [outs[r.request_id][0].extras["prompt_cached"] for r in made]
            assert all(n > 0 for n in firsts if n is not None)
    assert engine.first.prefixes is not None and engine.first.prefixes.stats.hits > 0


def test_sdar_replays_its_goldens_final_ids_from_a_warm_cache():
    engine = Engine.from_pretrained(SDAR_TINY, progress=False)
    for _ in range(2):  # cold, then warm
        made = [
            engine.make_request(c["prompt_ids"], sdar_params(engine.defaults, c)) for c in EXACT
        ]
        last: dict[str, StepOutput] = {}
        for r in made:
            engine.add(r)
        while engine.has_unfinished():
            for out in engine.step():
                last[out.request_id] = out
        for request, case in zip(made, EXACT):
            want = expected_ids(case)
            assert last[request.request_id].tokens[: len(want)] == want, case["name"]
    prefixes = engine.first.prefixes
    assert prefixes is not None and prefixes.stats.tokens_saved > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_equal_the_cache_off_ones_alone_and_batched(name: str):
    fields = FAMILIES[name]
    prompts = [SYSTEM + q for q in ("Why is the sky blue?", "Name a fruit.", "Count to five.")]
    off = engine_for(name, prefix_cache=False)
    on = engine_for(name)
    want = tokens(run(off, [(p, fields) for p in prompts]))
    assert tokens(run(on, [(prompts[0], fields)])) == want[:1]  # alone, cold
    assert tokens(run(on, [(p, fields) for p in prompts])) == want  # batched, warm
    assert on.first.prefixes is not None and on.first.prefixes.stats.hits > 0


# ------------------------------------------------------------------------- held once
def warm(engine: Engine, name: str) -> None:
    """Leave SYSTEM's blocks in the engine's cache."""
    run(engine, [(SYSTEM + " Warm up.", FAMILIES[name])])


def admitted(engine: Engine, prompt: str, params: SamplingParams) -> int:
    """The KV bytes the engine admits a request with now (it steps once, then is aborted)."""
    request = engine.add(engine.make_request(prompt, params))
    engine.step()
    engine.abort(request.request_id)
    while engine.has_unfinished():
        engine.step()
    return request.kv_bytes


@pytest.mark.parametrize("name", FAMILIES)
def test_a_row_reads_cached_blocks_where_they_are(name: str):
    """A row's cached prompt blocks stay in the cache: its slots hold only the positions
    after them, and it is admitted with those slots' bytes, what the stores then hold."""
    engine = engine_for(name)
    warm(engine, name)
    request = engine.make_request(
        SYSTEM + " Name a fruit.", engine.defaults.replace(max_tokens=16, **FAMILIES[name])
    )
    full = request.kv_bytes
    engine.add(request)
    engine.step()
    runner, key = engine.first.runner, request.request_id
    assert runner.rows[key].cache.start > 0 and runner.shared[key]  # read from the cache
    held = runner.cache_bytes - runner.spare_kv_bytes  # the warm-up left its slot spare
    assert held == request.kv_bytes == engine.scheduler.kv_reserved < full


@pytest.mark.parametrize("name", FAMILIES)
def test_shared_blocks_count_once_so_more_requests_run_at_once(name: str):
    """A budget that holds the cached prompt once and four rows' own positions (and, while
    warming up, the warm-up's slot beside the blocks it keeps), but not two rows that each
    hold the prompt: all four run at once."""
    fields = FAMILIES[name]
    probe = engine_for(name)
    warm(probe, name)
    prefixes = probe.first.prefixes
    assert prefixes is not None
    cached = prefixes.nbytes
    params = probe.defaults.replace(max_tokens=16, **fields)
    prompts = [SYSTEM + f" Question {i}: what is {i} plus {i}?" for i in range(4)]
    full = max(probe.make_request(p, params).kv_bytes for p in prompts)
    warming = probe.make_request(SYSTEM + " Warm up.", params).kv_bytes + cached
    budget = max(cached + 4 * max(admitted(probe, p, params) for p in prompts), warming)
    assert budget < 2 * full  # two full slots would not fit
    engine = engine_for(name, max_kv_bytes=budget)
    warm(engine, name)
    made = [engine.add(engine.make_request(p, params)) for p in prompts]
    engine.step()
    assert engine.scheduler.num_running == 4
    while engine.has_unfinished():
        engine.step()
    assert all(r.is_finished() for r in made)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_run_a_row_reads_is_never_evicted(name: str):
    engine = engine_for(name)
    warm(engine, name)
    prefixes = engine.first.prefixes
    assert prefixes is not None
    request = engine.make_request(
        SYSTEM + " Count to five.", engine.defaults.replace(max_tokens=16, **FAMILIES[name])
    )
    engine.add(request)
    engine.step()
    read = {segment.run for segment in engine.first.runner.shared[request.request_id]}
    prefixes.evict(float("inf"))  # the blocks the row left itself go: nothing reads them
    assert read and read <= set(prefixes.runs)
    assert prefixes.nbytes == sum(run.nbytes for run in read)
    while engine.has_unfinished():
        engine.step()
    assert prefixes.evict(float("inf")) > 0 and not prefixes.runs


def test_a_request_left_waiting_pins_nothing():
    """A request the budget keeps waiting claimed the run it would read while the scheduler
    weighed it, and let go of it: the run can still be evicted for others."""
    name = "llada2-tiny"
    fields = FAMILIES[name]
    probe = engine_for(name)
    warm(probe, name)
    assert probe.first.prefixes is not None
    cached = probe.first.prefixes.nbytes
    long = probe.make_request(
        "Something else entirely. " * 8,
        probe.defaults.replace(max_tokens=64, prefix_cache=False, **fields),
    )
    params = probe.defaults.replace(max_tokens=64, **fields)
    # Room for the long request and the cached blocks, one byte short of the waiting one.
    budget = long.kv_bytes + cached + admitted(probe, SYSTEM, params) - 1
    engine = engine_for(name, max_kv_bytes=budget)
    warm(engine, name)
    prefixes = engine.first.prefixes
    assert prefixes is not None and prefixes.runs
    engine.add(engine.make_request(long.prompt_ids, long.params))
    engine.step()
    waiting = engine.add(engine.make_request(SYSTEM, params))
    engine.step()
    assert engine.scheduler.num_waiting == 1  # it did not fit beside the long one
    assert all(run.users == 0 for run in prefixes.runs)
    engine.abort(waiting.request_id)
    while engine.has_unfinished():
        engine.step()


# ------------------------------------------------------------------------------ hazards
@pytest.mark.parametrize("name", FAMILIES)
def test_a_prompt_that_is_a_prefix_of_another_shares_its_full_blocks(name: str):
    fields = FAMILIES[name]
    size = BLOCK[name]
    engine = engine_for(name)
    long_ids = engine.first.tokenizer.encode(SYSTEM + "And then some more words.")
    short_ids = long_ids[: 3 * size]  # exactly three blocks: every one of them final
    alone = tokens(run(engine_for(name, prefix_cache=False), [(long_ids, fields)]))
    run(engine, [(short_ids, fields)])
    first = run(engine, [(long_ids, fields)])
    assert first[0][0].extras["prompt_cached"] == 3 * size
    assert tokens(first) == alone
    # The other way round: the short prompt finds its blocks among the long one's.
    again = run(engine, [(long_ids[: 2 * size + 1], fields)])
    assert again[0][0].extras["prompt_cached"] == 2 * size


@pytest.mark.parametrize("name", FAMILIES)
def test_one_prompt_arriving_twice_in_one_step_is_held_once(name: str):
    fields = FAMILIES[name]
    engine = engine_for(name)
    outs = run(engine, [(SYSTEM, fields), (SYSTEM, fields)])
    assert [o[0].extras["prompt_cached"] for o in outs] == [0, 0]  # neither was cached yet
    prefixes = engine.first.prefixes
    assert prefixes is not None
    full = len(engine.first.tokenizer.encode(SYSTEM)) // BLOCK[name]
    assert len(prefixes.blocks) == full
    (kept,) = prefixes.runs  # the second arrival left nothing: the first had left it all
    assert len(kept.keys) == full and prefixes.nbytes == kept.nbytes


@pytest.mark.parametrize("name", FAMILIES)
def test_only_prompt_blocks_are_kept_never_a_generated_one(name: str):
    """The row's cache runs on into generated blocks; the prompt's tail block holds generated
    tokens too: neither is a prompt's block, so neither is kept."""
    fields = FAMILIES[name]
    engine = engine_for(name)
    ids = engine.first.tokenizer.encode(SYSTEM)
    run(engine, [(ids + ids[:1], {**fields, "max_tokens": 40})])
    prefixes = engine.first.prefixes
    assert prefixes is not None
    assert len(prefixes.blocks) == (len(ids) + 1) // BLOCK[name]


def test_models_never_share_blocks():
    engine = Engine.from_pretrained(LLADA2_CHECKPOINT, progress=False, name="a")
    engine.add_model(load_served(LLADA2_CHECKPOINT, "b", "cpu", "float32", progress=False))
    fields = {"block_length": 8, "max_tokens": 8}
    for model in ("a", "b"):
        request = engine.make_request(SYSTEM, engine.defaults.replace(**fields), model=model)
        engine.add(request)
        first = None
        while engine.has_unfinished():
            for out in engine.step():
                first = first or out
        assert first is not None and first.extras["prompt_cached"] == 0, model
    a, b = engine.served("a").prefixes, engine.served("b").prefixes
    assert a is not None and b is not None and a is not b
    assert a.stats.hits == b.stats.hits == 0 and len(a.blocks) == len(b.blocks) > 0


def test_a_request_that_opts_out_neither_takes_nor_leaves_blocks():
    engine = engine_for("llada2-tiny")
    fields = {**FAMILIES["llada2-tiny"], "prefix_cache": False}
    outs = run(engine, [(SYSTEM, fields), (SYSTEM, fields)])
    assert all("prompt_cached" not in o[0].extras for o in outs)
    prefixes = engine.first.prefixes
    assert prefixes is not None and not prefixes.blocks and prefixes.stats.misses == 0


def test_kept_blocks_give_their_room_back_to_a_request():
    """A budget of two requests: the first keeps its blocks in the room beside it; then two
    others that share nothing are admitted together by evicting them, not one left waiting
    behind them."""
    probe = engine_for("llada2-tiny")
    params = probe.defaults.replace(max_tokens=16, block_length=8)
    need = probe.make_request(SYSTEM, params).kv_bytes
    others = [f"{i} A wholly different prompt, so nothing of it is cached. " * 5 for i in range(2)]
    assert all(probe.make_request(p, params).kv_bytes == need for p in others)
    engine = engine_for("llada2-tiny", max_kv_bytes=2 * need)
    fields = FAMILIES["llada2-tiny"]
    run(engine, [(SYSTEM, fields)])
    prefixes = engine.first.prefixes
    assert prefixes is not None and prefixes.nbytes > 0
    engine.add(engine.make_request(others[0], params))
    engine.add(engine.make_request(others[1], params))
    engine.step()
    assert engine.scheduler.num_running == 2 and prefixes.stats.evicted > 0
    while engine.has_unfinished():
        engine.step()


def test_the_blocks_kept_stay_within_the_budget_beside_the_running_requests():
    """Before, a step kept its new blocks up to the whole budget whatever the running rows
    held: two requests filling the budget left it over by their prompts' blocks."""
    probe = engine_for("llada2-tiny")
    params = probe.defaults.replace(max_tokens=16, block_length=8)
    need = probe.make_request(SYSTEM, params).kv_bytes
    engine = engine_for("llada2-tiny", max_kv_bytes=2 * need)  # no room beside both
    fields = FAMILIES["llada2-tiny"]
    outs = run(engine, [(SYSTEM, fields), (SYSTEM + " Another.", fields)])
    assert all(o[-1].finished for o in outs)
    assert engine.first.prefixes is not None and not engine.first.prefixes.blocks
    scheduler = engine.scheduler
    assert scheduler.kv_reserved + scheduler.shared_kv.nbytes <= 2 * need


def test_a_failed_step_leaves_nothing_in_the_cache(monkeypatch):
    """A row whose step failed is rolled back; nothing of what it computed is kept, and the
    next request with its prompt computes its blocks itself."""
    engine = engine_for("llada2-tiny")
    runner = engine.first.runner

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(runner, "_step", broken)
    (outs,) = run(engine, [(SYSTEM, FAMILIES["llada2-tiny"])])
    assert outs[-1].finish_reason == "error"
    assert engine.first.prefixes is not None and not engine.first.prefixes.blocks
    monkeypatch.undo()
    (outs,) = run(engine, [(SYSTEM, FAMILIES["llada2-tiny"])])
    assert outs[0].extras["prompt_cached"] == 0 and outs[-1].finished


def test_full_attention_models_share_nothing():
    engine = Engine.from_pretrained(REFERENCE / "llada-tiny", progress=False)
    assert engine.first.prefixes is None


@pytest.mark.anyio
async def test_metrics_and_step_events_over_http():
    body = {"prompt": SYSTEM, "max_tokens": 8, "block_length": 8}
    async with serving(LLADA2_CHECKPOINT) as (_, client):
        for _ in range(2):
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
        r = await client.post("/v1/completions", json={**body, "prefix_cache": False})
        assert r.status_code == 200, r.text
        events = (await client.post("/v1/diffusion/generate", json=body)).text
        metrics = (await client.get("/metrics")).text
    steps = [json.loads(line[6:]) for line in events.splitlines() if '"type":"step"' in line]
    first_step = steps[0]
    assert first_step["prompt_cached"] > 0
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("marble_prefix_cache")
    }
    assert values['marble_prefix_cache_blocks_total{result="hit"}'] > 0
    assert values['marble_prefix_cache_blocks_total{result="miss"}'] > 0
    assert values["marble_prefix_cache_tokens_saved_total"] > 0
    assert values["marble_prefix_cache_held_blocks"] > 0
    assert values["marble_prefix_cache_bytes"] > 0


def test_an_aborted_request_leaves_no_part_behind_and_drain_waits_on_no_block():
    """Aborted after its first step (it took its prompt blocks from the cache): it is gone
    with no record left in the cache; after every request ends the engine has nothing
    unfinished (drain's condition) while the cache keeps its blocks for later requests."""
    engine = engine_for("llada2-tiny")
    fields = FAMILIES["llada2-tiny"]
    run(engine, [(SYSTEM, fields)])
    prefixes = engine.first.prefixes
    assert prefixes is not None and prefixes.blocks
    request = engine.make_request(SYSTEM, engine.defaults.replace(max_tokens=16, **fields))
    engine.add(request)
    engine.step()  # admitted, its row took the cached blocks, its first forward ran
    engine.abort(request.request_id)
    while engine.has_unfinished():
        engine.step()
    assert not prefixes._rows and not engine.first.runner.rows
    assert engine.scheduler.kv_reserved == 0 and prefixes.nbytes > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_a_tree_of_shared_prompts_decodes_as_with_the_cache_off(name: str):
    """Prompts that share blocks and part ways mid-run, one extending another, read runs of
    two and three segments in place, batched with rows that read none."""
    fields, size = FAMILIES[name], BLOCK[name]
    engine = engine_for(name)
    base = engine.first.tokenizer.encode(SYSTEM)[: 6 * size]
    other = engine.first.tokenizer.encode("Another preface entirely, for a branch. " * 4)
    first = base + other[:3]
    waves = [
        [first, base[: 2 * size] + other[: 3 * size + 1]],  # a root run, and a branch of it
        [
            base[: 2 * size] + other[: 3 * size] + base[: 2 * size + 2],  # two segments
            first + other[: size + 1],  # extends the first: its blocks and one more
            other[: 2 * size + 3],  # shares nothing
            base[: 4 * size + 1],  # part of the root run only
        ],
    ]
    waves.append([waves[1][1] + base[: size + 1], waves[1][0]])  # three segments, and again
    off = engine_for(name, prefix_cache=False)
    for wave in waves:
        requests = [(ids, fields) for ids in wave]
        assert tokens(run(engine, requests)) == tokens(run(off, requests))
    prefixes = engine.first.prefixes
    assert prefixes is not None and prefixes.stats.hits > 0
    assert any(run.parent is not None and run.parent.parent is not None for run in prefixes.runs)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_random_walk_of_arrivals_and_aborts_under_a_tight_budget(name: str, seed: int):
    """Requests from a pool of prompts that share blocks arrive over time and some are aborted
    (waiting or running), under a budget of about three requests: after every step the stores
    hold what the scheduler admitted, admitted and kept bytes stay within the budget, and a run
    a row reads is pinned; at the end nothing is held or pinned, and every request that ran to
    its end gave the tokens it gives with the cache off."""
    rng = random.Random(seed)
    fields, size = FAMILIES[name], BLOCK[name]
    off = engine_for(name, prefix_cache=False)
    tok = off.first.tokenizer
    roots = [tok.encode(SYSTEM)[: 3 * size], tok.encode("Another preface entirely. " * 6)]
    tails = [tok.encode(f" Question {i}: what is {i} plus one?") for i in range(4)]
    pool = [r[:n] + t for r in roots for n in (size, 2 * size + 1, 3 * size) for t in tails[:2]]
    pool += [r + tails[3][: size + 2] for r in roots]  # a block past each whole root

    def params(i: int) -> SamplingParams:
        return off.defaults.replace(max_tokens=16, seed=i, **fields)

    full = max(off.make_request(p, params(0)).kv_bytes for p in pool)
    engine = engine_for(name, max_kv_bytes=3 * full)
    prefixes = engine.first.prefixes
    assert prefixes is not None
    made: dict[str, tuple[list[int], int]] = {}
    last: dict[str, StepOutput] = {}
    waited = 0
    for step in range(60):
        for _ in range(rng.choice([0, 0, 1, 2]) if step < 40 else 0):
            i = len(made)
            prompt = rng.choice(pool)
            made[engine.add(engine.make_request(prompt, params(i))).request_id] = (prompt, i)
        live = [r for r in made if r not in last or not last[r].finished]
        if live and rng.random() < 0.15:
            engine.abort(rng.choice(live))
        for out in engine.step():
            last[out.request_id] = out
        runner, scheduler = engine.runner, engine.scheduler
        waited = max(waited, scheduler.num_waiting)
        assert runner.cache_bytes - runner.spare_kv_bytes == scheduler.kv_reserved
        assert scheduler.kv_reserved + scheduler.shared_kv.nbytes <= 3 * full
        for request in scheduler.running:
            for segment in prefixes.segments(request.request_id):
                assert segment.run.users > 0
    while engine.has_unfinished():
        for out in engine.step():
            last[out.request_id] = out
    assert engine.runner.cache_bytes == engine.runner.spare_kv_bytes and not engine.runner.rows
    # What pins a run now is only the runs that extend it.
    assert all(run.users == sum(r.parent is run for r in prefixes.runs) for run in prefixes.runs)
    ended = [r for r in made if last[r].finish_reason in ("length", "stop")]
    aborted = [r for r in made if last[r].finish_reason == "abort"]
    assert len(ended) >= 10 and aborted and waited and prefixes.stats.hits > 0
    for request_id in ended:
        prompt, i = made[request_id]
        alone = tokens(run(off, [(prompt, {**fields, "seed": i})]))[0]
        assert last[request_id].tokens == alone, request_id
