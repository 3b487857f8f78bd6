"""Load a DiffusionGemma checkpoint folder (real tensor names) into `DiffusionGemma`.

The text weights live once under `model.decoder.*`; the encoder contributes only its own
`layer_scalar` per layer. The vision tower is skipped with a logged note (text prompts only).
Single-file or sharded safetensors; every tensor placed straight into a model built on the meta
device. Knows nothing of tokenizers, sampling or requests.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from marble.families.diffusion_gemma.config import DiffusionGemmaConfig
from marble.families.diffusion_gemma.model import DiffusionGemma
from marble.model.loader import load_filled

log = logging.getLogger(__name__)

_VISION = re.compile(r"model\.encoder\.(vision_tower|embed_vision)\..+")
_RULES = [
    (re.compile(r"model\.decoder\.(.+)"), r"\1"),
    (
        re.compile(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar"),
        r"layers.\1.encoder_layer_scalar",
    ),
]


def map_name(name: str) -> str | None:
    """Checkpoint tensor name -> our parameter/buffer name; None for names we do not know."""
    for pattern, repl in _RULES:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return None


def load_diffusion_gemma(folder: str | Path, **options: Any) -> DiffusionGemma:
    """Build the model for `folder` and fill it tensor by tensor (`options`: `load_filled`'s
    device, dtype, progress); raise CheckpointError."""
    model, skipped_vision = load_filled(
        folder,
        lambda config: DiffusionGemma(DiffusionGemmaConfig.from_file(config)),
        map_name,
        "diffusion_gemma",
        skip=_VISION.fullmatch,
        **options,
    )
    if skipped_vision:
        log.info(
            "%s: skipped %d vision-tower tensors; image inputs are not supported (text only)",
            folder,
            skipped_vision,
        )
    return model
