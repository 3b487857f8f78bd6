"""Grouped experts (model/experts.py): equal to a plain loop over experts on random weights
(0, 1 and many tokens, idle experts, float32 and bfloat16, the grouped GEMM and the dense
fallback), no operation that would sync a GPU with the host in either family's MoE block, one
compiled graph, and the per-expert checkpoint names kept for LLaDA2's experts."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from marble.families.diffusion_gemma.config import SLIDING, DiffusionGemmaConfig
from marble.families.diffusion_gemma.model import DecoderLayer, gelu_tanh
from marble.families.llada2.config import LLaDA2Config
from marble.families.llada2.loader import load_llada2
from marble.families.llada2.model import MoE
from marble.model.experts import GroupedExperts, ListedExperts
from marble.model.layers import GatedMLP
from marble.model.loader import CheckpointError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
LLADA2_DIR = REFERENCE / "llada2-tiny"
GEMMA_DIR = REFERENCE / "diffusiongemma-tiny"
# Largest |grouped - loop| / max |loop| measured over 60 seeds x 5 token counts, 16 experts
# top-8: float32 2.2e-7 (grouped GEMM) and 5.2e-7 (dense); bfloat16 0 for both (the loop
# sums in float32 and rounds once, as the slot sum does). Bounds: ~20x the float32 noise and
# two bfloat16 ulps, for other CPUs' kernels.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
# Compiled against eager: Inductor keeps act(gate) * up in float32 where eager rounds it to
# bfloat16; measured up to 8.7e-3 in bfloat16 over 8 seeds.
COMPILED_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
E, H, INNER, K = 8, 64, 32, 2
PATHS = [False, True] if hasattr(torch, "_grouped_mm") else [False]  # dense, grouped GEMM
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "bincount", "is_nonzero", "masked_select"}
SYNCING_METHODS = {"tolist", "item", "cpu", "numpy", "__bool__"}


def _loop(x: Tensor, weights: Tensor, experts: Tensor, m: GroupedExperts) -> Tensor:
    """The reference: each expert in turn over the tokens that chose it, summed in float32."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in range(m.gate_up_proj.shape[0]):
        token, slot = (experts == e).nonzero(as_tuple=True)
        if len(token) == 0:
            continue
        gate, up = F.linear(x[token], m.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(m.activation(gate) * up, m.down_proj[e])
        out.index_add_(0, token, (y * weights[token, slot, None].to(x.dtype)).float())
    return out.to(x.dtype)


def _routing(n: int, idle: bool, experts: int = E, k: int = K) -> tuple[Tensor, Tensor]:
    """Top-k weights and experts for n tokens; `idle`: the last two experts are never chosen."""
    logits = torch.randn(n, experts)
    if idle:
        logits[:, -2:] = float("-inf")
    return logits.softmax(-1).topk(k, dim=-1)


def _relative(got: Tensor, want: Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("grouped", PATHS, ids=["dense", "grouped"][: len(PATHS)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [0, 1, 7, 300])
@pytest.mark.parametrize("idle", [False, True], ids=["spread", "idle-experts"])
@pytest.mark.parametrize("experts_k", [(E, K), (16, 8)], ids=["8e-top2", "16e-top8"])
@torch.no_grad()
def test_grouped_equals_a_loop_over_experts(
    grouped: bool, dtype: torch.dtype, tokens: int, idle: bool, experts_k: tuple[int, int]
):
    torch.manual_seed(tokens)
    m = GroupedExperts(experts_k[0], H, INNER, gelu_tanh).to(dtype)
    x = torch.randn(tokens, H, dtype=dtype)
    weights, experts = _routing(tokens, idle, *experts_k)
    got = m.run(x, weights, experts, grouped)
    want = _loop(x, weights, experts, m)
    assert got.shape == want.shape == (tokens, H) and got.dtype == dtype
    assert not idle or len(experts.unique()) < experts_k[0]
    if tokens:
        assert _relative(got, want) <= TOLERANCE[dtype]


@torch.no_grad()
def test_listed_experts_are_a_module_list_of_gated_mlps():
    """Loaded from the per-expert names, they compute what the ModuleList of GatedMLPs did,
    and give those names back."""
    torch.manual_seed(0)
    mlps = nn.ModuleList(GatedMLP(H, INNER) for _ in range(E))
    listed = ListedExperts(E, H, INNER)
    listed.load_state_dict(mlps.state_dict())
    assert listed.state_dict().keys() == mlps.state_dict().keys()
    for name, value in mlps.state_dict().items():
        assert torch.equal(listed.state_dict()[name], value), name
    x = torch.randn(40, H)
    weights, experts = _routing(40, idle=False)
    want = torch.zeros_like(x)
    for n in range(40):
        for slot in range(K):
            want[n] += weights[n, slot] * mlps[int(experts[n, slot])](x[n])
    for grouped in PATHS:
        assert _relative(listed.run(x, weights, experts, grouped), want) <= 1e-5


def test_a_missing_expert_part_is_named(tmp_path: Path):
    if not LLADA2_DIR.exists():
        pytest.skip(f"reference data {LLADA2_DIR} is absent")
    tensors = load_file(str(LLADA2_DIR / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    for name in ("config.json", "generation_config.json"):
        shutil.copy(LLADA2_DIR / name, tmp_path / name)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_llada2(tmp_path)


class _SyncingOps(TorchDispatchMode):
    """Counts aten operations that make a CUDA device wait for, or report to, the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        indices = args[1] if name == "index" and len(args) > 1 else ()
        if name in SYNCING_OPS or any(
            isinstance(i, Tensor) and i.dtype == torch.bool for i in indices
        ):
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


class _SyncingMethods(TorchFunctionMode):
    """Counts Tensor methods that copy to the host (`tolist`, `item`, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", "")
        if name in SYNCING_METHODS:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _count_syncs() -> Iterator[Counter[str]]:
    seen: Counter[str] = Counter()
    with _SyncingMethods() as methods, _SyncingOps() as ops:
        yield seen
    seen.update(methods.seen)
    seen.update(ops.seen)


def _llada2_block() -> tuple[nn.Module, Callable[[Tensor], Tensor], int]:
    cfg = LLaDA2Config.from_file(LLADA2_DIR / "config.json")
    block = MoE(cfg)
    return block, block, cfg.hidden_size


def _gemma_block() -> tuple[nn.Module, Callable[[Tensor], Tensor], int]:
    """DiffusionGemma's MoE branch as its DecoderLayer runs it: router, pre-norm, experts."""
    cfg = DiffusionGemmaConfig.from_json_dict(json.loads((GEMMA_DIR / "config.json").read_text()))
    layer = DecoderLayer(cfg, SLIDING)

    def forward(x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = layer.router(flat)
        return layer.experts(layer.pre_feedforward_layernorm_2(flat), weights, experts)

    return layer, forward, cfg.hidden_size


@pytest.mark.parametrize("build", [_llada2_block, _gemma_block], ids=["llada2", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_moe_blocks_never_sync_with_the_host(build: Callable, dtype: torch.dtype):
    if not (LLADA2_DIR.exists() and GEMMA_DIR.exists()):
        pytest.skip("reference configs are absent")
    torch.manual_seed(0)
    module, forward, hidden = build()
    module.to(dtype)
    for p in module.parameters():
        p.normal_(0.0, 0.5)
    for batch, length in ((1, 1), (3, 16)):
        x = torch.randn(batch, length, hidden, dtype=dtype)
        with _count_syncs() as seen:
            out = forward(x)
        assert out.shape[-1] == x.shape[-1] and torch.isfinite(out).all()
        assert not seen, f"host syncs in the MoE forward: {dict(seen)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_compiles_to_one_graph(dtype: torch.dtype):
    """fullgraph=True fails on any graph break (a host read, a loop over data)."""
    torch.manual_seed(0)
    m = GroupedExperts(E, H, INNER).to(dtype)
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    x = torch.randn(24, H, dtype=dtype)
    weights, experts = _routing(24, idle=True)
    got, want = compiled(x, weights, experts), m(x, weights, experts)
    assert _relative(got, want) <= COMPILED_TOLERANCE[dtype]
