"""Where one engine step's time goes, per batch size: before the forward (scheduling, padding,
stacking cached rows' keys and values), the model's calls (the transformer forward and the
LM-head matmul), and after them (the step's tail: sampling, confidence, commit rules,
bookkeeping); and step / model, the step over its bare model calls.

Models: `llada-vocab` (LLaDA-shaped: masked, LLaDA-8B's vocabulary, 32 layers, d_model 512),
the other masked presets (`tiny`, ...), `embedded` (Marble's own), and random models shaped
like LLaDA2 (block-causal, experts), SDAR (block-causal, dense) and DiffusionGemma (uniform
canvas, sliding and full layers, experts) at `--hidden` and `--layers`, with each family's
real vocabulary (DiffusionGemma scores its whole `--canvas` every step, so its default
vocabulary is smaller; real: 262,144). Targets: step / model <= 1.2; the work after the
LM-head matmul at most 0.3x that matmul. Medians over `--steps` steps after a warm-up, one
token committed per row per step where the family has a schedule; each part is timed around
its call (with a device sync on GPU).

    python benchmarks/step_profile.py                        # llada-vocab, batch 1 and 8
    python benchmarks/step_profile.py --model llada2 --batches 1,8
    python benchmarks/step_profile.py --model all            # every family, one after another
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from cache import engine_for
from diffusion_gemma import random_init
from diffusion_gemma import random_model as gemma_model
from same_work import scheduler_config

from marble.families.llada2.config import LLaDA2Config
from marble.families.llada2.model import LLaDA2
from marble.families.sdar.config import SDARConfig
from marble.families.sdar.model import SDAR
from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODELS = ("llada-vocab", "llada2", "sdar", "gemma")
VOCAB = {"llada2": 157184, "sdar": 151936, "gemma": 32768}
CALLS = ("forward", "forward_cached", "forward_slots", "decode", "encode")  # model calls
HEAD = "project"


def shaped_model(name: str, layers: int, hidden: int, vocab: int, canvas: int) -> torch.nn.Module:
    """A random model of family `name` at the given widths, built from its tiny checkpoint's
    config (attention heads of 64)."""
    if name == "gemma":
        return gemma_model(layers, hidden, vocab, canvas)
    folder = "llada2-tiny" if name == "llada2" else "sdar-tiny"
    raw = json.loads((REFERENCE / folder / "config.json").read_text())
    raw.update(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
        max_position_embeddings=4096,
    )
    if name == "llada2":
        raw.update(
            intermediate_size=2 * hidden,
            moe_intermediate_size=hidden // 2,
            num_experts=16,
            num_experts_per_tok=4,
        )
        return random_init(LLaDA2(LLaDA2Config.from_json_dict(raw)))
    raw.update(intermediate_size=3 * hidden)
    return random_init(SDAR(SDARConfig.from_json_dict(raw)))


def build(args: argparse.Namespace, name: str) -> tuple[Engine, SamplingParams]:
    """The engine for `name` and the settings its requests take."""
    if name not in VOCAB:  # a masked preset (families/masked/config.py) or `embedded`
        engine = engine_for(name, args.threads)
        params = SamplingParams(
            max_tokens=args.gen, block_length=32, steps=args.gen, ignore_eos=True, cache=args.cache
        )
        return engine, params
    torch.set_num_threads(args.threads)
    vocab = args.vocab or VOCAB[name]
    model = shaped_model(name, args.layers, args.hidden, vocab, args.canvas)
    folder = {"llada2": "llada2-tiny", "sdar": "sdar-tiny", "gemma": "diffusiongemma-tiny"}[name]
    config = scheduler_config(max_batch_size=64, max_batch_tokens=1 << 20, max_kv_bytes=8 << 30)
    engine = Engine(model, TextTokenizer(REFERENCE / folder), config)
    if hasattr(engine.runner, "vocab_limit"):
        # The tiny tokenizer is small; score every id as the real vocabulary would.
        engine.runner.vocab_limit = vocab
    common = dict(max_tokens=args.gen, ignore_eos=True, seed=0)
    if name == "llada2":  # threshold 1: one token a step (the top one), editing off
        params = SamplingParams(block_length=32, threshold=1.0, **common)
    elif name == "sdar":
        params = SamplingParams(block_length=32, steps=32, **common)
    else:  # one canvas at the real sampler settings (t 0.8 -> 0.4, entropy bound 0.1)
        common.update(max_tokens=args.canvas, block_length=args.canvas)
        params = SamplingParams(
            steps=48, t_min=0.4, t_max=0.8, entropy_bound=0.1, temperature=1.0, **common
        )
    return engine, params


class Clock:
    """Times the model's outermost calls (a call made inside another is part of it): the
    LM head (`project`) apart from the rest, and when the last one ended."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.depth = 0
        self.model = 0.0
        self.head = 0.0
        self.last_end = 0.0

    def clear(self) -> None:
        self.model = self.head = self.last_end = 0.0

    def wrap(self, fn: Callable, head: bool) -> Callable:
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.sync()
            start = time.perf_counter()
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                self.sync()
                end = time.perf_counter()
                if head:
                    self.head += end - start
                else:
                    self.model += end - start
                self.last_end = end

        return timed


