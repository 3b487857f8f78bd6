"""SDAR through Marble's engine (`Engine.step()` alone, no test-side loop): every recorded
block_diffusion_generate() run without an overwrite replays forward by forward (the commits of
each denoising forward, NFE, the final ids, where it stops), alone and all in flight together
beside requests of every other family in the same engine; the two overwrite runs agree up to the
overwrite; the fields SDAR cannot run are refused by name, and the masked family refuses SDAR's
"sequential" rule."""

from __future__ import annotations

import json

import pytest
import torch

from marble.families.sdar.config import SDARDecodeSettings
from marble.scheduler.engine import Engine, StepOutput
from marble.scheduler.family import family_for_config
from marble.scheduler.sampling_params import InvalidParam, SamplingParams
from marble.scheduler.scheduler import SchedulerConfig
from marble.scheduler.served_model import load_defaults, load_served
from marble.scheduler.step_result import ENCODE
from tests.sdar_golden import EXACT, OVERWRITE, REFERENCE, SDAR_TINY

DENOISING = ("full", "prefix_cached")
# The other families' checkpoints, served beside SDAR, and what each is asked.
OTHERS = {
    "llada-tiny": {"max_tokens": 16, "steps": 8, "block_length": 8, "seed": 3},
    "dream-tiny": {"max_tokens": 16, "steps": 8, "seed": 3, "temperature": 0.7},
    "llada2-tiny": {"max_tokens": 16, "block_length": 8, "threshold": 0.5, "seed": 3},
    "diffusiongemma-tiny": {"max_tokens": 16, "seed": 3},
}


def sdar_params(defaults: SamplingParams, case: dict) -> SamplingParams:
    """A recorded run's settings as a request: steps per block, the dynamic rule as a
    threshold, static as none, sequential by name; EOS ignored unless the run stopped on it."""
    p = case["params"]
    rule = p["remasking_strategy"]
    return defaults.replace(
        max_tokens=p["gen_length"],
        block_length=p["block_length"],
        steps=p["denoising_steps"],
        threshold=p["confidence_threshold"] if rule == "low_confidence_dynamic" else None,
        remasking="sequential" if rule == "sequential" else "low_confidence",
        temperature=p["temperature"],
        top_k=p["top_k"],
        top_p=p["top_p"],
        seed=case["seed"],
        ignore_eos=p["stopping_criteria_idx"] is None,
    )


def expected_ids(case: dict) -> list[int]:
    """The golden's answer: cut at the first stop id (kept) when the run stops on one, else
    the generated ids within gen_length."""
    if case["params"]["stopping_criteria_idx"] is not None:
        return case["answer_ids_cut_at_first_stop_id"][: case["params"]["gen_length"]]
    return case["generated_ids"][: case["params"]["gen_length"]]


def golden_commits(case: dict, forward: dict) -> list[tuple[int, int]]:
    """A denoising forward's commits as (generated position, id), within gen_length."""
    prompt, gen = len(case["prompt_ids"]), case["params"]["gen_length"]
    after = forward["canvas_after"]
    return sorted((p - prompt, after[p]) for p in forward["committed"] if p - prompt < gen)


def ours(out: StepOutput) -> list[tuple[int, int]]:
    return sorted((c.pos, c.token_id) for c in out.committed)


