"""What a request asks for: `SamplingParams`, the one validation of its settings, and the
ceilings any request must stay under.

Every caller (HTTP bodies, the offline engine, checkpoint defaults) builds its settings here,
so each rule has one meaning and each refusal names its field (`InvalidParam.param`). No torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# "sequential" (the k masks from the first one on) is one block-causal family's rule alone.
REMASKING = ("low_confidence", "random", "margin", "entropy", "sequential")
# Ceilings on what any request may ask for, whatever the model. They keep every size derived
# from a request checkable in O(1) before anything proportional to it exists; the engine then
# bounds max_tokens by the model's context and top_k by its vocabulary.
MAX_TOKENS = 1 << 20
MAX_STEPS = 1 << 20
MAX_TOP_K = 1 << 24
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SEED_LIMIT = 1 << 63  # seeds are in [0, 2**63): torch generators take 64-bit seeds
DEFAULT_THRESHOLD = 0.9
# Denoising work a request may ask for, relative to what it decodes: at most this many
# forwards per decoded position (per block or canvas; each family's rule is in engine.py).
# A masked model's schedule never needs more than one; edit rounds and a uniform-state model's
# steps per canvas are what could ask for more.
MAX_FORWARDS_PER_POSITION = 3


class _Unset:
    """`threshold` not given: it then follows `steps` (see SamplingParams)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
# Names the reference implementations use for the same rules.
REMASKING_ALIASES = {"maskgit_plus": "low_confidence", "topk_margin": "margin"}
SCHEDULES = ("llada", "dream")
# KV cache (Fast-dLLM): none recomputes every position each step; at each block start one full
# forward keeps every position's keys and values, then "prefix" recomputes the current block
# onward against the kept prefix, "dual" only the current block against everything kept.
CACHES = ("none", "prefix", "dual")

# Fields whose value must lie in a range: (low, high, whether low itself is excluded). Read by
# the checks below and by the HTTP layer's OpenAPI schema, which documents the same bounds.
RANGES: dict[str, tuple[float, float, bool]] = {
    "max_tokens": (1, MAX_TOKENS, False),
    "steps": (1, MAX_STEPS, False),
    "block_length": (1, MAX_TOKENS, False),
    "threshold": (0.0, 1.0, False),
    "temperature": (0.0, 100.0, False),
    "top_k": (0, MAX_TOP_K, False),
    "top_p": (0.0, 1.0, True),
    "cfg_scale": (0.0, 100.0, False),
    "seed": (0, SEED_LIMIT - 1, False),
    "entropy_bound": (0.0, 1e6, False),
    "t_min": (0.0, 100.0, False),
    "t_max": (0.0, 100.0, True),
    "stability_threshold": (0, 64, False),
    "confidence_threshold": (0.0, 1e6, False),
    "editing_threshold": (0.0, 1.0, False),
    "max_post_steps": (0, 1024, False),
    "num_to_transfer": (1, MAX_TOKENS, False),
    "verify_threshold": (0.0, 1.0, False),
}
INT_FIELDS = (
    "max_tokens",
    "steps",
    "block_length",
    "top_k",
    "seed",
    "stability_threshold",
    "max_post_steps",
    "num_to_transfer",
)


