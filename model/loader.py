"""Load a local checkpoint folder (Hugging Face layout) into a `Denoiser`.

Reads `config.json` and `model.safetensors` or a sharded `model.safetensors.index.json`, maps
tensor names (LLaDA -> ours, Dream/Qwen2 -> ours) and places each tensor straight into a model
built on the meta device, so peak memory stays near one copy of the weights. Never downloads.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from marble.model.config import ModelConfig
from marble.model.transformer import Denoiser

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The folder is not a loadable checkpoint; the message says precisely why."""


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


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in the index are missing: {missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt")
    )
    hint = f" (found {others}: convert them to safetensors)" if others else ""
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


def _tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _count_tensors(files: list[Path]) -> int:
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += len(list(f.keys()))
    return total


def config_file(folder: Path) -> Path:
    """`folder`'s config.json, or a CheckpointError saying the folder is not a checkpoint."""
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: config.json not found (is this a checkpoint folder?)")
    return path


def _place(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        setattr(module, attr, nn.Parameter(value, requires_grad=False))


def fill(
    model: nn.Module,
    folder: Path,
    expected: dict[str, torch.Size],
    rename: Callable[[str], str | None],
    label: str,
    device: str | torch.device,
    dtype: torch.dtype | None,
    skip: Callable[[str], bool] = lambda name: False,
    progress: bool = False,
) -> tuple[int, int]:
    """Place every tensor of `folder`'s weight files into `model` (built on the meta device)
    under `rename(name)`, one at a time, cast to `dtype` (None: as stored) on `device`; names
    `skip` accepts are left out. Raises one CheckpointError naming every missing, unexpected,
    mis-shaped and non-finite tensor of `expected`; returns (tensors placed, skipped)."""
    files = weight_files(folder)
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    nonfinite: list[str] = []
    skipped = 0
    bar = tqdm(
        total=_count_tensors(files) if progress else None,
        desc=f"loading {folder.name}",
        unit="tensor",
        disable=not progress,
        leave=False,
    )
    for raw_name, tensor in _tensors(files):
        bar.update(1)
        if skip(raw_name):
            skipped += 1
            continue
        name = rename(raw_name)
        if name is None or name not in expected:
            unexpected.append(raw_name)
            continue
        loaded.add(name)  # a mis-shaped tensor is reported as such, not as missing
        if tuple(tensor.shape) != tuple(expected[name]):
            mismatched.append(f"{raw_name}: {tuple(tensor.shape)} != {tuple(expected[name])}")
            continue
        value = tensor.to(device=device, dtype=dtype or tensor.dtype)
        # Checked after the cast: a float32 weight beyond float16's range becomes infinite.
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            nonfinite.append(raw_name)
        _place(model, name, value)
        del tensor
    bar.close()
    missing = sorted(set(expected) - loaded)
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {sorted(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped tensors: {mismatched}")
    if nonfinite:
        # Served anyway, every request would fail (or print garbage): refuse at load.
        problems.append(f"tensors with NaN or infinite values: {sorted(nonfinite)}")
    if problems:
        raise CheckpointError(f"{folder} ({label}): " + "; ".join(problems))
    return len(loaded), skipped


_UNDER_MODEL = re.compile(r"model\.(.+)")


def strip_model_prefix(name: str) -> str | None:
    """Checkpoint name -> ours, for a model whose tree mirrors the checkpoint's under `model.`
    (LLaDA2, SDAR); the untied head keeps its name. None: not one of ours."""
    if name == "lm_head.weight":
        return name
    match = _UNDER_MODEL.fullmatch(name)
    return match.group(1) if match else None


def expected_tensors(model: nn.Module) -> dict[str, torch.Size]:
    """Every parameter and buffer of a model built on the meta device: what its checkpoint
    must hold, by our names."""
    return {n: t.shape for n, t in (*model.named_parameters(), *model.named_buffers())}


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