def assert_replayed(case: dict, outs: list[StepOutput]) -> None:
    """One engine step per upstream forward: each denoising forward's commits (positions and
    ids), prefill and store forwards committing nothing; NFE, the final ids, the finish."""
    forwards = case["forwards"]
    assert len(outs) == len(forwards) == case["num_forward_passes"]
    for i, (out, f) in enumerate(zip(outs, forwards)):
        where = f"{case['name']} forward {i} ({f['kind']})"
        if f["kind"] == "denoise":
            assert out.forward in DENOISING, where
            assert ours(out) == golden_commits(case, f), where
            assert out.block_completed is None, where
        else:
            assert out.forward == ENCODE and not out.committed, where
            assert (out.block_completed is not None) == (f["kind"] == "store"), where
        assert all(0 <= c.confidence <= 1 for c in out.committed)
    final = outs[-1]
    assert sum(final.forwards_total.values()) == case["num_forward_passes"]
    assert final.forwards_total[ENCODE] == case["num_prefill_forwards"] + case["num_store_forwards"]
    denoised = sum(final.forwards_total.get(kind, 0) for kind in DENOISING)
    assert denoised == case["num_denoise_forwards"]
    want = expected_ids(case)
    assert final.tokens[: len(want)] == want
    assert final.finish_reason == ("stop" if case["stopped_early"] else "length")
    if case["stopped_early"]:
        assert final.completion_tokens == len(want) - 1  # the stop id itself is not text


# A forward-by-forward replay takes upstream's prefill forward: a run whose prompt blocks came
# from the prefix cache skips it (test_prefix_cache.py replays those on their final ids).
UPSTREAM_FORWARDS = SchedulerConfig(prefix_cache=False)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(SDAR_TINY, progress=False, config=UPSTREAM_FORWARDS)


def run(engine: Engine, requests: list[tuple[str, str | None, list[int] | str, SamplingParams]]):
    """Queue (key, model, prompt, params) requests together and step the engine until all end:
    each key's step outputs in order."""
    keys = {}
    for key, model, prompt, params in requests:
        request = engine.add(engine.make_request(prompt, params, model=model))
        keys[request.request_id] = key
    outs: dict[str, list[StepOutput]] = {key: [] for key in keys.values()}
    while engine.has_unfinished():
        for out in engine.step():
            outs[keys[out.request_id]].append(out)
    return outs


def sdar_requests(engine: Engine, cases: list[dict], model: str | None = None):
    return [(c["name"], model, c["prompt_ids"], sdar_params(engine.defaults, c)) for c in cases]


@pytest.mark.parametrize("case", EXACT, ids=[c["name"] for c in EXACT])
def test_each_recorded_run_replays_forward_by_forward(engine: Engine, case: dict):
    outs = run(engine, sdar_requests(engine, [case]))[case["name"]]
    assert_replayed(case, outs)
    request = engine.make_request(case["prompt_ids"], sdar_params(engine.defaults, case))
    assert request.max_forwards >= case["num_forward_passes"]
    planned = outs[-1].total_steps
    assert planned is None or planned == case["num_forward_passes"] or case["stopped_early"]
    assert not engine.runner.rows and engine.runner.cache_bytes == 0


@pytest.mark.parametrize("case", OVERWRITE, ids=[c["name"] for c in OVERWRITE])
def test_overwrite_runs_agree_until_the_overwrite(engine: Engine, case: dict):
    """Upstream's top-k there writes over non-masked positions; Marble commits only masks:
    every forward before it commits the same, the overwrite forward commits the same masks,
    and every generated position is committed exactly once."""
    (event,) = case["overwrite_events"]
    outs = run(engine, sdar_requests(engine, [case]))[case["name"]]
    for i in range(event["call"] + 1):
        f = case["forwards"][i]
        if f["kind"] == "denoise":
            assert ours(outs[i]) == golden_commits(case, f), f"forward {i}"
    positions = sorted(c.pos for o in outs for c in o.committed)
    assert positions == list(range(case["params"]["gen_length"]))
    assert outs[-1].finish_reason == "length"


def test_the_tiny_checkpoint_is_served_as_sdar_with_its_stop_ids(engine: Engine):
    config = json.loads((SDAR_TINY / "config.json").read_text())
    assert family_for_config(config).name == "sdar"
    assert engine.first.family.name == "sdar"
    special = engine.special
    assert special.mask == 479 and special.stop_ids == {453, 455}
    settings = SDARDecodeSettings()
    defaults = load_defaults(SDAR_TINY)
    assert (defaults.block_length, defaults.steps) == (settings.block_length, settings.steps)
    assert defaults.threshold == settings.confidence_threshold
    assert (defaults.remasking, defaults.temperature) == ("low_confidence", settings.temperature)


