"""The checkpoint fill every family's loader shares: find `config.json` and the weights
(`model.safetensors` or a sharded `model.safetensors.index.json`), map each tensor name by the
family's rule and place it straight into a model built on the meta device, so peak memory stays
near one copy of the weights; and the two refusals, `UnsupportedModelError` and
`CheckpointError`. Never downloads. Knows no family's names or shapes.
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

log = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The checkpoint describes an architecture Marble cannot serve (yet)."""


class CheckpointError(ValueError):
    """The folder is not a loadable checkpoint; the message says precisely why."""


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


def place(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in `model` as the parameter or buffer `name` (replacing a meta one)."""
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
    put: Callable[[nn.Module, str, torch.Tensor], None] = place,
) -> tuple[int, int]:
    """Place every tensor of `folder`'s weight files into `model` (built on the meta device)
    under `rename(name)`, one at a time, cast to `dtype` (None: as stored) on `device`; names
    `skip` accepts are left out. Raises one CheckpointError naming every missing, unexpected,
    mis-shaped and non-finite tensor of `expected`; returns (tensors placed, skipped).
    `put` places one tensor (`place`, or a model's own for names that are not attributes)."""
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
        put(model, name, value)
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


def load_filled(
    folder: str | Path,
    build: Callable[[Path], nn.Module],
    rename: Callable[[str], str | None],
    label: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    progress: bool = False,
    drop: tuple[str, ...] = (),
    skip: Callable[[str], object] | None = None,
    layout: Callable[[nn.Module], dict[str, torch.Size]] = expected_tensors,
    put: Callable[[nn.Module, str, torch.Tensor], None] = place,
) -> tuple[nn.Module, int]:
    """A family's model for `folder`: `build(config.json's path)` on the meta device, every
    parameter and buffer filled from the checkpoint (`drop`: ours that it need not hold, and is
    skipped if it does, e.g. a tied head), in eval mode; with the count of tensors `skip` or
    `drop` passed over. `layout` names the tensors a checkpoint must hold and `put` places one
    (see `fill`), for a model whose stored layout differs from its checkpoint's. Raises
    CheckpointError."""
    folder = Path(folder)
    with torch.device("meta"):
        model = build(config_file(folder))
    expected = layout(model)
    for name in drop:
        expected.pop(name)
    loaded, skipped = fill(
        model,
        folder,
        expected,
        rename,
        label,
        device,
        dtype,
        skip=lambda name: name in drop or bool(skip and skip(name)),
        progress=progress,
        put=put,
    )
    log.info("loaded %s (%s, %d tensors) on %s", folder, label, loaded, device)
    return model.eval(), skipped
