"""The prefix cache on chat traffic that shares a long system prompt: 32 chat requests, each
the same system prompt (at least 1,500 tokens) and its own question, arriving one per engine
step on an SDAR-shaped model (block-causal, random weights at `--hidden` x `--layers`, context
4,096; `--family gemma`: DiffusionGemma-shaped, a causal encoder with sliding layers of 1,024
and canvases of `--block-length`), with the cache off and on, in one run. Prints time to first
step (p50, p99), total tokens/s, the positions each request's first step computed (where its
prompt is computed, whatever the family's forward), and the most KV bytes held at once
(the rows' slots plus the cache's blocks), then on / off as ratios.

    python benchmarks/prefix_cache.py
    python benchmarks/prefix_cache.py --layers 8 --hidden 512 --requests 16
    python benchmarks/prefix_cache.py --family gemma --layers 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from step_profile import REFERENCE, shaped_model

from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.scheduler import SchedulerConfig

WORDS = "the river carries light from the hills down to the quiet town below".split()


@dataclass
class Result:
    first_step_s: list[float]
    wall_s: float
    tokens: int
    first_step_positions: int
    peak_kv_bytes: int
    prompt_tokens: int


def system_prompt(tokenizer: TextTokenizer, tokens: int) -> str:
    """Text of at least `tokens` tokens."""
    text, i = "You are the archivist of a small town. Facts you know:", 0
    while len(tokenizer.encode(text)) < tokens:
        text += f" {WORDS[i % len(WORDS)]}"
        i += 1
    return text


def run(engine: Engine, prompts: list[str] | list[list[int]], params: SamplingParams) -> Result:
    """Request i is added before step i (one arrival a step), then the engine runs dry."""
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    first_positions: dict[str, int] = {}
    tokens, peak = 0, 0
    pending = list(prompts)
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        if pending:
            request = engine.make_request(pending.pop(0), params)
            engine.add(request)
            added[request.request_id] = time.perf_counter()
        for out in engine.step():
            now = time.perf_counter()
            if out.request_id not in first:
                first[out.request_id] = now - added[out.request_id]
                first_positions[out.request_id] = out.positions
            if out.finished:
                tokens += out.completion_tokens
        stats = engine.last_stats
        if stats is not None:
            peak = max(peak, stats.cache_bytes + stats.prefix_bytes)
    wall = time.perf_counter() - start
    tokenizer = engine.first.tokenizer
    prompt_tokens = sum(len(tokenizer.encode(p) if isinstance(p, str) else p) for p in prompts)
    positions = sum(first_positions.values())
    return Result(list(first.values()), wall, tokens, positions, peak, prompt_tokens)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sdar", "gemma"), default="sdar")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--system-tokens", type=int, default=1536)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--block-length", type=int, default=16, help="SDAR's block, DiffusionGemma's canvas"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gemma = args.family == "gemma"
    tokenizer = TextTokenizer(REFERENCE / ("diffusiongemma-tiny" if gemma else "sdar-tiny"))
    model = shaped_model(args.family, args.layers, args.hidden, len(tokenizer), args.block_length)
    system = system_prompt(tokenizer, args.system_tokens)
    prompts = [
        tokenizer.render_chat(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Question {i}: what happened in year {1900 + i}?"},
            ]
        )
        for i in range(args.requests)
    ]
    params = SamplingParams(
        max_tokens=args.max_tokens,
        block_length=args.block_length,
        steps=args.block_length // 2,
        ignore_eos=True,
        seed=0,
    )
    print(
        f"{'DiffusionGemma' if gemma else 'SDAR'}-shaped: {args.layers} layers x {args.hidden}, "
        f"vocabulary {len(tokenizer)}, "
        f"{args.requests} chat requests, system prompt {len(tokenizer.encode(system))} tokens, "
        f"prompts {len(tokenizer.encode(prompts[0]))} tokens, max_tokens {args.max_tokens}, "
        f"{'canvases' if gemma else 'blocks'} of {args.block_length}, "
        f"{torch.get_num_threads()} torch threads"
    )
    results = {}
    for on in (False, True):
        config = SchedulerConfig(max_batch_size=8, max_kv_bytes=4 << 30, prefix_cache=on)
        engine = Engine(model, tokenizer, config)
        run(engine, prompts[:2], params)  # warm-up: the first forwards' allocations
        engine = Engine(model, tokenizer, config)
        results[on] = run(engine, prompts, params)
    header = ("first step p50", "p99", "tok/s", "1st-step pos", "peak KV MB")
    print(f"{'':<8}" + "".join(f"{h:>{w}}" for h, w in zip(header, (16, 10, 10, 14, 12))))
    for on, r in results.items():
        print(
            f"{'on' if on else 'off':<8}{statistics.median(r.first_step_s) * 1e3:>13.0f} ms"
            f"{p99(r.first_step_s) * 1e3:>7.0f} ms{r.tokens / r.wall_s:>10.1f}"
            f"{r.first_step_positions:>14}{r.peak_kv_bytes / 1e6:>12.1f}"
        )
    off, on_ = results[False], results[True]
    print(
        "on / off: first step p50 "
        f"{statistics.median(on_.first_step_s) / statistics.median(off.first_step_s):.2f}x, "
        f"p99 {p99(on_.first_step_s) / p99(off.first_step_s):.2f}x, "
        f"tok/s {(on_.tokens / on_.wall_s) / (off.tokens / off.wall_s):.2f}x, "
        f"first-step positions "
        f"{on_.first_step_positions / max(off.first_step_positions, 1):.3f}x, "
        f"peak KV bytes {on_.peak_kv_bytes / off.peak_kv_bytes:.2f}x"
    )


if __name__ == "__main__":
    main()
