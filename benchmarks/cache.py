"""KV cache benchmark: none / prefix / dual at threshold 0.9 and at fixed steps, in process.

For each model, rule, generation length (block 32, up to the model's context) and batch size,
B requests of a 32-token prompt run together through `Engine.step()`; printed: generated
tokens/s, engine steps, canvas positions one row's forward computed, tokens per row-forward,
and the speed-up over `none` on the same row. Up to `--whole-up-to` tokens every request runs
to the end. Past it, only the first block is timed, and only for `none` and `dual`, whose
blocks all cost the same (the canvas does not grow; dual's queries are always one block);
`prefix`, whose queries shrink block by block, is left out there rather than mis-timed. Fixed
steps take `max_tokens / 2` steps (2 tokens per forward). The modes of one row run side by
side (one engine each over the same model) and take their steps in turn, each timed alone,
so the ratios compare the modes under the same machine conditions.

Models: `embedded` (Marble's own, context 256) and `llada-vocab` (random weights, LLaDA-8B's
126,464-token vocabulary and 32 layers, d_model 512, context 4096). `--chart docs/cache.png`
draws tokens/s against generation length at batch 1 (needs matplotlib).

    python benchmarks/cache.py                                  # ~20 min on 2 CPU cores
    python benchmarks/cache.py --models embedded --gens 64,128 --batches 1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from marble.families.masked.config import preset
from marble.families.masked.model import Denoiser
from marble.model.default import CHECKPOINT_DIR
from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.scheduler import SchedulerConfig

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "reference" / "llada-tiny"
MODES = ("none", "prefix", "dual")
PROMPT_TOKENS = 32
LEGEND = """\
  tok/s    generated tokens per second, all rows together
  steps    engine steps timed
  pos/fwd  canvas positions one row's forward computed, on average (full: the whole canvas)
  tok/fwd  tokens one row's forward committed, on average
  x none   tok/s over the same row with cache none"""


@dataclass
class Run:
    model: str
    rule: str
    gen: int
    batch: int
    cache: str
    tokens_per_s: float
    steps: int
    positions_per_forward: float
    tokens_per_forward: float
    seconds: float


def engine_for(name: str, threads: int) -> Engine:
    torch.set_num_threads(threads)
    config = SchedulerConfig(max_batch_size=64, max_batch_tokens=1 << 20, max_kv_bytes=8 << 30)
    if name == "embedded":
        return Engine.from_pretrained(CHECKPOINT_DIR, config=config, progress=False)
    tokenizer = TextTokenizer(TOKENIZER)
    special = tokenizer.special
    cfg = preset(
        name, mask_token_id=special.mask, eos_token_id=special.eos, pad_token_id=special.pad
    )
    torch.manual_seed(0)
    model = Denoiser(cfg)
    model.init_weights()
    engine = Engine(model.eval(), tokenizer, config)
    # The reference tokenizer is small; score every id as a real 126,464-token one would.
    engine.runner.vocab_limit = cfg.vocab_size
    return engine


def params_for(rule: str, gen: int, cache: str) -> SamplingParams:
    common = dict(max_tokens=gen, block_length=32, ignore_eos=True, cache=cache, seed=0)
    if rule == "threshold":
        return SamplingParams(threshold=0.9, **common)
    return SamplingParams(steps=gen // 2, **common)


def engines_for(name: str, threads: int) -> dict[str, Engine]:
    """One engine per cache mode over the same model, so the modes' steps can interleave."""
    first = engine_for(name, threads)
    engines = {MODES[0]: first}
    for mode in MODES[1:]:
        engine = Engine(first.model, first.tokenizer, first.scheduler.config, first.defaults)
        engine.runner.vocab_limit = first.runner.vocab_limit
        engines[mode] = engine
    return engines


@dataclass
class _Progress:
    ids: list[str]
    done_blocks: dict[str, int]
    tokens: int = 0
    steps: int = 0
    row_forwards: int = 0
    positions: int = 0
    seconds: float = 0.0


