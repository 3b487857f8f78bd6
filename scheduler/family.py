"""What the engine, the scheduler and the server ask of a model family, and the registry that
finds one for a checkpoint or a model.

A family (`families/<name>/`) says whether a checkpoint's `config.json` is its own, loads it,
and answers for its requests: its serving defaults and the request fields it reads, what it
refuses, how many tokens it decodes for `max_tokens`, where its blocks start, its KV bytes and
worst-case forwards, and the runner that steps its rows. Families register under the
`marble.families` entry points (pyproject.toml), so nothing here names one: the registry
imports them by their entry points, never by module.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from marble.model.checkpoint_config import model_type_of
from marble.model.compiled_forward import CompiledForward
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.step_result import Runner

ENTRY_POINTS = "marble.families"
# The fields every family reads.
COMMON_FIELDS = frozenset(
    (
        "max_tokens",
        "block_length",
        "threshold",
        "temperature",
        "seed",
        "stop",
        "ignore_eos",
        "skip_special_tokens",
        "prefix_cache",
    )
)


class Served(Protocol):
    """What a family reads of the model it serves (`ServedModel`)."""

    model: torch.nn.Module
    special: Any  # the tokenizer's SpecialIds
    vocab_size: int
    kv_bytes_per_token: int


@dataclass(frozen=True)
class Parts:
    """What a family is built from."""

    model_type: str  # the `config.json` model_type it serves, lower case
    model_class: type[torch.nn.Module]  # the model it builds
    loader: Callable[..., torch.nn.Module]  # loader(folder, device=, dtype=, progress=)
    runner: type  # runner(model, mask id, padding id, decodable vocabulary size)


class Family(ABC):
    """One kind of model. Subclasses are stateless: every answer comes from their arguments."""

    name: ClassVar[str]  # for logs and errors
    parts: ClassVar[Parts]
    fields: ClassVar[frozenset[str]]  # the SamplingParams fields its requests read
    # Its canvas has a mask token, which a prompt may not contain (uniform-state models start
    # from noise instead).
    masked: ClassVar[bool] = True
    # It decodes whole canvases, counted per request (`marble_canvases_per_request`).
    canvases: ClassVar[bool] = False
    # It detects every config and owns every model: asked last, for what no other claims.
    fallback: ClassVar[bool] = False

    @classmethod
    def detects(cls, config: dict[str, Any]) -> bool:
        """Whether a checkpoint's `config.json` is this family's: its model_type."""
        return model_type_of(config) == cls.parts.model_type

    @classmethod
    def owns(cls, model: torch.nn.Module) -> bool:
        """Whether a built model is this family's (an engine built around a model)."""
        return isinstance(model, cls.parts.model_class)

    # It denoises between a prompt and a suffix (infilling).
    infills: ClassVar[bool] = False
    # Fields its requests may not leave None, each with what to say when they do.
    required: ClassVar[dict[str, str]] = {}
    # Its runner decodes under a structured-output constraint (`Request.constraint`).
    constrains: ClassVar[bool] = False
    # A prompt position's keys and values depend only on the tokens up to its block's end, so
    # its runner (a `CachedRowsRunner`) shares finished prompt blocks across requests; not so
    # where a full-attention prompt attends to its canvas.
    shares_prefixes: ClassVar[bool] = False

    @classmethod
    def load(cls, path: Path, device: str, dtype: torch.dtype, progress: bool) -> torch.nn.Module:
        return cls.parts.loader(path, device=device, dtype=dtype, progress=progress)

    @classmethod
    def defaults(cls, path: Path) -> dict[str, Any]:
        """Its serving defaults before the checkpoint's own `marble_defaults.json`."""
        return {}

    @classmethod
    @abstractmethod
    def context(cls, model: torch.nn.Module) -> int:
        """The longest canvas: prompt + generated + suffix."""

    @classmethod
    def runner(cls, served: Served) -> Runner:
        special = served.special
        return cls.parts.runner(served.model, special.mask, special.padding, served.vocab_size)

    @classmethod
    def compile(cls, runner: Runner, backend: str) -> CompiledForward:
        """Run the runner's per-step cached forward through `torch.compile` (`backend`, e.g.
        "inductor") from now on, over padded shape buckets; -> that compiled forward, which
        counts its compiles. The runner declares it as `compile_forward(backend)`; a family
        whose runner has none refuses."""
        compile_forward = getattr(runner, "compile_forward", None)
        if compile_forward is None:
            raise ValueError(f"the {cls.name} family has no compiled forward")
        return compile_forward(backend)

    @classmethod
    def kv_bytes_per_token(cls, model: torch.nn.Module) -> int:
        """A cached canvas position's bytes, for a family whose requests price their cache
        per position (0: its `kv_bytes` prices it otherwise)."""
        return 0

    @classmethod
    @abstractmethod
    def check(cls, m: Served, params: SamplingParams, suffix: str | list[int] | None) -> None:
        """Refuse by name (`InvalidParam`) what this family cannot do."""

    @classmethod
    def decoded_tokens(cls, m: Served, prompt_len: int, params: SamplingParams) -> int:
        """Tokens decoded for `max_tokens` (whole canvases or blocks may decode more; the
        completion is then cut to max_tokens)."""
        return params.max_tokens

    @classmethod
    def planned_steps(cls, request: Request) -> int | None:
        """Forwards planned for the request, shown with each step (None: decided as it runs,
        e.g. by a threshold)."""
        return request.total_steps

    @classmethod
    def block_offset(cls, prompt_len: int, params: SamplingParams) -> int:
        """How many positions before the generated region its first block begins."""
        return 0

    @classmethod
    @abstractmethod
    def kv_bytes(cls, m: Served, request: Request, decoded: int) -> int:
        """The KV cache the request holds at most while it runs."""

    @classmethod
    @abstractmethod
    def max_forwards(cls, request: Request, decoded: int) -> int:
        """The most forwards the request can take (its family's worst case)."""


@functools.cache
def families() -> tuple[type[Family], ...]:
    """Every registered family, the fallback (the one that detects any config) last."""
    found = [ep.load() for ep in entry_points(group=ENTRY_POINTS)]
    return tuple(sorted(found, key=lambda f: f.fallback))


def family_for_config(config: dict[str, Any]) -> type[Family]:
    for family in families():
        if family.detects(config):
            return family
    raise ValueError(f"no model family serves model_type {config.get('model_type')!r}")


def family_for_model(model: torch.nn.Module) -> type[Family]:
    for family in families():
        if family.owns(model):
            return family
    raise ValueError(f"no model family owns a {type(model).__name__}")
