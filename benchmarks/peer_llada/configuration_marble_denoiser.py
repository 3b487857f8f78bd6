"""Hugging Face config for a Marble `Denoiser` checkpoint, so `transformers` servers can load it.

Copied next to a checkpoint's weights by `benchmarks/peers.py` (`auto_map` in its config.json
names this file): the Marble `ModelConfig` travels whole under the `marble` key.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class MarbleDenoiserConfig(PretrainedConfig):
    model_type = "marble_denoiser"

    def __init__(self, marble: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.marble = dict(marble or {})
        super().__init__(**kwargs)
