"""Bytes of cached keys and values copied per engine step, and the step's time, per family
(LLaDA2, SDAR, DiffusionGemma, and the masked family: LLaDA with the dual cache) on random
models built from the tiny reference configs at wider shapes, `--batch` rows with
`--prompt`-token prompts (`--mixed`: a spread of lengths up to it, rows in several slot
stores) in steady state (past every prefill; the masked rows between block starts), and in
the first step, which admits every row at once (its stores grow then).

Copies are counted by a torch dispatch mode: the output bytes of copying ops (cat, stack, pad,
gather, copy_, clone) shaped like keys or values ([B, Hkv, S, Dh], or one row's [Hkv, S, Dh])
with S longer than one window, so it measures any version of the code. Each measurement runs
in a fresh process; `--before DIR` alternates it with the same measurement on another tree (DIR
holds a `marble` package, e.g. an export of HEAD), `--repeats` times, and prints both (fastest
step of each) and their ratios.

    python benchmarks/kv_copies.py
    python benchmarks/kv_copies.py --before /tmp/before_h3pkg --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY = {
    "llada2": REFERENCE / "llada2-tiny",
    "sdar": REFERENCE / "sdar-tiny",
    "diffusion_gemma": REFERENCE / "diffusiongemma-tiny",
    "masked": REFERENCE / "llada-tiny",
}
COPIES = {"cat", "stack", "copy_", "constant_pad_nd", "index", "index_select", "clone", "_to_copy"}
# Ops whose input is the K/V-shaped one (a GQA repeat writes [B, Hq, S, Dh]).
FROM_INPUT = {"copy_", "repeat_interleave"}


class KVCopies(TorchDispatchMode):
    """Bytes written by copying ops whose output is shaped like keys/values longer than
    `window` positions (the fresh window's own keys are not cached ones)."""

    def __init__(self, shapes: set[tuple[int, int]], window: int) -> None:
        super().__init__()
        self.shapes, self.window = shapes, window
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in COPIES | FROM_INPUT:
            t = args[0] if name in FROM_INPUT else out
            # 3-D: one row's [Hkv, S, Dh]; 5-D: a GQA repeat [B, Hkv, rep, S, Dh].
            heads = {3: 0, 4: 1, 5: 1}.get(t.dim()) if isinstance(t, torch.Tensor) else None
            if (
                heads is not None
                and (t.shape[heads], t.shape[-1]) in self.shapes
                and t.shape[-2] > self.window
            ):
                written = out if name == "repeat_interleave" else t
                self.bytes += written.numel() * written.element_size()
        return out


def _wider(raw: dict, args: argparse.Namespace) -> dict:
    raw = dict(raw)
    heads, kv = args.heads, args.kv_heads
    raw.update(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=args.hidden // heads,
        max_position_embeddings=8192,
    )
    return raw


def build(family: str, args: argparse.Namespace):  # noqa: ANN201
    """An engine over a random model of `family` at the requested widths."""
    from same_work import scheduler_config

    from marble.scheduler.engine import Engine

    tiny = Engine.from_pretrained(TINY[family], progress=False)
    raw = json.loads((TINY[family] / "config.json").read_text())
    if family == "llada2":
        from marble.families.llada2.config import LLaDA2Config
        from marble.families.llada2.model import LLaDA2

        raw = _wider(raw, args)
        raw.update(intermediate_size=2 * args.hidden, rotary_dim=args.hidden // args.heads // 2)
        model = LLaDA2(LLaDA2Config.from_json_dict(raw))
    elif family == "masked":
        import dataclasses

        from marble.families.masked.model import Denoiser

        cfg = tiny.model.cfg
        model = Denoiser(
            dataclasses.replace(
                cfg,
                d_model=args.hidden,
                n_layers=args.layers,
                n_heads=args.heads,
                n_kv_heads=args.kv_heads,
                mlp_hidden=2 * args.hidden,
                max_seq_len=8192,
            )
        )
    elif family == "sdar":
        from marble.families.sdar.config import SDARConfig
        from marble.families.sdar.model import SDAR

        model = SDAR(SDARConfig.from_json_dict(_wider(raw, args)))
    else:
        from marble.families.diffusion_gemma.config import DiffusionGemmaConfig
        from marble.families.diffusion_gemma.model import DiffusionGemma

        text = _wider(raw["text_config"], args)
        text.update(
            intermediate_size=2 * args.hidden,
            num_global_key_value_heads=1,
            global_head_dim=2 * args.hidden // args.heads,
            sliding_window=1024,
            layer_types=[
                "full_attention" if i % 6 == 5 else "sliding_attention" for i in range(args.layers)
            ],
        )
        raw = dict(raw, text_config=text, canvas_length=args.block)
        model = DiffusionGemma(DiffusionGemmaConfig.from_json_dict(raw))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, (1.0 / p.shape[-1]) ** 0.5)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    config = scheduler_config(max_batch_size=64, max_batch_tokens=1 << 20, max_kv_bytes=16 << 30)
    return Engine(model.eval(), tiny.tokenizer, config, tiny.defaults)


def kv_shapes(model: torch.nn.Module) -> set[tuple[int, int]]:
    shapes = set()
    for m in model.modules():
        for heads, dim in (
            ("n_kv", "head_dim"),
            ("num_key_value_heads", "head_dim"),
            ("n_kv_heads", "head_dim"),
        ):
            if hasattr(m, heads) and hasattr(m, dim) and isinstance(getattr(m, heads), int):
                shapes.add((getattr(m, heads), getattr(m, dim)))
    if hasattr(model, "kv_heads"):
        shapes.add((model.kv_heads, model.head_dim))
    return shapes


def measure(family: str, args: argparse.Namespace) -> dict[str, float]:
    engine = build(family, args)
    params = engine.defaults.replace(
        max_tokens=args.gen, block_length=args.block, ignore_eos=True, temperature=0.9
    )
    if family == "masked":
        # Fixed steps, one token each: every row starts its blocks in the same step, so a
        # measured step past the warmup is a cached one for all of them.
        params = params.replace(cache="dual", threshold=None, steps=args.gen)
    if family == "diffusion_gemma":
        # The most steps a canvas may take, and no early stop: the measured steps all decode.
        params = params.replace(steps=3 * args.block, confidence_threshold=0.0)
    vocab = min(len(engine.tokenizer), 400)
    mask = engine.first.special.mask  # a masked family refuses it in a prompt
    for i in range(args.batch):
        g = torch.Generator().manual_seed(i)
        # --mixed: row i's prompt is (i + 1) / batch of --prompt, a spread of lengths.
        length = args.prompt * (i + 1) // args.batch if args.mixed else args.prompt
        prompt = torch.randint(10, vocab, (length,), generator=g).tolist()
        prompt = [t + 1 if t == mask else t for t in prompt]
        engine.add(engine.make_request(prompt, params.replace(seed=i)))
    first = KVCopies(kv_shapes(engine.model), args.block)
    with first:
        engine.step()
    for _ in range(args.warmup - 1):
        engine.step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    counter = KVCopies(kv_shapes(engine.model), args.block)
    with counter:
        outs = engine.step()
    if len(outs) != args.batch or any(o.finished for o in outs):
        raise SystemExit(f"{family}: rows finished during the measurement; raise --gen")
    return {"bytes": counter.bytes, "ms": 1000 * statistics.median(times), "first": first.bytes}


def run_all(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    return {family: measure(family, args) for family in args.families.split(",")}


def _measure_in(tree: str | None, family: str) -> dict[str, float]:
    """`measure` of one family in a fresh process, by the `marble` package in folder `tree`
    (None: this one), so both trees start alike."""
    before = sys.argv.index("--before") if "--before" in sys.argv else None
    argv = [
        a for i, a in enumerate(sys.argv[1:], 1) if before is None or i not in (before, before + 1)
    ]
    argv = [*argv, "--families", family, "--repeats", "1", "--json"]
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree
    proc = subprocess.run(
        [sys.executable, __file__, *argv], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])[family]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="llada2,sdar,diffusion_gemma,masked")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument(
        "--mixed", action="store_true", help="prompts from --prompt / batch up to --prompt"
    )
    parser.add_argument("--block", type=int, default=32, help="block length / DG canvas")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="e.g. bfloat16 on a GPU")
    parser.add_argument("--before", help="a folder holding another tree's `marble` package")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per tree")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps(run_all(args)))
        return
    # Per family, the two trees alternate `--repeats` times; the fastest step of each counts
    # (a shared machine's load only ever adds time).
    after: dict[str, dict[str, float]] = {}
    before: dict[str, dict[str, float]] = {}
    for family in args.families.split(","):
        for _ in range(args.repeats):
            now = _measure_in(None, family)
            after[family] = min(after.get(family, now), now, key=lambda m: m["ms"])
            if args.before:
                old = _measure_in(args.before, family)
                before[family] = min(before.get(family, old), old, key=lambda m: m["ms"])
    print(
        f"batch {args.batch}, prompt {args.prompt}{' (mixed)' * args.mixed}, "
        f"block/canvas {args.block}, "
        f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads over "
        f"{args.kv_heads} KV heads; {args.device} {args.dtype}, {args.threads} threads"
    )
    print(f"{'family':>16} {'KV bytes copied/step':>22} {'step ms':>9} {'first step':>14}", end="")
    print(
        f" {'before bytes':>14} {'before ms':>10} {'before first':>14} {'bytes ratio':>12}"
        f" {'ms ratio':>9}" * bool(before)
    )
    for family, now in after.items():
        line = f"{family:>16} {now['bytes']:>22,} {now['ms']:>9.1f} {now['first']:>14,}"
        if before:
            old = before[family]
            ratio = now["bytes"] / old["bytes"] if old["bytes"] else float("nan")
            line += f" {old['bytes']:>14,} {old['ms']:>10.1f} {old['first']:>14,} {ratio:>12.3f}"
            line += f" {now['ms'] / old['ms']:>9.2f}"
        print(line)


if __name__ == "__main__":
    main()