def measure(
    engines: dict[str, Engine], label: str, rule: str, gen: int, batch: int, blocks: int
) -> list[Run]:
    """Time `blocks` blocks of every request (all of them when `blocks` >= gen / 32) under
    each cache mode of `engines`. The modes take their steps in turn, so a machine that
    slows down or speeds up during the run weighs on every mode alike; each mode's clock runs
    only during its own steps."""
    any_engine = next(iter(engines.values()))
    vocab = min(len(any_engine.tokenizer), any_engine.model.cfg.vocab_size)
    banned = any_engine.special.stop_ids | {any_engine.special.mask}
    usable = [t for t in range(5, vocab) if t not in banned]
    progress: dict[str, _Progress] = {}
    for cache, engine in engines.items():
        params = params_for(rule, gen, cache)
        ids = []
        for b in range(batch):
            prompt = [usable[(b * 7 + i * 13) % len(usable)] for i in range(PROMPT_TOKENS)]
            ids.append(engine.add(engine.make_request(prompt, params)).request_id)
        progress[cache] = _Progress(ids, dict.fromkeys(ids, 0))
    target = min(blocks, gen // 32)
    active = list(engines)
    while active:
        for cache in list(active):
            p = progress[cache]
            start = time.perf_counter()
            outputs = engines[cache].step()
            p.seconds += time.perf_counter() - start
            p.steps += 1
            for out in outputs:
                p.tokens += len(out.committed)
                p.positions += out.positions
                p.row_forwards += out.forward is not None
                if out.block_completed is not None:
                    p.done_blocks[out.request_id] += 1
                if out.finished:
                    p.done_blocks[out.request_id] = 1 << 30
            if min(p.done_blocks.values()) >= target:
                active.remove(cache)
    runs = []
    for cache, engine in engines.items():
        p = progress[cache]
        for request_id in p.ids:
            engine.abort(request_id)
        while engine.has_unfinished():
            engine.step()
        runs.append(
            Run(
                label,
                rule,
                gen,
                batch,
                cache,
                p.tokens / p.seconds,
                p.steps,
                p.positions / p.row_forwards,
                p.tokens / p.row_forwards,
                p.seconds,
            )
        )
    return runs


def chart(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in runs})
    rules = ("threshold", "fixed")
    fig, axes = plt.subplots(
        len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False, sharex="row"
    )
    for i, model in enumerate(models):
        for j, rule in enumerate(rules):
            ax = axes[i][j]
            for cache, style in zip(MODES, ("o-", "s--", "^-")):
                rows = sorted(
                    (
                        r
                        for r in runs
                        if (r.model, r.rule, r.cache, r.batch) == (model, rule, cache, 1)
                    ),
                    key=lambda r: r.gen,
                )
                if rows:
                    ax.plot(
                        [r.gen for r in rows], [r.tokens_per_s for r in rows], style, label=cache
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(
                f"{model}, {'threshold 0.9' if rule == 'threshold' else 'fixed steps (gen/2)'}"
            )
            ax.set_xlabel("generated tokens (block 32, batch 1)")
            ax.set_ylabel("tokens/s")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(title="cache")
    fig.suptitle(f"Marble KV cache on {os.cpu_count()} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,llada-vocab")
    parser.add_argument("--rules", default="threshold,fixed")
    parser.add_argument("--gens", default="64,128,192", help="for models of a short context")
    parser.add_argument("--gens-long", default="64,256,512,1024", help="context >= 1024")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--batch8-max-gen", type=int, default=64, help="batch > 1 up to here")
    parser.add_argument("--whole-up-to", type=int, default=256, help="longest gen run to the end")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write every run here")
    parser.add_argument("--chart", type=Path, help="draw tokens/s vs gen (batch 1) here")
    args = parser.parse_args()
    runs: list[Run] = []
    print(LEGEND)
    print(
        f"{'model':12} {'rule':9} {'gen':>5} {'B':>2} {'cache':6} {'tok/s':>8} {'steps':>5} "
        f"{'pos/fwd':>8} {'tok/fwd':>7} {'x none':>6}"
    )
    for label in args.models.split(","):
        engines = engines_for(label, args.threads)
        context = engines["none"].model.cfg.max_seq_len - PROMPT_TOKENS
        # Warm-up: first-call allocations are not part of any figure.
        measure(engines, label, "threshold", 64, 1, 1)
        for rule in args.rules.split(","):
            gens = args.gens_long if context >= 1024 else args.gens
            for gen in (int(g) for g in gens.split(",")):
                if gen > context:
                    continue
                for batch in (int(b) for b in args.batches.split(",")):
                    if batch > 1 and gen > args.batch8_max_gen:
                        continue
                    whole = gen <= args.whole_up_to
                    modes = MODES if whole else ("none", "dual")
                    row = measure(
                        {m: engines[m] for m in modes},
                        label,
                        rule,
                        gen,
                        batch,
                        gen // 32 if whole else 1,
                    )
                    runs += row
                    base = row[0].tokens_per_s
                    for run in row:
                        cache = run.cache
                        print(
                            f"{label:12} {rule:9} {gen:5d} {batch:2d} {cache:6} "
                            f"{run.tokens_per_s:8.1f} {run.steps:5d} "
                            f"{run.positions_per_forward:8.1f} {run.tokens_per_forward:7.2f} "
                            f"{run.tokens_per_s / base:6.2f}",
                            flush=True,
                        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    if args.chart:
        chart(runs, args.chart)
        print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
