"""DiffusionGemma speed on a random Gemma-4-shaped model small enough for 2 CPU cores.

The real layer pattern (five sliding-window layers, then one full layer), the real head
layout (sliding: 8 query heads over 4 KV heads; full: 1 shared K=V head of twice the width,
proportional partial RoPE), experts beside a dense MLP, softcapping, and one 256-token canvas
at the real sampler settings (48 steps, t 0.8 -> 0.4, entropy bound 0.1, stop when the argmax
held 1 step with mean entropy < 0.005), through `Engine.step()`. Random weights, so what the
sampler accepts per step says nothing about the real model; the costs do. Printed per batch:
tokens per decoder forward, generated tokens/s, median engine step time, median bare decoder
forward on the same shapes (self-conditioned), and their ratio.

    python benchmarks/diffusion_gemma.py                      # batch 1 and 8, ~3 min
    python benchmarks/diffusion_gemma.py --batches 1 --vocab 262144 --layers 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from same_work import scheduler_config

from marble.families.diffusion_gemma.config import DiffusionGemmaConfig
from marble.families.diffusion_gemma.model import DiffusionGemma
from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import Engine
from marble.scheduler.served_model import load_defaults

TINY = Path(__file__).resolve().parents[2] / "shared" / "reference" / "diffusiongemma-tiny"


def random_init(model: torch.nn.Module) -> torch.nn.Module:
    """Seeded random weights at a scale that keeps activations finite; norms and scales 1."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "scale" in name:
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, (1.0 / p.shape[-1]) ** 0.5)
    return model.eval()


def random_model(layers: int, hidden: int, vocab: int, canvas: int) -> DiffusionGemma:
    raw = json.loads((TINY / "config.json").read_text())
    text = raw["text_config"]
    text.update(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers,
        layer_types=[
            ("full_attention" if i % 6 == 5 else "sliding_attention") for i in range(layers)
        ],
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        num_global_key_value_heads=1,
        global_head_dim=hidden // 4,
        num_experts=16,
        top_k_experts=4,
        sliding_window=1024,
        max_position_embeddings=8192,
    )
    raw["canvas_length"] = canvas
    cfg = DiffusionGemmaConfig.from_json_dict(raw)
    return random_init(DiffusionGemma(cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768, help="real: 262144")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = random_model(args.layers, args.hidden, args.vocab, args.canvas)
    engine = Engine(model, TextTokenizer(TINY), scheduler_config(max_batch_size=64))
    real = load_defaults(TINY).replace(
        steps=48, max_tokens=args.canvas, block_length=args.canvas, ignore_eos=True
    )
    prompt = list(range(300, 332))  # 32 prompt tokens
    print(
        f"random DiffusionGemma: {args.layers} layers (5 sliding : 1 full), hidden {args.hidden}, "
        f"vocab {args.vocab}, canvas {args.canvas}; {args.threads} threads"
    )
    print(
        f"{'B':>3} {'tok/fwd':>8} {'tok/s':>8} {'step ms':>9} {'decode ms':>10} {'step/decode':>12}"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        for i in range(batch):
            engine.add(engine.make_request(prompt, real.replace(seed=i)))
        steps: list[float] = []
        decoded = 0
        start = time.perf_counter()
        while engine.has_unfinished():
            t0 = time.perf_counter()
            outs = engine.step()
            steps.append(time.perf_counter() - t0)
            decoded += sum(o.forwards.get("decode", 0) for o in outs)
        wall = time.perf_counter() - start
        # The bare decoder forward on the same shapes: canvases over prompt caches, fed back.
        cache = model.new_cache(batch)
        ids = torch.tensor([prompt] * batch)
        length = len(prompt)
        with torch.inference_mode():
            model.encode(ids, torch.arange(length).expand(batch, -1), cache)
            canvas = torch.randint(0, args.vocab, (batch, args.canvas))
            positions = torch.arange(length, length + args.canvas).expand(batch, -1)
            sc = model.decode(canvas, positions, cache)
            bare = []
            for _ in range(5):
                t0 = time.perf_counter()
                model.decode(canvas, positions, cache, sc)
                bare.append(time.perf_counter() - t0)
        step_ms = 1e3 * statistics.median(steps[1:] or steps)
        bare_ms = 1e3 * statistics.median(bare)
        print(
            f"{batch:3d} {batch * args.canvas / decoded:8.2f} {batch * args.canvas / wall:8.1f} "
            f"{step_ms:9.1f} {bare_ms:10.1f} {step_ms / bare_ms:12.2f}"
        )


if __name__ == "__main__":
    main()
