"""Structured output on every family (the masked one: LLaDA, Dream, Marble's own; SDAR, LLaDA2
and DiffusionGemma): what a constrained row commits (or, on a uniform-state canvas, fixes) is
always a valid prefix of its grammar, it ends on a complete match, its batch mates are
untouched, and what it cannot honour is refused by name before anything runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest
import torch

from marble.model.sampling import token_mask
from marble.scheduler.engine import Engine, StepOutput
from marble.scheduler.sampling_params import InvalidParam
from marble.structured import compiler as compiler_module
from marble.structured import row as row_module
from marble.structured.compiler import ConstraintError, GrammarCompiler
from marble.structured.constraint import Constraint
from marble.structured.row import RowConstraint
from tests.conftest import REFERENCE

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "admin"],
    "additionalProperties": False,
}
SCHEMA = Constraint.json_schema(PERSON, "response_format")
CPU = torch.device("cpu")
# (a constraint, what its complete match looks like)
MATCHES = [
    (
        Constraint.choice(["yes", "no", "maybe"], "guided_choice"),
        lambda t: t in {"yes", "no", "maybe"},
    ),
    (
        Constraint("regex", r"\d{3}-\d{4}", "guided_regex"),
        lambda t: len(t) == 8 and t[3] == "-",
    ),
    (SCHEMA, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
]


@pytest.fixture(scope="module")
def embedded() -> Engine:
    return Engine.from_pretrained(None, progress=False)


def _run(engine: Engine, requests: list) -> dict[str, list[StepOutput]]:
    outs: dict[str, list[StepOutput]] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add(r)
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id].append(out)
    return outs


def _fresh(engine: Engine, constraint: Constraint) -> RowConstraint:
    return RowConstraint(engine.first.grammars.compile(constraint))


def _assert_valid_prefixes(engine: Engine, constraint: Constraint, outs: list[StepOutput]):
    """Every step's committed tokens extend a run of committed tokens from the start, and a
    fresh matcher takes that run whole: nothing invalid was ever committed."""
    tokens: dict[int, int] = {}
    for out in outs:
        for c in out.committed:
            tokens[c.pos] = c.token_id
        assert sorted(tokens) == list(range(len(tokens))), "committed out of order"
        run = [tokens[i] for i in range(len(tokens))]
        stops = engine.first.special.stop_ids
        # The output ends at its first stop token; what a block holds past it is not text.
        run = run[: next((i + 1 for i, t in enumerate(run) if t in stops), len(run))]
        check = _fresh(engine, constraint)
        assert check.accept(run) == len(run)


@pytest.mark.parametrize("threshold", [None, 0.9])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_embedded_model_ends_with_output_its_schema_accepts(embedded, threshold, temperature):
    for seed in range(3):
        params = embedded.defaults.replace(
            max_tokens=64, steps=64, threshold=threshold, temperature=temperature, seed=seed
        )
        request = embedded.make_request("A person as JSON:", params, constraint=SCHEMA)
        outs = _run(embedded, [request])[request.request_id]
        _assert_valid_prefixes(embedded, SCHEMA, outs)
        assert outs[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(outs[-1].text), PERSON)


@pytest.mark.parametrize("folder", ["llada-tiny", "dream-tiny", "sdar-tiny", "llada2-tiny"])
@pytest.mark.parametrize(
    "constraint, check",
    MATCHES,
)
def test_reference_models_end_on_a_complete_match(folder: str, constraint, check):
    engine = Engine.from_pretrained(REFERENCE / folder, progress=False)
    params = engine.defaults.replace(max_tokens=48, seed=1)
    request = engine.make_request("Answer:", params, constraint=constraint)
    outs = _run(engine, [request])[request.request_id]
    _assert_valid_prefixes(engine, constraint, outs)
    assert outs[-1].finish_reason == "stop" and check(outs[-1].text)


def test_a_constrained_row_leaves_its_batch_mates_bit_identical(embedded):
    free = [embedded.defaults.replace(max_tokens=32, steps=32, seed=s) for s in (4, 5)]
    alone = [_run(embedded, [embedded.make_request("Once", p)]) for p in free]
    alone_tokens = [list(outs.values())[0][-1].tokens for outs in alone]
    mates = [embedded.make_request("Once", p) for p in free]
    constrained = embedded.make_request(
        "A person:", embedded.defaults.replace(max_tokens=64, steps=64), constraint=SCHEMA
    )
    outs = _run(embedded, [mates[0], constrained, mates[1]])
    assert [outs[m.request_id][-1].tokens for m in mates] == alone_tokens
    assert outs[constrained.request_id][-1].finish_reason == "stop"


def test_rejected_proposals_are_counted_in_the_step_extras(embedded):
    params = embedded.defaults.replace(max_tokens=64, steps=64, threshold=0.5)
    request = embedded.make_request("A person as JSON:", params, constraint=SCHEMA)
    outs = _run(embedded, [request])[request.request_id]
    counted = sum(out.extras.get("grammar_rejected", 0) for out in outs)
    assert counted == request.constraint.rejected
    assert all("grammar_rejected" in out.extras for out in outs if out.committed)


def test_what_a_constraint_cannot_honour_is_refused_by_name(embedded):
    base = embedded.defaults.replace(max_tokens=16)
    for change, field in [
        ({"stop": ("}",)}, "stop"),
        ({"verify_threshold": 0.5}, "verify_threshold"),
        ({"ignore_eos": True}, "ignore_eos"),
    ]:
        with pytest.raises(InvalidParam) as err:
            embedded.make_request("x", base.replace(**change), constraint=SCHEMA)
        assert err.value.param == field
    with pytest.raises(InvalidParam) as err:
        embedded.make_request("x", base, suffix="y", constraint=SCHEMA)
    assert err.value.param == "suffix"
    with pytest.raises(InvalidParam) as err:
        embedded.make_request("x", base, constraint=Constraint("regex", "(((", "guided_regex"))
    assert err.value.param == "guided_regex"


def test_a_family_without_a_constrained_rule_refuses_it_by_name(monkeypatch):
    engine = Engine.from_pretrained(REFERENCE / "diffusiongemma-tiny", progress=False)
    monkeypatch.setattr(engine.first.family, "constrains", False)
    with pytest.raises(InvalidParam) as err:
        engine.make_request("x", engine.defaults.replace(max_tokens=8), constraint=SCHEMA)
    assert err.value.param == "response_format"


@pytest.fixture(scope="module")
def gemma() -> Engine:
    return Engine.from_pretrained(REFERENCE / "diffusiongemma-tiny", progress=False)


def _assert_fixed_prefixes(engine: Engine, constraint: Constraint, outs: list[StepOutput]):
    """A uniform-state canvas commits nothing for good until it ends, so the check is on its
    grammar prefix: every step's output up to the end of the prefix is a run a fresh matcher
    takes whole, and no step changes a token an earlier step fixed."""
    stops = engine.first.special.stop_ids
    fixed: list[int] = []
    for out in outs:
        assert out.tokens[: len(fixed)] == fixed, "a fixed token changed"
        if out.canvas_span is None or "grammar_prefix" not in out.extras:
            continue
        fixed = out.tokens[: out.canvas_span[0] + out.extras["grammar_prefix"]]
        run = fixed[: next((i + 1 for i, t in enumerate(fixed) if t in stops), len(fixed))]
        assert _fresh(engine, constraint).accept(run) == len(run)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "constraint, check",
    MATCHES,
)
def test_diffusiongemma_keeps_a_valid_prefix_and_ends_on_a_match(
    gemma, temperature, constraint, check
):
    """Its canvases are 16 tokens: the schema's outputs run over several of them."""
    for seed in range(2):
        params = gemma.defaults.replace(max_tokens=64, temperature=temperature, seed=seed)
        request = gemma.make_request("Answer:", params, constraint=constraint)
        outs = _run(gemma, [request])[request.request_id]
        _assert_fixed_prefixes(gemma, constraint, outs)
        assert outs[-1].finish_reason == "stop" and check(outs[-1].text), outs[-1].text
        counted = sum(out.extras.get("grammar_rejected", 0) for out in outs)
        assert counted == request.constraint.rejected


