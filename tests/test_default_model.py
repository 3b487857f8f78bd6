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


def test_defaults_choice_treats_one_prompt_as_noise():
    def probe(rate, share):
        return {"compile_rate": rate, "code_line_share": share}

    probes = {
        "blank": probe(0.5, 0.1),  # compiles by writing blank lines: never the default
        "repeats": probe(0.042, 0.66),
        "code": probe(0.021, 0.82),
        "worse": probe(0.0, 0.9),
    }
    assert choose_defaults(probes, 48) == "code"
    assert choose_defaults(probes | {"better": probe(0.125, 0.6)}, 48) == "better"


def test_defaults_decode_at_least_one_and_a_half_tokens_per_forward():
    def probe(rate, tokens_per_forward):
        return {
            "compile_rate": rate,
            "code_line_share": 0.8,
            "tokens_per_forward": tokens_per_forward,
        }

    probes = {"one-at-a-time": probe(0.5, 1.0), "parallel": probe(0.3, 1.7)}
    assert choose_defaults(probes, 48) == "parallel"
