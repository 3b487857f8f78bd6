"""Engine throughput and overhead, in process.

For batch sizes 1, 4 and 16 prints tokens/s, tokens per forward under the fixed-count
schedule and under threshold 0.9, and the engine's step time divided by the bare model
forward on the same batch (the engine's overhead; target <= 1.2). Medians over steps.

    python benchmarks/engine.py                     # small random preset
    python benchmarks/engine.py --model model/default/checkpoint
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.config import preset
from model.tokenizer import TextTokenizer
from model.transformer import Denoiser
from scheduler.engine import Engine
from scheduler.request import SamplingParams
from scheduler.scheduler import SchedulerConfig

PROMPT = "def fibonacci(n):\n    "


def build_engine(args: argparse.Namespace) -> Engine:
    config = SchedulerConfig(max_batch_size=64)
    if args.model:
        return Engine.from_pretrained(args.model, device=args.device, config=config, progress=False)
    tokenizer = TextTokenizer(args.tokenizer)
    special = tokenizer.special
    cfg = preset(
        "small",
        vocab_size=max(len(tokenizer), 384),
        mask_token_id=special.mask,
        eos_token_id=special.eos,
        pad_token_id=special.pad,
    )
    torch.manual_seed(0)
    model = Denoiser(cfg).to(args.device).eval()
    return Engine(model, tokenizer, config)


def bare_forward_seconds(
    engine: Engine, batch: int, canvas: int, block: int, repeats: int
) -> float:
    """Median time of the model alone on the batch shape the engine runs (window-gathered)."""
    device = next(engine.model.parameters()).device
    ids = torch.randint(0, 256, (batch, canvas), device=device)
    positions = torch.arange(canvas, device=device).expand(batch, canvas)
    gather = torch.arange(canvas - block, canvas, device=device).expand(batch, block)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            engine.model(ids, None, positions, gather=gather).float()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(engine: Engine, batch: int, params: SamplingParams) -> dict[str, float]:
    for _ in range(batch):
        engine.add_request(PROMPT, params)
    step_times, committed, forwards = [], 0, 0
    start = time.perf_counter()
    while engine.has_unfinished():
        outputs = engine.step()
        stats = engine.last_stats
        if stats.batch_size == batch:  # full-batch steps only, for the overhead ratio
            step_times.append(stats.step_seconds)
        committed += sum(len(o.committed) for o in outputs)
        forwards += sum(1 for o in outputs if o.committed or not o.finished)
    elapsed = time.perf_counter() - start
    return {
        "tokens_per_s": committed / elapsed,
        "tokens_per_forward": committed / max(forwards, 1),
        "step_s": statistics.median(step_times) if step_times else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: random 'small' preset)")
    parser.add_argument(
        "--tokenizer",
        default="../shared/reference/llada-tiny",
        help="tokenizer folder for the random preset",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args)
    fixed = SamplingParams(
        max_tokens=args.max_tokens, threshold=None, block_length=32, ignore_eos=True
    )
    parallel = fixed.replace(threshold=0.9)
    prompt_len = len(engine.tokenizer.encode(PROMPT))
    run(engine, 1, fixed.replace(max_tokens=32))  # warm-up
    print(
        f"model: {args.model or 'random small preset'}  device: {args.device}  "
        f"threads: {torch.get_num_threads()}  max_tokens: {args.max_tokens}"
    )
    print(
        f"{'batch':>5} {'rule':>10} {'tok/s':>9} {'tok/fwd':>8} {'step ms':>8} "
        f"{'fwd ms':>8} {'step/fwd':>8}"
    )
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        forward = bare_forward_seconds(engine, batch, prompt_len + args.max_tokens, 32, 10)
        for name, params in (("fixed", fixed), ("thr 0.9", parallel)):
            r = run(engine, batch, params)
            print(
                f"{batch:>5} {name:>10} {r['tokens_per_s']:>9.1f} {r['tokens_per_forward']:>8.2f}"
                f" {r['step_s'] * 1e3:>8.2f} {forward * 1e3:>8.2f} {r['step_s'] / forward:>8.2f}"
            )


if __name__ == "__main__":
    main()
