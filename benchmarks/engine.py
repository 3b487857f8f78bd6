"""Engine throughput and overhead, in process, on the embedded default model unless told.

For each batch size B, B identical requests (greedy, EOS ignored, so every row does the same
work) run to the end under two commit rules: one token per step (threshold off, no step
budget) and confidence threshold 0.9. Right after every other full-batch `Engine.step()` the
bare model forward on the same batch shape (every row's canvas, logits at one block) is timed
the same way; both medians are over those pairs, so their ratio is the engine's overhead
(target <= 1.2). A legend under the table says what each column means.

    python benchmarks/engine.py                             # embedded model: ~20 s, 2 CPU cores
    python benchmarks/engine.py --model ../shared/reference/llada-tiny --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from same_work import scheduler_config

from marble.model.default import CHECKPOINT_DIR
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams

PROMPT = "def fibonacci(n):\n    "
PAIR_EVERY = 2  # full-batch steps per timed (step, bare forward) pair: keeps the run short

LEGEND = """\
  batch     requests in flight together (all start at once, all run to max_tokens)
  rule      one/step: one token committed per forward; thr 0.9: every token whose
            confidence is >= 0.9 (at least one) per forward
  tok/s     tokens committed / seconds spent inside Engine.step() (bare forwards excluded)
  tok/fwd   tokens committed per request per forward (mean over the run)
  pairs     timed (full-batch Engine.step(), bare forward) pairs behind the two medians
  step ms   median wall time of one full-batch Engine.step() (schedule + forward + sampling)
  fwd ms    median wall time of the bare model forward on the same shape, timed right after
            the step of its pair
  step/fwd  step ms / fwd ms: the engine's overhead over the model alone (target <= 1.2)"""


@dataclass
class Row:
    tokens_per_s: float
    tokens_per_forward: float
    pairs: int
    step_ms: float
    forward_ms: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward_seconds(engine: Engine, canvas: int, window: int, batch: int) -> float:
    """One model forward on [batch, canvas] ids with logits at `window` positions, timed as a
    step is (the engine gathers one block per row before the LM head)."""
    device = next(engine.model.parameters()).device
    ids = torch.full((batch, canvas), engine.special.mask, device=device)
    positions = torch.arange(canvas, device=device).expand(batch, canvas)
    gather = torch.arange(canvas - window, canvas, device=device).expand(batch, window)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        engine.model(ids, None, positions, gather=gather).float()
    sync(device)
    return time.perf_counter() - start


def run(engine: Engine, batch: int, params: SamplingParams, prompt_len: int) -> Row:
    """Drain `batch` requests; time every other full-batch step and a bare forward after it."""
    device = next(engine.model.parameters()).device
    canvas = prompt_len + params.max_tokens
    window = min(params.block_length or params.max_tokens, params.max_tokens)
    for _ in range(batch):
        engine.add(engine.make_request(PROMPT, params))
    step_times, forward_times = [], []
    engine_seconds, committed, forwards, full = 0.0, 0, 0, 0
    while engine.has_unfinished():
        sync(device)
        start = time.perf_counter()
        outputs = engine.step()
        sync(device)
        seconds = time.perf_counter() - start
        engine_seconds += seconds
        full += engine.last_stats.batch_size == batch
        if engine.last_stats.batch_size == batch and full % PAIR_EVERY == 1:
            step_times.append(seconds)
            forward_times.append(bare_forward_seconds(engine, canvas, window, batch))
        committed += sum(len(o.committed) for o in outputs)
        forwards += engine.last_stats.batch_size
    return Row(
        tokens_per_s=committed / engine_seconds,
        tokens_per_forward=committed / max(forwards, 1),
        pairs=len(step_times),
        step_ms=statistics.median(step_times) * 1e3 if step_times else float("nan"),
        forward_ms=statistics.median(forward_times) * 1e3 if forward_times else float("nan"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=CHECKPOINT_DIR,
        help="checkpoint folder (default: the embedded default model)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--max-tokens", type=int, default=32, help="per request (default 32)")
    parser.add_argument("--block-length", type=int, default=16, help="(default 16)")
    parser.add_argument("--batch-sizes", default="1,4,16", help="comma-separated (default 1,4,16)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    engine = Engine.from_pretrained(
        args.model,
        device=args.device,
        config=scheduler_config(max_batch_size=max(batches)),
        progress=False,
    )
    # Every field explicit: the checkpoint's serving defaults do not apply here.
    one_per_step = SamplingParams(
        max_tokens=args.max_tokens,
        steps=None,
        block_length=args.block_length,
        threshold=None,
        temperature=0.0,
        seed=0,
        ignore_eos=True,
        token_healing=False,
    )
    rules = (("one/step", one_per_step), ("thr 0.9", one_per_step.replace(threshold=0.9)))
    prompt_len = len(engine.tokenizer.encode(PROMPT))
    params = sum(p.numel() for p in engine.model.parameters())
    print(
        f"model {args.model.name} ({params / 1e6:.1f} M params), device {args.device}, "
        f"torch threads {torch.get_num_threads()}; per request: prompt {prompt_len} tokens, "
        f"max_tokens {args.max_tokens}, block_length {args.block_length}, greedy, EOS ignored"
    )
    warm_up = one_per_step.replace(max_tokens=8, block_length=8)
    run(engine, max(batches), warm_up, prompt_len)
    header = (
        f"{'batch':>5} {'rule':>9} {'tok/s':>8} {'tok/fwd':>8} {'pairs':>6} "
        f"{'step ms':>8} {'fwd ms':>8} {'step/fwd':>8}"
    )
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for batch in batches:
        for name, rule in rules:
            r = run(engine, batch, rule, prompt_len)
            print(
                f"{batch:>5} {name:>9} {r.tokens_per_s:>8.1f} {r.tokens_per_forward:>8.2f} "
                f"{r.pairs:>6} {r.step_ms:>8.2f} {r.forward_ms:>8.2f} "
                f"{r.step_ms / r.forward_ms:>8.2f}"
            )
    print(f"(the table took {time.perf_counter() - start:.1f} s)\n{LEGEND}")


if __name__ == "__main__":
    main()
