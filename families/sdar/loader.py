"""Load an SDAR checkpoint folder (Qwen3 tensor names) into `SDAR`.

Our module tree mirrors the checkpoint's, so names map by dropping the `model.` prefix;
single-file or sharded safetensors, every tensor placed straight into a model built on the meta
device (model/loader.py's shared `fill`, which reports every missing, unexpected, mis-shaped or
non-finite tensor at once). Knows nothing of tokenizers, sampling or requests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from marble.families.sdar.config import SDARConfig
from marble.families.sdar.model import SDAR
from marble.model.loader import config_file, load_filled, strip_model_prefix

log = logging.getLogger(__name__)


def load_sdar(folder: str | Path, **options: Any) -> SDAR:
    """Build the model for `folder` and fill it tensor by tensor (`options`: `load_filled`'s
    device, dtype, progress); raise CheckpointError."""
    cfg = SDARConfig.from_file(config_file(Path(folder)))
    tied = cfg.tie_word_embeddings
    # A tied checkpoint may still carry the head: the embedding is what both use.
    drop = ("lm_head.weight",) if tied else ()
    model, _ = load_filled(
        folder, lambda _: SDAR(cfg), strip_model_prefix, "sdar", drop=drop, **options
    )
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    return model