def test_a_constrained_diffusiongemma_row_leaves_its_batch_mates_bit_identical(gemma):
    free = [gemma.defaults.replace(max_tokens=32, seed=s) for s in (4, 5)]
    alone = [_run(gemma, [gemma.make_request("Once", p)]) for p in free]
    alone_tokens = [list(outs.values())[0][-1].tokens for outs in alone]
    mates = [gemma.make_request("Once", p) for p in free]
    params = gemma.defaults.replace(max_tokens=64, seed=1)
    constrained = gemma.make_request("A person:", params, constraint=SCHEMA)
    outs = _run(gemma, [mates[0], constrained, mates[1]])
    assert [outs[m.request_id][-1].tokens for m in mates] == alone_tokens
    assert outs[constrained.request_id][-1].finish_reason == "stop"


def test_llada2_edits_are_off_by_default_under_a_constraint_and_refused_when_asked():
    engine = Engine.from_pretrained(REFERENCE / "llada2-tiny", progress=False)
    assert engine.defaults.editing_threshold is not None  # the checkpoint edits by default
    request = engine.make_request("x", engine.defaults.replace(max_tokens=8), constraint=SCHEMA)
    assert request.params.editing_threshold is None
    with pytest.raises(InvalidParam) as err:
        engine.make_request(
            "x", engine.defaults.replace(max_tokens=8, editing_threshold=0.9), constraint=SCHEMA
        )
    assert err.value.param == "editing_threshold"


