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

import torch
from safetensors import safe_open
from torch import nn

from marble.model.diffusion_gemma import DiffusionGemma
from marble.model.diffusion_gemma_config import DiffusionGemmaConfig
from marble.model.loader import CheckpointError, weight_files

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


def _place(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        setattr(module, attr, nn.Parameter(value, requires_grad=False))


def load_diffusion_gemma(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> DiffusionGemma:
    """Build the model for `folder` and fill it tensor by tensor; raise CheckpointError."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: config.json not found (is this a checkpoint folder?)")
    cfg = DiffusionGemmaConfig.from_file(folder / "config.json")
    files = weight_files(folder)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    expected = {n: t.shape for n, t in model.named_parameters()}
    expected |= {n: t.shape for n, t in model.named_buffers()}
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    nonfinite: list[str] = []
    skipped_vision = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for raw_name in f.keys():
                if _VISION.fullmatch(raw_name):
                    skipped_vision += 1
                    continue
                name = map_name(raw_name)
                if name is None or name not in expected:
                    unexpected.append(raw_name)
                    continue
                tensor = f.get_tensor(raw_name)
                loaded.add(name)  # a mis-shaped tensor is reported as such, not as missing
                if tuple(tensor.shape) != tuple(expected[name]):
                    mismatched.append(
                        f"{raw_name}: {tuple(tensor.shape)} != {tuple(expected[name])}"
                    )
                    continue
                value = tensor.to(device=device, dtype=dtype or tensor.dtype)
                # Checked after the cast: a float32 weight beyond float16's range is infinite.
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    nonfinite.append(raw_name)
                _place(model, name, value)
    problems = []
    missing = sorted(set(expected) - loaded)
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {sorted(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped tensors: {mismatched}")
    if nonfinite:
        problems.append(f"tensors with NaN or infinite values: {sorted(nonfinite)}")
    if problems:
        raise CheckpointError(f"{folder} (diffusion_gemma): " + "; ".join(problems))
    if skipped_vision:
        log.info(
            "%s: skipped %d vision-tower tensors; image inputs are not supported (text only)",
            folder,
            skipped_vision,
        )
    log.info("loaded %s (diffusion_gemma, %d tensors) on %s", folder, len(loaded), device)
    return model.eval()
