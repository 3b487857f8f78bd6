"""Load a LLaDA, Dream or Marble checkpoint folder into a `Denoiser`: the tensor-name maps
(LLaDA -> ours, Dream/Qwen2 -> ours) over the shared checkpoint fill of `model/loader.py`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from marble.families.masked.config import ModelConfig
from marble.families.masked.model import Denoiser
from marble.model.loader import config_file, fill

log = logging.getLogger(__name__)

_LLADA_NAMES = [
    (r"model\.transformer\.wte\.weight", "embed.weight"),
    (r"model\.transformer\.ln_f\.weight", "norm.weight"),
    (r"model\.transformer\.ff_out\.weight", "lm_head.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn_norm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_norm\.weight", r"layers.\1.mlp_norm.weight"),
    (
        r"model\.transformer\.blocks\.(\d+)\.([qkv])_proj\.(weight|bias)",
        r"layers.\1.attn.\2_proj.\3",
    ),
    (r"model\.transformer\.blocks\.(\d+)\.attn_out\.weight", r"layers.\1.attn.o_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_proj\.weight", r"layers.\1.mlp.gate_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.up_proj\.weight", r"layers.\1.mlp.up_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_out\.weight", r"layers.\1.mlp.down_proj.weight"),
]
_DREAM_NAMES = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (
        r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)",
        r"layers.\1.attn.\2_proj.\3",
    ),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.weight"),
]
NAME_MAPS: dict[str, list[tuple[str, str]]] = {"llada": _LLADA_NAMES, "dream": _DREAM_NAMES}


def map_name(arch: str, name: str) -> str | None:
    """Checkpoint tensor name -> our parameter name (None when the map has no rule for it)."""
    rules = NAME_MAPS.get(arch)
    if rules is None:
        return name
    for pattern, repl in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def load_model(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    progress: bool = True,
) -> Denoiser:
    """Build the denoiser for `folder` and fill it tensor by tensor; raise CheckpointError."""
    folder = Path(folder)
    cfg = ModelConfig.from_file(config_file(folder))
    with torch.device("meta"):
        model = Denoiser(cfg)
    expected = {name: p.shape for name, p in model.named_parameters()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    loaded, _ = fill(
        model,
        folder,
        expected,
        lambda name: map_name(cfg.arch, name),
        cfg.arch,
        device,
        dtype,
        progress=progress,
    )
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    log.info("loaded %s (%s, %d tensors) on %s", folder, cfg.arch, loaded, device)
    return model.eval()