def test_the_matcher_takes_the_longest_valid_run_and_a_stop_after_a_match(embedded):
    row = _fresh(embedded, Constraint.choice(["yes"], "guided_choice"))
    ids = embedded.tokenizer.encode("yes")
    eos = embedded.first.special.eos
    assert row.accept([*ids, 7, 7]) == len(ids) and row.rejected == 2 and row.done
    assert row.accept([eos, 7]) == 1  # the stop ends the output
    assert token_mask(row.allowed(100), 4096, CPU).nonzero().flatten().tolist() == [eos]


def test_compiling_is_cached_bounded_in_size_and_in_time(monkeypatch):
    folder = REFERENCE / "llada-tiny"
    text = (Path(folder) / "tokenizer.json").read_text()
    grammars = GrammarCompiler(lambda: text, 349, 349, [321])
    assert grammars.compile(SCHEMA) is grammars.compile(SCHEMA)
    huge = Constraint("regex", "a" * (compiler_module.MAX_SOURCE_CHARS + 1), "guided_regex")
    with pytest.raises(ConstraintError, match="at most"):
        grammars.compile(huge)

    def never_done(self, constraint):
        time.sleep(5)

    monkeypatch.setattr(compiler_module, "COMPILE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(GrammarCompiler, "_build", never_done)
    slow = Constraint("regex", "slow", "guided_regex")
    start = time.monotonic()
    with pytest.raises(ConstraintError, match="took over"):
        grammars.compile(slow)
    with pytest.raises(ConstraintError, match="took over"):  # remembered: no second wait
        grammars.compile(slow)
    assert time.monotonic() - start < 4  # generous: two 0.2 s bounds, not two 5 s builds


def _tight_runs(engine: Engine) -> list[StepOutput]:
    """The last output of requests whose max_tokens leaves two positions past the schema's
    shortest instance found (one for the stop token), at several seeds and both rules."""
    room = len(_fresh(engine, SCHEMA).completion(100)) + 2
    last = []
    for seed in range(4):
        for threshold in (None, 0.9):
            params = engine.defaults.replace(
                max_tokens=room, steps=room, threshold=threshold, temperature=1.0, seed=seed
            )
            request = engine.make_request("A person:", params, constraint=SCHEMA)
            last.append(_run(engine, [request])[request.request_id][-1])
    return last


def test_a_request_closes_its_match_within_its_canvas(embedded, monkeypatch):
    """With the closing rule every tight run ends with output the schema accepts; without
    it (the search never starts) some are cut mid-value."""
    for out in _tight_runs(embedded):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    monkeypatch.setattr(row_module, "CLOSE_WITHIN", 0)
    assert any(out.finish_reason == "length" for out in _tight_runs(embedded))


@pytest.mark.parametrize(
    "folder", ["llada2-tiny", "sdar-tiny", "llada-tiny", "diffusiongemma-tiny"]
)
def test_a_match_longer_than_the_canvas_ends_by_length_not_by_error(folder: str):
    """Before: once a constrained LLaDA2 row had filled every position, its block's settling
    forward looked for a masked position that was no longer there, and the request failed."""
    engine = Engine.from_pretrained(REFERENCE / folder, progress=False)
    never_closes = Constraint("regex", "a{200}", "guided_regex")
    request = engine.make_request(
        "x", engine.defaults.replace(max_tokens=32), constraint=never_closes
    )
    outs = _run(engine, [request])[request.request_id]
    _assert_valid_prefixes(engine, never_closes, outs)
    assert outs[-1].finish_reason == "length" and set(outs[-1].text) <= {"a"}
    assert outs[-1].error_code == "constraint_incomplete"
    free = engine.make_request("x", engine.defaults.replace(max_tokens=32, ignore_eos=True))
    assert _run(engine, [free])[free.request_id][-1].error_code is None


def test_a_complete_match_that_could_go_on_ends_while_a_stop_fits():
    """LLaDA2's random model extends a complete number digit by digit and never writes EOS:
    before, it ran into the canvas's end (`length`) with valid text; the row now ends it."""
    engine = Engine.from_pretrained(REFERENCE / "llada2-tiny", progress=False)
    digits = Constraint("regex", "[0-9]+", "guided_regex")
    for seed in range(2):
        request = engine.make_request(
            "x", engine.defaults.replace(max_tokens=32, seed=seed), constraint=digits
        )
        outs = _run(engine, [request])[request.request_id]
        _assert_valid_prefixes(engine, digits, outs)
        assert outs[-1].finish_reason == "stop" and outs[-1].text.isdigit()
        assert outs[-1].error_code is None
