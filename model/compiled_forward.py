"""A forward run through `torch.compile(fullgraph=True, dynamic=False)`, CUDA graphs on a GPU,
over padded shape buckets: callers pad each varying dimension to `bucket(n)` (a power of two),
so it compiles once per bucket signature, at most `shape_bound` times. Also the padding
helpers. Knows nothing of families, caches or requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

LENGTH_FLOOR = 16  # the smallest bucket a length dimension is padded to


def bucket(n: int, floor: int = 1) -> int:
    """The power of two at least max(n, floor)."""
    size = max(n, floor, 1)
    return 1 << (size - 1).bit_length()


def shape_bound(max_batch: int, max_lengths: Sequence[int], variants: int = 1) -> int:
    """The most compiles a forward can take: batch buckets times each length dimension's
    buckets (lengths floored at LENGTH_FLOOR), times its graph variants."""
    count = variants * (bucket(max_batch).bit_length())
    for length in max_lengths:
        count *= bucket(length, LENGTH_FLOOR).bit_length() - LENGTH_FLOOR.bit_length() + 1
    return count


def pad_to(x: Tensor, shape: Sequence[int], value: float | bool = 0, left: int = -1) -> Tensor:
    """x in a new tensor of `shape` (each dimension at least x's), x at the start of every
    dimension, except at the end of dimension `left` when given; `value` elsewhere."""
    out = x.new_full(tuple(shape), value)
    index = []
    for d, n in enumerate(x.shape):
        index.append(slice(shape[d] - n, shape[d]) if d == left else slice(0, n))
    out[tuple(index)] = x
    return out


class CompiledForward:
    """`fn` compiled with no graph break allowed and static shapes; counts the distinct input
    signatures it was called with (each one compile: the caller keeps them to buckets)."""

    def __init__(
        self, fn: Callable[..., Any], device: torch.device, backend: str, bound: int
    ) -> None:
        # CUDA graphs replay fixed buffers: only inductor captures them, and only on a GPU.
        self.graphs = device.type == "cuda" and backend == "inductor"
        mode = "reduce-overhead" if self.graphs else None
        self.fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode=mode)
        self.bound = bound
        self.signatures: set[tuple[Any, ...]] = set()
        # Dynamo keeps compiles per code object; past its limit it would fall back to eager.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, bound)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * bound)

    @property
    def compiles(self) -> int:
        """Signatures seen so far: the compiles this forward has taken."""
        return len(self.signatures)

    def __call__(self, *args: Any, key: Any = None) -> Any:
        """fn(*args); `key` adds what else its compile depends on (e.g. an int an argument's
        attribute holds), for the count."""
        self.signatures.add((_signature(args), key))
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
            # A replay overwrites its outputs: the caller may keep them past the next step.
            return _tree_clone(self.fn(*args))
        return self.fn(*args)


def _signature(value: Any) -> Any:
    if isinstance(value, Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, list | tuple):
        return tuple(_signature(v) for v in value)
    return value if isinstance(value, int | float | bool | str | None) else type(value)


def _tree_clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list | tuple):
        return type(value)(_tree_clone(v) for v in value)
    return value
