"""LLaDA2's tokenizer and Ling-2.0 chat template, through Marble's `TextTokenizer`.

Rendering every golden case's messages gives upstream's prompt text and ids exactly (no BOS,
special tokens recognised); the mask, EOS and pad ids come from the checkpoint's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marble.model.tokenizer import TextTokenizer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODEL_DIR = REFERENCE / "llada2-tiny"
GOLDEN = REFERENCE / "golden" / "llada2"
if not GOLDEN.exists():
    pytest.skip(f"reference data {GOLDEN} is absent", allow_module_level=True)
CASES = json.loads((GOLDEN / "golden_generate.json").read_text())["cases"]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(MODEL_DIR)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_chat_prompts_match_upstream(tok: TextTokenizer, case: dict):
    text = tok.render_chat(case["chat_messages"])
    assert text == case["prompt_text"]
    assert tok.encode(text) == case["prompt_ids"]


def test_golden_logits_prompt(tok: TextTokenizer):
    logits = json.loads((GOLDEN / "golden_logits.json").read_text())
    a, ids = logits["inputs"]["a"], logits["ids"]["a.input_ids"]
    assert tok.encode(a["prompt_text"]) == ids[: a["prompt_length"]]


def test_special_ids_come_from_the_files(tok: TextTokenizer):
    special = tok.special
    assert (special.mask, special.eos, special.pad) == (451, 448, 448)
    assert tok.tok.token_to_id("<|mask|>") == special.mask
