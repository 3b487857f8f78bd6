"""Load a LLaDA2.x checkpoint folder (real tensor names) into `LLaDA2`.

Our module tree mirrors the checkpoint's, so names map by dropping the `model.` prefix;
single-file or sharded safetensors, every tensor placed straight into a model built on the meta
device (the shared `fill`). Knows nothing of tokenizers, sampling or requests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from marble.families.llada2.config import LLaDA2Config
from marble.families.llada2.model import LLaDA2
from marble.model.loader import load_filled, strip_model_prefix

log = logging.getLogger(__name__)


def load_llada2(folder: str | Path, **options: Any) -> LLaDA2:
    """Build the model for `folder` and fill it tensor by tensor (`options`: `load_filled`'s
    device, dtype, progress); raise CheckpointError."""
    build = lambda config: LLaDA2(LLaDA2Config.from_file(config))  # noqa: E731
    return load_filled(folder, build, strip_model_prefix, "llada2", **options)[0]
