"""Engine tokens/s with and without `--compile`, on the embedded default model (masked, dual
cache) and a block-causal tiny model (SDAR), in process, one run each.

For each model and batch size B, B identical greedy requests (EOS ignored) run to the end on an
eager engine and on a compiled one. The compiled engine first runs the same workload once
untimed, so every padded bucket it needs is compiled before the timed runs (compile time is
printed apart); then eager and compiled runs alternate (`--repeats` each) and the ratio is
compiled over eager median tok/s.

    python benchmarks/compile.py                        # inductor: several minutes on 2 cores
    python benchmarks/compile.py --backend aot_eager    # the graphs without inductor's codegen
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from same_work import scheduler_config

from marble.model.default import CHECKPOINT_DIR
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
PROMPT = "def fibonacci(n):\n    "
MODELS = {
    "embedded": (CHECKPOINT_DIR, dict(block_length=16, steps=32, cache="dual")),
    "sdar-tiny": (REFERENCE / "sdar-tiny", dict(block_length=4, steps=4)),
}


def tokens_per_second(engine: Engine, params: SamplingParams, batch: int) -> float:
    """Tokens committed over the seconds spent in `Engine.step()`, B requests to the end."""
    for _ in range(batch):
        engine.add(engine.make_request(PROMPT, params))
    seconds, committed = 0.0, 0
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        seconds += time.perf_counter() - start
        committed += sum(len(o.committed) for o in outputs)
    return committed / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated (default 1,4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="per request (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    config = scheduler_config(max_batch_size=max(batches))
    print(
        f"backend {args.backend}, torch threads {torch.get_num_threads()}, max_tokens "
        f"{args.max_tokens}, greedy, EOS ignored"
    )
    header = (
        f"{'model':>10} {'batch':>5} {'eager tok/s':>12} {'compiled tok/s':>15} "
        f"{'ratio':>6} {'compiles':>8} {'compile s':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        path, fields = MODELS[name]
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=0.0, seed=0, ignore_eos=True, **fields
        )
        eager = Engine.from_pretrained(path, config=config, progress=False)
        compiled = Engine.from_pretrained(path, config=config, progress=False, compile=args.backend)
        forward = compiled.first.compiled
        assert forward is not None
        for batch in batches:
            start = time.perf_counter()
            tokens_per_second(compiled, params, batch)  # compiles this workload's buckets
            compile_s = time.perf_counter() - start
            # Alternated, medians: a load that varies during the run hits both sides alike.
            pairs = [
                (
                    tokens_per_second(eager, params, batch),
                    tokens_per_second(compiled, params, batch),
                )
                for _ in range(args.repeats)
            ]
            base = statistics.median(p[0] for p in pairs)
            fast = statistics.median(p[1] for p in pairs)
            print(
                f"{name:>10} {batch:>5} {base:>12.1f} {fast:>15.1f} {fast / base:>6.2f} "
                f"{forward.compiles:>8} {compile_s:>10.1f}"
            )
    print(
        "  ratio      compiled / eager median tok/s, both after the compiles\n"
        "  compiles   padded buckets compiled so far (each one compile)\n"
        "  compile s  the untimed first run of the batch, compiles included"
    )


if __name__ == "__main__":
    main()
