"""One MoE layer's routed experts on CPU: the old per-expert loop (a `bincount(...).tolist()`
host read, then one pair of matmuls per expert that has tokens) against the grouped experts of
model/experts.py (one sort, `torch._grouped_mm` over the sorted tokens) and their dense
fallback (every expert over every token). Medians over `--reps` calls after a warm-up, from one
run; ratios are old / new (above 1: the new path is faster).

    python benchmarks/experts.py
    python benchmarks/experts.py --tokens 32,256 --dtype bfloat16 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from marble.model.experts import GroupedExperts, grouped_mm_runs

# name: (experts, top-k, hidden, expert width); the tiny checkpoints' shapes, then a reduced
# LLaDA2.0-mini (256 experts, top-8, hidden 2048, width 512: same top-k and width / hidden).
SHAPES = {
    "llada2-tiny": (8, 2, 64, 32),
    "gemma-tiny": (4, 2, 64, 32),
    "reduced-64e-top8-h512": (64, 8, 512, 128),
}


def old_loop(m: GroupedExperts, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
    """The MoE forward both families had before grouped experts."""
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    token = order // experts.shape[1]
    w = weights.flatten()[order].to(x.dtype)[:, None]
    counts = torch.bincount(flat, minlength=m.gate_up_proj.shape[0]).tolist()
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token[start : start + n]
        gate, up = F.linear(x[rows], m.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(m.activation(gate) * up, m.down_proj[e])
        out.index_add_(0, rows, y * w[start : start + n])
        start += n
    return out


def median_ms(fn: Callable[..., Tensor], reps: int, *call: object) -> float:
    for _ in range(3):
        fn(*call)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*call)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="32,256", help="tokens per layer call")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}")
    print(
        f"{'shape':<24}{'tokens':>7}{'old ms':>9}{'grouped':>9}{'dense':>9}"
        f"{'old/grouped':>13}{'old/dense':>11}{'max|d|':>10}"
    )
    for name, (e, k, h, i) in SHAPES.items():
        torch.manual_seed(0)
        m = GroupedExperts(e, h, i).to(dtype)
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, h, dtype=dtype)
            weights, experts = torch.randn(n, e).softmax(-1).topk(k, dim=-1)
            with torch.no_grad():
                want = old_loop(m, x, weights, experts)
                grouped = grouped_mm_runs(x, h, i)
                delta = (m(x, weights, experts) - want).abs().max().item()
                routed = (x, weights, experts)
                old = median_ms(old_loop, args.reps, m, *routed)
                new = median_ms(m.run, args.reps, *routed, True) if grouped else float("nan")
                dense = median_ms(m.run, args.reps, *routed, False)
            print(
                f"{name:<24}{n:>7}{old:>9.3f}{new:>9.3f}{dense:>9.3f}"
                f"{old / new:>13.2f}{old / dense:>11.2f}{delta:>10.1e}"
            )


if __name__ == "__main__":
    main()