@pytest.fixture(scope="module")
def mixed() -> Engine:
    """One engine serving SDAR first and every other family beside it."""
    eng = Engine.from_pretrained(
        SDAR_TINY, progress=False, name="sdar-tiny", config=UPSTREAM_FORWARDS
    )
    for name in OTHERS:
        eng.add_model(load_served(REFERENCE / name, name, "cpu", torch.float32, progress=False))
    return eng


def other_requests(engine: Engine):
    return [
        (name, name, "Why is the sky blue?", engine.served(name).defaults.replace(**body))
        for name, body in OTHERS.items()
    ]


def test_all_runs_in_flight_together_beside_every_family(mixed: Engine):
    """The 14 runs at once, each replaying as alone; each other family's request equal to its
    run alone in the same engine."""
    alone = {}
    for request in other_requests(mixed):
        alone |= run(mixed, [request])
    together = run(mixed, sdar_requests(mixed, EXACT, "sdar-tiny") + other_requests(mixed))
    for case in EXACT:
        assert_replayed(case, together[case["name"]])
    for name in OTHERS:
        got, want = together[name][-1], alone[name][-1]
        assert (got.tokens, got.text, got.finish_reason) == (
            want.tokens,
            want.text,
            want.finish_reason,
        )
        assert got.forwards_total == want.forwards_total
    for m in mixed.models.values():
        assert not m.runner.rows and m.runner.cache_bytes == 0


def test_text_settles_a_block_at_a_time(engine: Engine):
    """The stable text covers whole stored blocks only, and only grows."""
    case = next(c for c in EXACT if c["name"] == "static_b4_s4_gen32")
    outs = run(engine, sdar_requests(engine, [case]))[case["name"]]
    text = ""
    for out in outs:
        assert out.text.startswith(text)
        if out.text != text:
            assert out.block_completed is not None
        text = out.text
    assert text == engine.tokenizer.decode(outs[-1].tokens)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"cfg_scale": 1.0}, "cfg_scale"),
        ({"editing_threshold": 0.5}, "editing_threshold"),
        ({"verify_threshold": 0.5}, "verify_threshold"),
        ({"token_healing": True}, "token_healing"),
        ({"remasking": "random"}, "remasking"),
        ({"remasking": "margin"}, "remasking"),
        ({"steps": None}, "steps"),
        ({"block_length": None}, "block_length"),
    ],
)
def test_what_sdar_cannot_run_is_refused_by_name(engine: Engine, change: dict, field: str):
    with pytest.raises(InvalidParam) as err:
        engine.make_request([5, 6], engine.defaults.replace(**change))
    assert err.value.param == field


def test_sequential_is_refused_by_the_other_families(mixed: Engine):
    params = SamplingParams(max_tokens=8, steps=8, remasking="sequential")
    for name in OTHERS:
        with pytest.raises(InvalidParam) as err:
            mixed.make_request(
                [5, 6], mixed.served(name).defaults.replace(remasking="sequential"), model=name
            )
        assert err.value.param == "remasking"
    with pytest.raises(InvalidParam) as err:
        mixed.make_request([5, 6], params, model="llada-tiny")
    assert err.value.param == "remasking"


def test_non_finite_logits_fail_the_row_by_code(monkeypatch: pytest.MonkeyPatch):
    engine = Engine.from_pretrained(SDAR_TINY, progress=False)
    model = engine.runner.model
    vocab = model.cfg.vocab_size
    monkeypatch.setattr(model, "project", lambda h: torch.full((len(h), vocab), torch.nan))
    case = EXACT[0]
    outs = run(engine, sdar_requests(engine, [case]))[case["name"]]
    assert outs[-1].finish_reason == "error" and outs[-1].error_code == "non_finite_logits"
    assert not engine.runner.rows
