"""The embedded default model: shipped in the package, loads through the real path, generates."""

from __future__ import annotations

import json

from marble.model.default import CHECKPOINT_DIR
from marble.scheduler.engine import Engine
from marble.scheduler.served_model import load_defaults
from marble.training.evaluate import choose_defaults


def test_shipped_checkpoint_is_complete_and_small():
    names = {p.name for p in CHECKPOINT_DIR.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "marble_defaults.json",
    } <= names
    assert sum(p.stat().st_size for p in CHECKPOINT_DIR.iterdir()) <= 20 * 2**20
    assert json.loads((CHECKPOINT_DIR / "config.json").read_text())["model_type"] == "marble"


def test_shipped_checkpoint_generates():
    engine = Engine.from_pretrained(progress=False)  # no path: the embedded model
    assert engine.tokenizer.chat_template is None  # a code model: chat is a documented 400
    assert engine.defaults == load_defaults(CHECKPOINT_DIR)  # stored with the checkpoint
    params = engine.defaults.replace(max_tokens=8, block_length=8, threshold=None, steps=4, seed=0)
    outs = list(engine.generate("def fibonacci(n):\n", params))
    assert outs[-1].finished and len(outs) <= 4
    assert outs[-1].finish_reason in ("stop", "length")
    assert engine.tokenizer.decode(engine.tokenizer.encode("def f(x):\n    return x\n")) == (
        "def f(x):\n    return x\n"
    )


def test_compile_probe_counts_code_not_comments():
    from marble.training.completions import compiles, cut_last_line

    prompt = 'def f(x):\n    """Doc."""\n'
    assert not compiles(prompt, "\n\n#\n#\n")  # header + docstring alone already compile
    assert compiles(prompt, "    return x\n    unfinished(")
    assert not compiles(prompt, "    return (x\n")
    assert cut_last_line("a\nb") == "a\n" and cut_last_line("ab") == ""


def test_defaults_choice_treats_one_prompt_per_seed_as_noise():
    def probe(compiled, share):
        return {"compiled": compiled, "code_line_share": share, "tokens_per_forward": 2.0}

    # 48 prompts x 3 seeds: counts within 3 completions of the best tie.
    probes = {
        "blank": probe(72, 0.1),  # compiles by writing blank lines: never the default
        "repeats": probe(9, 0.66),
        "code": probe(6, 0.82),
        "worse": probe(2, 0.9),
    }
    assert choose_defaults(probes, noise=3) == "code"
    assert choose_defaults(probes, noise=1) == "repeats"  # one seed's noise band is narrower
    assert choose_defaults(probes | {"better": probe(13, 0.6)}, noise=3) == "better"


def test_defaults_decode_at_least_one_and_a_half_tokens_per_forward():
    def probe(compiled, tokens_per_forward):
        return {
            "compiled": compiled,
            "code_line_share": 0.8,
            "tokens_per_forward": tokens_per_forward,
        }

    probes = {"one-at-a-time": probe(72, 1.0), "parallel": probe(43, 1.7)}
    assert choose_defaults(probes, noise=3) == "parallel"


def test_verify_stays_a_default_only_if_it_beats_its_twin_on_fresh_prompts():
    from marble.training.evaluate import keeps_verify

    assert keeps_verify({"compiled": 57}, {"compiled": 53}, noise=3)
    assert not keeps_verify({"compiled": 56}, {"compiled": 53}, noise=3)  # within the noise
    assert not keeps_verify({"compiled": 50}, {"compiled": 53}, noise=3)


def test_completion_probe_pools_seeds_and_counts_a_remasked_position_once():
    """The evaluation's probe on the embedded model: each round seeds its prompts anew, and
    under verify a position filled, remasked and filled again is one token, not two."""
    from marble.training.evaluate import completion_probe

    engine = Engine.from_pretrained(progress=False)
    prompts = ['def add(a, b):\n    """Return a + b."""\n', "def f(x):\n"]
    plain = {"temperature": 0.4, "threshold": 0.3}
    verify = plain | {"verify_threshold": 0.9}
    one = completion_probe(engine, prompts, plain, 32, rounds=1)
    two = completion_probe(engine, prompts, plain, 32, rounds=2)
    assert (one["completions"], two["completions"]) == (2, 4)
    assert two["samples"][:2] == one["samples"][:2]  # round 0 seeds alike
    checked = completion_probe(engine, prompts, verify, 32, rounds=2)
    # Each of the 2 x 2 canvases fills each of its 32 positions at most once by a forward (the
    # rest of a canvas that stopped at EOS is filled without one), however often it remasks.
    assert checked["remasks"] > 0
    assert checked["positions_filled"] <= 4 * 32 < checked["positions_filled"] + checked["remasks"]
    assert checked["tokens_per_forward"] == round(
        checked["positions_filled"] / checked["forwards"], 2
    )
