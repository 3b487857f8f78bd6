"""Write a serving checkpoint folder from a training state: the layout every checkpoint has.

config.json (ModelConfig.to_json_dict), model.safetensors in bfloat16 under our own parameter
names (the tied lm_head dropped), tokenizer.json, tokenizer_config.json without a chat
template (the model was trained on code, never on conversations, so chat is refused with a 400
rather than answered with junk), and marble_defaults.json (sampling defaults). Knows nothing
about the training loop.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from marble.families.masked.config import ModelConfig
from marble.training.corpus import EOS_TOKEN, MASK_TOKEN

# SamplingParams field names. Undertrained models collapse to newlines under greedy
# confidence-ordered decoding; temperature with random unmasking order gives code-shaped text.
STARTER_DEFAULTS: dict[str, Any] = {
    "temperature": 0.7,
    "remasking": "random",
    "threshold": None,
    "block_length": 32,
    "steps": None,
}


def tokenizer_config(seq_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "model_max_length": seq_len,
    }


def export_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer_json: str | Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the folder; an existing marble_defaults.json (measured values) is kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.detach().to(torch.bfloat16).contiguous()
        for name, t in state_dict.items()
        if not (cfg.tie_embeddings and name == "lm_head.weight")
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes 0600; the packaged file must stay readable to a non-root server user.
    (out / "model.safetensors").chmod(0o644)
    cfg_dict = cfg.to_json_dict() | {"torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    tok_cfg = tokenizer_config(cfg.max_seq_len)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    defaults = out / "marble_defaults.json"
    if not defaults.exists():
        defaults.write_text(json.dumps(STARTER_DEFAULTS, indent=2) + "\n")
    if extra is not None:
        (out / "marble_training.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out