class InvalidParam(ValueError):
    """A refused request field; `param` names it as the client wrote it."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """Per-request denoising settings; an invalid value raises `InvalidParam` naming its field.

    Defaults: confidence-threshold parallel decoding (0.9) inside semi-autoregressive blocks
    of 32, greedy (temperature 0), with the dual KV cache (Fast-dLLM's speed setting). One
    rule picks the commit rule, for every caller: `steps` given without `threshold` means the
    fixed-count schedule over that many forwards (here and in `replace`, which is how request
    fields are merged over serving defaults); an explicit `threshold` wins over `steps`;
    `threshold=None` with `steps=None` is one token per step. `block_length=None` denoises the
    whole generated region as one block. `remasking` "sequential" (the block's first masks,
    in order) is read by one block-causal family; the others refuse it. `token_healing` moves a text
    prompt's trailing whitespace token into the canvas (see `marble.scheduler.healing`).
    `skip_special_tokens` False keeps special tokens (other than the one that ends the text)
    in the output text, as a tool-call parser needs them. `prefix_cache` False keeps a
    request out of the prefix cache: it neither takes blocks from it nor leaves any.
    `cache` picks the KV cache (CACHES).

    Uniform-state models read `steps` as their denoising steps per canvas and
    the five fields after `cache`: the entropy budget of one step's accepted positions, the
    temperature schedule from `t_max` (first step) down towards `t_min`, and the stop rule (a
    canvas ends once its argmax held for `stability_threshold` steps and its mean entropy is
    below `confidence_threshold`). Their defaults are their checkpoint's generation config;
    masked models refuse them (a family refuses every field it does not read: `Family.fields`).

    Self-correction. Block-causal masked models trained to edit replace a filled
    position of the current block when its argmax differs and is more likely than
    `editing_threshold` (None: no edits), for up to `max_post_steps` mask-free rounds after
    the block fills; while masks remain, `num_to_transfer` masks commit when fewer pass the
    threshold. Full-attention masked models may instead verify:
    a token committed earlier in the current block whose probability falls below
    `verify_threshold` is masked again (None: off).
    """

    max_tokens: int = 128
    steps: int | None = None
    block_length: int | None = 32
    threshold: float | None = UNSET
    remasking: str = "low_confidence"
    schedule: str = "llada"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    prefix_cache: bool = True
    token_healing: bool = False
    cache: str = "dual"
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    editing_threshold: float | None = None
    max_post_steps: int = 16
    num_to_transfer: int = 1
    verify_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.threshold is UNSET:
            threshold = None if self.steps is not None else DEFAULT_THRESHOLD
            object.__setattr__(self, "threshold", threshold)
        remasking = REMASKING_ALIASES.get(self.remasking, self.remasking)
        object.__setattr__(self, "remasking", remasking)
        object.__setattr__(self, "stop", tuple(self.stop))
        for name, (low, high, open_low) in RANGES.items():
            value = getattr(self, name)
            if value is not None and not _in_range(value, name in INT_FIELDS, low, high, open_low):
                raise InvalidParam(name, _range_message(name, low, high, open_low))
        if remasking not in REMASKING:
            raise InvalidParam(
                "remasking", f"remasking must be one of {REMASKING + tuple(REMASKING_ALIASES)}"
            )
        if self.schedule not in SCHEDULES:
            raise InvalidParam("schedule", f"schedule must be one of {SCHEDULES}")
        if self.cache not in CACHES:
            raise InvalidParam("cache", f"cache must be one of {CACHES}")
        if self.t_min >= self.t_max:
            raise InvalidParam(
                "t_min", f"t_min ({self.t_min:g}) must be below t_max ({self.t_max:g})"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParam("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise InvalidParam("stop", f"stop strings must have 1 to {MAX_STOP_CHARS} characters")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Build from a mapping (an explicit None means "off" where a field allows it, e.g.
        `threshold`); unknown keys raise."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown sampling parameters: {unknown}")
        return cls(**values)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (what `from_dict` reads back)."""
        return {**dataclasses.asdict(self), "stop": list(self.stop)}

    def replace(self, **changes: Any) -> SamplingParams:
        """These settings with `changes` over them; `steps` given without `threshold` selects
        the fixed-count rule, as in the constructor."""
        if changes.get("steps") is not None and "threshold" not in changes:
            changes["threshold"] = None
        return dataclasses.replace(self, **changes)


def _in_range(value: Any, integer: bool, low: float, high: float, open_low: bool) -> bool:
    """A number (an int where `integer`; never a bool) within the range: checked before any
    size is derived from it."""
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        return False
    return (low < value if open_low else low <= value) and value <= high


def _range_message(name: str, low: float, high: float, open_low: bool) -> str:
    if name == "seed":
        return "seed must be in [0, 2**63)"
    if name == "top_k":
        return f"top_k must be in [0, {high}] (0: off)"
    if open_low:
        return f"{name} must be in ({low:g}, {high:g}]"
    if name in INT_FIELDS:
        return f"{name} must be in [{low}, {high}]"
    return f"{name} must be between {low:g} and {high:g}"
