"""Load an SDAR checkpoint folder (Qwen3 tensor names) into `SDAR`.

Our module tree mirrors the checkpoint's, so names map by dropping the `model.` prefix;
single-file or sharded safetensors, every tensor placed straight into a model built on the meta
device (model/loader.py's shared `fill`, which reports every missing, unexpected, mis-shaped or
non-finite tensor at once). Knows nothing of tokenizers, sampling or requests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from marble.families.sdar.config import SDARConfig
from marble.families.sdar.model import SDAR
from marble.model.loader import config_file, expected_tensors, fill, strip_model_prefix

log = logging.getLogger(__name__)


def load_sdar(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> SDAR:
    """Build the model for `folder` and fill it tensor by tensor; raise CheckpointError."""
    folder = Path(folder)
    cfg = SDARConfig.from_file(config_file(folder))
    with torch.device("meta"):
        model = SDAR(cfg)
    expected = expected_tensors(model)
    tied = cfg.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    # A tied checkpoint may still carry the head: the embedding is what both use.
    loaded, _ = fill(
        model,
        folder,
        expected,
        strip_model_prefix,
        "sdar",
        device,
        dtype,
        skip=lambda name: tied and name == "lm_head.weight",
    )
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    log.info("loaded %s (sdar, %d tensors) on %s", folder, loaded, device)
    return model.eval()
