"""DiffusionGemma's tokenizer and Gemma 4 chat template, through Marble's `TextTokenizer`.

Rendering every golden case's messages (thinking off and on) gives upstream's prompt text and
ids exactly; the special ids the model stops on come from the checkpoint's files and agree
with each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marble.families.diffusion_gemma.config import DiffusionGemmaGenerationConfig
from marble.model.tokenizer import TextTokenizer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODEL_DIR = REFERENCE / "diffusiongemma-tiny"
GOLDEN = REFERENCE / "golden" / "diffusiongemma"
if not GOLDEN.exists():
    pytest.skip(f"reference data {GOLDEN} is absent", allow_module_level=True)
GENERATE = json.loads((GOLDEN / "golden_generate.json").read_text())


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(MODEL_DIR)


def _prompts() -> list:
    """pytest params (messages, template kwargs, expected text or None, expected ids)."""
    out = []
    for case in GENERATE["cases"]:
        for row, messages in enumerate(case["chat_messages"]):
            mask = case["attention_mask"][row]
            ids = [i for i, m in zip(case["prompt_ids"][row], mask, strict=True) if m]
            kwargs = dict(case["chat_template_kwargs"])
            text = case["chat_prompts"][row]
            out.append(pytest.param(messages, kwargs, text, ids, id=f"{case['name']}[{row}]"))
    for case in GENERATE["diffusers_cases"]:
        messages = case["pipeline_call"]["messages"]
        out.append(pytest.param(messages, {}, None, case["prompt_ids"], id=case["name"]))
    logits = json.loads((GOLDEN / "golden_logits.json").read_text())["inputs"]
    messages = logits["prompt_chat_messages"]
    out.append(pytest.param(messages, {}, None, logits["prompt_ids"], id="golden_logits"))
    return out


@pytest.mark.parametrize("messages,kwargs,text,ids", _prompts())
def test_chat_prompts_match_upstream(
    tok: TextTokenizer, messages: list, kwargs: dict, text: str | None, ids: list[int]
):
    prompt = kwargs.pop("add_generation_prompt", True)
    rendered = tok.render_chat(messages, prompt, kwargs)
    if text is not None:
        assert rendered == text
    assert tok.encode(rendered) == ids


def test_thinking_switch(tok: TextTokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    off = tok.render_chat(messages)
    on = tok.render_chat(messages, template_kwargs={"enable_thinking": True})
    assert off == tok.render_chat(messages, template_kwargs={"enable_thinking": False})
    assert off.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    assert "<|think|>" in on and on.endswith("<|turn>model\n")


def test_special_ids_come_from_the_files(tok: TextTokenizer):
    gen = DiffusionGemmaGenerationConfig.from_folder(MODEL_DIR)
    cfg = tok.config
    by_name = [tok.tok.token_to_id(cfg[k]) for k in ("eos_token", "eot_token", "str_token")]
    assert list(gen.eos_token_ids) == by_name  # <eos>, <turn|>, <|tool_response>
    assert gen.pad_token_id == tok.tok.token_to_id(cfg["pad_token"]) == tok.special.pad
    assert tok.special.eot == tok.tok.token_to_id(cfg["eot_token"])
    assert tok.special.eos in gen.eos_token_ids


def test_text_round_trips(tok: TextTokenizer):
    text = "Why is the sky blue? Ünïcödé ✓"
    assert tok.decode(tok.encode(text)) == text
