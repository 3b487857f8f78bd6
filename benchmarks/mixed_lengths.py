"""A short request beside long ones: what it costs to share engine steps with them.

A 16-token completion of a short prompt (22 canvas positions) runs alone, then submitted
together with four ~200-position requests; printed: its latency both ways and the ratio, its
positions computed per step, for each cache mode. Rows of very different lengths take
separate forwards (runner.PAD_RATIO), so the short row never pads to the long ones; what it
still shares is each engine step's wall time.

    python benchmarks/mixed_lengths.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from cache import engine_for

from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams


def latency(
    engine: Engine, short: list[int], long: list[list[int]], cache: str
) -> tuple[float, float]:
    """(seconds until the short request finished, its mean positions per step)."""
    short_params = SamplingParams(
        max_tokens=16, block_length=16, steps=16, cache=cache, ignore_eos=True
    )
    long_params = SamplingParams(
        max_tokens=48, block_length=16, steps=48, cache=cache, ignore_eos=True
    )
    target = engine.add(engine.make_request(short, short_params)).request_id
    for prompt in long:
        engine.add(engine.make_request(prompt, long_params))
    start = time.perf_counter()
    positions, steps, finished = 0, 0, None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == target:
                positions += out.positions
                steps += 1
                if out.finished:
                    finished = time.perf_counter() - start
        if finished is not None:
            for request_id in list(engine.requests):
                engine.abort(request_id)
    return finished or 0.0, positions / max(steps, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    engine = engine_for(args.model, args.threads)
    short = list(range(20, 26))  # 6 prompt tokens + 16 generated = 22 positions
    long = [list(range(30 + i, 182 + i)) for i in range(4)]  # 152 + 48 = 200 positions each
    latency(engine, short, long, "none")  # warm-up
    print(f"{'cache':6} {'alone s':>8} {'beside 4 long s':>15} {'ratio':>6} {'its pos/step':>12}")
    for cache in ("none", "dual"):
        alone = [latency(engine, short, [], cache) for _ in range(args.repeats)]
        mixed = [latency(engine, short, long, cache) for _ in range(args.repeats)]
        a = statistics.median(t for t, _ in alone)
        m = statistics.median(t for t, _ in mixed)
        pos = statistics.median(p for _, p in mixed)
        print(f"{cache:6} {a:8.3f} {m:15.3f} {m / a:6.2f} {pos:12.1f}")


if __name__ == "__main__":
    main()