def profile(args: argparse.Namespace, name: str) -> None:
    engine, params = build(args, name)
    model = engine.model
    cuda = next(model.parameters()).is_cuda
    clock = Clock(torch.cuda.synchronize if cuda else (lambda: None))
    for call in (*CALLS, HEAD):
        if hasattr(model, call):
            setattr(model, call, clock.wrap(getattr(model, call), call == HEAD))
    shape = f", {args.layers} layers x {args.hidden}" if name in VOCAB else ""
    print(f"{name}{shape}, gen {args.gen}, {args.threads} threads")
    print(
        f"{'B':>3} {'step ms':>8} {'before':>8} {'forward':>8} {'lm_head':>8} {'after':>8} "
        f"{'after/head':>10} {'step/model':>10}"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        for i in range(batch):
            engine.add(engine.make_request([10 + i] * 32, params))
        rows = []
        for step in range(args.steps + 2):
            clock.clear()
            clock.sync()
            start = time.perf_counter()
            engine.step()
            clock.sync()
            end = time.perf_counter()
            if step >= 2:  # warm-up
                rows.append((end - start, clock.model, clock.head, end - clock.last_end))
        while engine.has_unfinished():
            for request_id in list(engine.requests):
                engine.abort(request_id)
            engine.step()
        step_s = statistics.median(r[0] for r in rows)
        fwd = statistics.median(r[1] for r in rows)
        hd = statistics.median(r[2] for r in rows)
        after = statistics.median(r[3] for r in rows)
        before = statistics.median(r[0] - r[1] - r[2] - r[3] for r in rows)
        ratio = statistics.median(r[0] / (r[1] + r[2]) for r in rows)
        per_head = f"{after / hd:10.2f}" if hd else f"{'-':>10}"  # head inside the forward
        print(
            f"{batch:3d} {1e3 * step_s:8.1f} {1e3 * before:8.1f} {1e3 * fwd:8.1f} "
            f"{1e3 * hd:8.1f} {1e3 * after:8.1f} {per_head} {ratio:10.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llada-vocab", help=f"{', '.join(MODELS)} or all")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--cache", default="dual", help="llada-vocab and embedded")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--layers", type=int, default=8, help="the shaped random models'")
    parser.add_argument("--hidden", type=int, default=512, help="the shaped random models'")
    parser.add_argument("--vocab", type=int, default=0, help="0: the family's own")
    parser.add_argument("--canvas", type=int, default=256, help="DiffusionGemma's")
    args = parser.parse_args()
    for name in MODELS if args.model == "all" else (args.model,):
        profile(args, name)


if __name__ == "__main__":
    main()
