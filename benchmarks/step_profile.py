"""Where one engine step's time goes, per batch size: before the forward (scheduling, padding,
stacking cached rows' keys and values), the transformer forward, the LM-head matmul, and
after it (the step's tail: sampling, confidence, commit rules, bookkeeping).

The target: the work after the LM-head matmul costs at most 0.3x that matmul on a model with
a real vocabulary. Medians over `--steps` steps after a warm-up; each part is timed around its
call (with a device sync on GPU).

    python benchmarks/step_profile.py                        # llada-vocab, batch 1 and 8
    python benchmarks/step_profile.py --model embedded --batches 1,16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from cache import engine_for

from marble.scheduler.sampling_params import SamplingParams


def timed(fn, bucket: list[float], sync, ends: list[float] | None = None):
    """`fn`, with its duration appended to `bucket` (and its end time to `ends`)."""

    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        end = time.perf_counter()
        bucket.append(end - start)
        if ends is not None:
            ends.append(end)
        return out

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llada-vocab")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--cache", default="dual")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    engine = engine_for(args.model, args.threads)
    model = engine.model
    cuda = next(model.parameters()).is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    forward: list[float] = []
    head: list[float] = []
    model.forward = timed(model.forward, forward, sync)
    model.forward_cached = timed(model.forward_cached, forward, sync)
    head_end: list[float] = []
    model.project = timed(model.project, head, sync, head_end)
    params = SamplingParams(
        max_tokens=args.gen, block_length=32, steps=args.gen, ignore_eos=True, cache=args.cache
    )
    print(f"{args.model}, gen {args.gen}, block 32, cache {args.cache}, one token per step")
    print(
        f"{'B':>3} {'step ms':>8} {'before':>8} {'forward':>8} {'lm_head':>8} {'after':>8} "
        f"{'after/head':>10}"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        for i in range(batch):
            engine.add(engine.make_request([10 + i] * 32, params))
        rows = []
        for step in range(args.steps + 2):
            forward.clear()
            head.clear()
            head_end.clear()
            sync()
            start = time.perf_counter()
            engine.step()
            sync()
            end = time.perf_counter()
            if step >= 2:  # warm-up
                after = end - head_end[-1]
                rows.append((end - start, sum(forward), sum(head), after))
        while engine.has_unfinished():
            for request_id in list(engine.requests):
                engine.abort(request_id)
            engine.step()
        step_s = statistics.median(r[0] for r in rows)
        fwd = statistics.median(r[1] for r in rows)
        hd = statistics.median(r[2] for r in rows)
        after = statistics.median(r[3] for r in rows)
        before = statistics.median(r[0] - r[1] - r[2] - r[3] for r in rows)
        print(
            f"{batch:3d} {1e3 * step_s:8.1f} {1e3 * before:8.1f} {1e3 * fwd:8.1f} "
            f"{1e3 * hd:8.1f} {1e3 * after:8.1f} {after / hd:10.2f}"
        )


if __name__ == "__main__":
    main()
