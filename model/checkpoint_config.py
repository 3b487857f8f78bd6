"""Reading a checkpoint's JSON files (`config.json`, `generation_config.json`), for every
family's config: the model_type the registry matches, a required key, the checks their
settings share, and `from_file` / `from_folder`. Knows no family's keys.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Self

from marble.model.loader import UnsupportedModelError


def model_type_of(raw: dict[str, Any]) -> str:
    """A parsed `config.json`'s `model_type`, lower-cased ("" when it has none): what the
    family registry matches."""
    return str(raw.get("model_type", "")).lower()


def need(raw: dict[str, Any], key: str, where: str = "config.json") -> Any:
    """`raw[key]`, or UnsupportedModelError naming the key and the file it is missing from."""
    if key not in raw:
        raise UnsupportedModelError(f"{where} has no {key!r}")
    return raw[key]


def at_least(low: float, **values: float) -> None:
    """ValueError naming the first of `values` below `low`."""
    for name, value in values.items():
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def check_sampler(temperature: float, top_k: int, top_p: float) -> None:
    """A stored sampler's settings: a finite temperature >= 0, an integer top_k >= 0, top_p in
    (0, 1]; ValueError otherwise."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class JsonConfig:
    """A config read from one JSON file by its `from_json_dict`."""

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> Self:
        raise NotImplementedError

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        return cls.from_json_dict(json.loads(Path(path).read_text()))


class GenerationConfig:
    """A config read from a checkpoint folder's `generation_config.json` (empty when absent)
    by its `from_json_dict`, with `config.json` beside it for what it leaves out."""

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any], model_raw: dict[str, Any] | None = None) -> Self:
        raise NotImplementedError

    @classmethod
    def from_folder(cls, folder: str | Path) -> Self:
        folder = Path(folder)
        model_raw = json.loads((folder / "config.json").read_text())
        path = folder / "generation_config.json"
        raw = json.loads(path.read_text()) if path.exists() else {}
        return cls.from_json_dict(raw, model_raw)
