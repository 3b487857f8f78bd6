"""Grouped experts: E gated MLPs stored stacked and run over tokens sorted by expert.

Owns the stacked layout (`gate_up_proj` [E, 2I, H] holding [gate ; up], `down_proj` [E, H, I])
and the routed forward: one sort, grouped matmuls (torch's grouped GEMM where it runs, a dense
batched fallback elsewhere), no host sync, no data-dependent shape, no loop over experts.
Knows nothing of routers, checkpoints' names or families.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PARTS = ("gate_proj", "up_proj", "down_proj")
Activation = Callable[[Tensor], Tensor]


def grouped_mm_runs(x: Tensor, hidden: int, inner: int) -> bool:
    """Whether `torch._grouped_mm` runs these experts' matmuls for x on its device without a
    host sync. Its kernels need 16-byte row strides; CUDA's sync-free path is bf16 on sm90+
    (older cards fall back to a loop that reads the offsets on the host); torch >= 2.9 has a
    CPU kernel for float32, bfloat16 and float16, but torch.compile's shape rule for the op
    accepts bf16 only."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if hidden * x.element_size() % 16 or inner * x.element_size() % 16:
        return False
    if x.device.type == "cuda":
        # get_device_properties, not get_device_capability: torch.compile folds it to a constant.
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_properties(x.device).major >= 9
    if x.device.type != "cpu":
        return False
    eager_only = (torch.float32, torch.float16)
    return x.dtype == torch.bfloat16 or (
        x.dtype in eager_only and not torch.compiler.is_compiling()
    )


def _grouped(rows: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor, act: Activation) -> Tensor:
    """rows [M, H] sorted by expert ids [M] -> each row through its expert [M, H]."""
    everyone = torch.arange(gate_up.shape[0], device=ids.device, dtype=ids.dtype)
    ends = torch.searchsorted(ids, everyone, right=True).to(torch.int32)  # group ends, on device
    gate, up = torch._grouped_mm(rows, gate_up.transpose(-2, -1), offs=ends).chunk(2, dim=-1)
    return torch._grouped_mm(act(gate) * up, down.transpose(-2, -1), offs=ends)


def _dense(
    x: Tensor, ids: Tensor, token: Tensor, gate_up: Tensor, down: Tensor, act: Activation
) -> Tensor:
    """Every expert over every token [E, N, .], then the routed (expert, token) pairs [M, H].
    Exact with static shapes (an expert gets at most one slot per token); E / k times the
    routed work, E * N * (3I + H) elements of scratch."""
    gate, up = torch.matmul(x, gate_up.transpose(-2, -1)).chunk(2, dim=-1)
    return torch.matmul(act(gate) * up, down.transpose(-2, -1))[ids, token]


class GroupedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden: int,
        inner: int,
        activation: Callable[[Tensor], Tensor] = F.silu,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inner))
        with torch.no_grad():  # nn.Linear's default init, per expert
            for weight in (self.gate_up_proj, self.down_proj):
                bound = 1 / math.sqrt(weight.shape[-1])
                weight.uniform_(-bound, bound)

    def expert_part(self, index: int, part: str) -> Tensor:
        """One expert's `gate_proj`, `up_proj` or `down_proj` weight as nn.Linear stores it
        (a view into the stacked weights)."""
        if part == "down_proj":
            return self.down_proj[index]
        start = PARTS.index(part) * self.inner
        return self.gate_up_proj[index, start : start + self.inner]

    def set_expert_part(self, index: int, part: str, value: Tensor) -> None:
        """Write one expert's part (see `expert_part`); a stacked weight still on the meta
        device (a model being loaded) is first made on value's device and dtype."""
        name = "down_proj" if part == "down_proj" else "gate_up_proj"
        stacked = getattr(self, name)
        if stacked.is_meta:
            made = torch.empty(stacked.shape, device=value.device, dtype=value.dtype)
            setattr(self, name, nn.Parameter(made, requires_grad=False))
        with torch.no_grad():
            self.expert_part(index, part).copy_(value)

    def forward(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """x [N, H], weights/experts [N, k] -> sum_k weights * expert_k(x) [N, H] in x's dtype."""
        grouped = grouped_mm_runs(x, x.shape[-1], self.inner)
        return self.run(x, weights, experts, grouped)

    def run(self, x: Tensor, weights: Tensor, experts: Tensor, grouped: bool) -> Tensor:
        """`forward` on the grouped GEMM (True) or the dense fallback (False)."""
        n, k = experts.shape
        ids, order = experts.flatten().sort(stable=True)
        token = order // k
        w = weights.flatten()[order].to(x.dtype)[:, None]
        gate_up, down, act = self.gate_up_proj, self.down_proj, self.activation
        if grouped:
            y = _grouped(x[token], ids, gate_up, down, act)
        else:
            y = _dense(x, ids, token, gate_up, down, act)
        # Back to (token, slot) order and a sum over slots, not index_add_: CUDA's index_add_
        # adds with atomics in a varying order, and seeded draws must repeat bit for bit.
        slots = torch.empty_like(y).index_copy_(0, order, y * w)
        return slots.view(n, k, x.shape[-1]).sum(1)


class ListedExperts(GroupedExperts):
    """Grouped experts whose `state_dict` and `load_state_dict` use the per-expert names of a
    ModuleList of gated MLPs (`{e}.gate_proj.weight`, `{e}.up_proj.weight`,
    `{e}.down_proj.weight`), as checkpoints that store experts one by one do."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_state_dict_post_hook(_split_experts)
        self.register_load_state_dict_pre_hook(_join_experts)

    def __len__(self) -> int:
        return self.gate_up_proj.shape[0]

    def listed_names(self) -> list[tuple[int, str]]:
        """(expert, part) in state_dict order."""
        return [(e, part) for e in range(len(self)) for part in PARTS]


def _split_experts(module: ListedExperts, state: dict, prefix: str, meta: object) -> None:
    del state[prefix + "gate_up_proj"], state[prefix + "down_proj"]
    for e, part in module.listed_names():
        state[f"{prefix}{e}.{part}.weight"] = module.expert_part(e, part)


def _join_experts(module: ListedExperts, state: dict, prefix: str, *rest: object) -> None:
    names = [f"{prefix}{e}.{part}.weight" for e, part in module.listed_names()]
    if all(name in state for name in names):
        rows = [state.pop(name) for name in names]
        experts = len(module)
        state[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat(rows[3 * e : 3 * e + 2]) for e in range(experts)]
        )
        state[prefix + "down_proj"] = torch.stack(rows[2::3])


_LISTED = re.compile(r"(.+)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def place_listed(model: nn.Module, name: str, value: Tensor) -> bool:
    """Write `value` under `name` if that names one expert's part in a `ListedExperts` of
    `model` (the loaders' placement for per-expert checkpoint tensors); False otherwise."""
    match = _LISTED.fullmatch(name)
    if match is None:
        return False
    try:
        module = model.get_submodule(match[1])
    except AttributeError:
        return False
    if not isinstance(module, ListedExperts) or int(match[2]) >= len(module):
        return False
    module.set_expert_part(int(match[2]), match[3], value)
    return True


def listed_layout(model: nn.Module) -> dict[str, torch.Size]:
    """Every tensor a checkpoint of `model` holds, by its state_dict's names (each
    `ListedExperts` as its per-expert parts)."""
    return {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}
