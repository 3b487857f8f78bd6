"""Load a LLaDA2.x checkpoint folder (real tensor names) into `LLaDA2`.

Our module tree mirrors the checkpoint's, so names map by dropping the `model.` prefix;
single-file or sharded safetensors, every tensor placed straight into a model built on the meta
device (the shared `fill`); each expert's tensors go into the stacked experts' rows. Knows
nothing of tokenizers, sampling or requests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from marble.families.llada2.config import LLaDA2Config
from marble.families.llada2.model import LLaDA2
from marble.model.experts import listed_layout, place_listed
from marble.model.loader import load_filled, place, strip_model_prefix

log = logging.getLogger(__name__)


def load_llada2(folder: str | Path, **options: Any) -> LLaDA2:
    """Build the model for `folder` and fill it tensor by tensor (`options`: `load_filled`'s
    device, dtype, progress); raise CheckpointError."""
    build = lambda config: LLaDA2(LLaDA2Config.from_file(config))  # noqa: E731
    return load_filled(
        folder,
        build,
        strip_model_prefix,
        "llada2",
        layout=listed_layout,
        put=_put,
        **options,
    )[0]


def _put(model: LLaDA2, name: str, value: Tensor) -> None:
    """Each expert's part into the stacked experts, anything else as itself."""
    if not place_listed(model, name, value):
        place(model, name, value)
