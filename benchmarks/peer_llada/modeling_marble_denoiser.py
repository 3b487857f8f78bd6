"""Hugging Face `AutoModel` over Marble's own `Denoiser`, for `trust_remote_code` loaders.

The peer servers `benchmarks/peers.py` compares against load a model with
`AutoModel.from_pretrained(folder, trust_remote_code=True)` and call
`model(input_ids, attention_mask=..., position_ids=...).logits`. This wrapper answers that
call with Marble's transformer, unchanged, so both servers run the same forward math and the
comparison measures serving and sampling, not kernels. Needs `marble.model` importable.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from marble.families.masked.config import ModelConfig
from marble.families.masked.model import Denoiser

from .configuration_marble_denoiser import MarbleDenoiserConfig


class MarbleDenoiserModel(PreTrainedModel):
    config_class = MarbleDenoiserConfig
    # The weights are saved with Marble's names ("embed.weight", ...): transformers adds this
    # prefix on load, as for any base-model checkpoint loaded into a wrapper.
    base_model_prefix = "model"

    def __init__(self, config: MarbleDenoiserConfig) -> None:
        super().__init__(config)
        self.model = Denoiser(ModelConfig.from_json_dict(config.marble))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to initialise: every weight comes from the checkpoint."""

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        **_: Any,
    ) -> MaskedLMOutput:
        """input_ids [B, L] -> logits [B, L, V] at every position."""
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return MaskedLMOutput(logits=logits)
