r"""Remasking benchmark: WINO's verify (`verify_threshold`) against the plain rule, in process.

Embedded model (Marble's own): the held-out function prompts of `training/evaluate.py`
(header + docstring of held-out stdlib functions), completed at the checkpoint's serving
settings with and without verify, and a ReMDM-style point (verify 1.0: every step takes back
as many of the block's filled tokens as it may, lowest probability first). `--drafts` adds
other commit thresholds (WINO drafts low and verifies high), each with and without verify.
Printed per setting: compile rate (training/completions.py's check), code-line share,
repeated-line share (code lines that repeat an earlier line of the same completion),
completion tokens per row-forward, remasks per completion token, how many remasks ended with
another token, and tokens/s. llada-tiny (random weights, its serving settings): only tokens
per forward and tokens/s mean something there.

Every setting of a model shares the prompts, the seeds and every other field. Round r seeds
prompt i with seed + 1000 r + i, the same for every setting; the runs are interleaved
(setting after setting, round after round), quality and tokens per forward pool every round's
completions, and tokens/s is the median over the rounds, after one untimed warm-up run.
Quality and tokens per forward do not depend on the machine's load (the same seeds give the
same text); tokens/s does, and on a shared CPU it is noisy. Compile rates a few completions
apart are noise: check a difference on a fresh set (`--first-prompt 48 --seed 7000`).

    python benchmarks/remasking.py                       # ~5 min on 2 shared CPU cores
    python benchmarks/remasking.py --prompts 48 --rounds 3 --verify 0.5,0.7,0.9,1.0
    python benchmarks/remasking.py --first-prompt 48 --prompts 96 --seed 7000 \
        --drafts 0.5,0.4,0.3 --verify 0.7,0.9 --skip-llada-tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.scheduler import SchedulerConfig
from marble.training.completions import (
    code_share,
    compiles,
    function_prompts,
    repeated_share,
)
from marble.training.corpus import read_sources, split_files

REPO = Path(__file__).resolve().parents[1]
LLADA_TINY = REPO.parent / "shared" / "reference" / "llada-tiny"
LEGEND = """\
  compile    completions whose prompt + completion (cut at the last whole line) compiles
  code       share of completion lines that hold code (not blank, not comment-only)
  repeated   share of completion code lines that repeat an earlier line of the completion
  tok/fwd    completion tokens / row-forwards (a remasked token costs forwards, counts once)
  remask/tok remasks per completion token
  revised    remasks after which the position ends with another token than the one removed
  tok/s      completion tokens / wall seconds of the batch (median over the rounds)"""


@dataclass
class Probe:
    texts: list[str]
    completion_tokens: int
    forwards: int
    remasks: int
    revised: int  # remasks whose position ends with another token than the one removed
    seconds: float


def probe(engine: Engine, prompts: list[str], params: SamplingParams, seed: int) -> Probe:
    """Every prompt at once (prompt i seeded seed + i), stepped to the end."""
    ids = {
        engine.add(engine.make_request(p, params.replace(seed=seed + i))).request_id: i
        for i, p in enumerate(prompts)
    }
    texts: dict[int, str] = {}
    removed: dict[str, list[tuple[int, int]]] = {rid: [] for rid in ids}
    tokens = forwards = revised = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            forwards += out.forward is not None
            removed[out.request_id] += [(c.pos, c.previous) for c in out.changes]
            if out.finished:
                texts[ids[out.request_id]] = out.text
                tokens += out.completion_tokens
                revised += sum(out.tokens[pos] != old for pos, old in removed[out.request_id])
    elapsed = time.perf_counter() - start
    remasks = sum(map(len, removed.values()))
    texts_in_order = [texts[i] for i in range(len(prompts))]
    return Probe(texts_in_order, tokens, forwards, remasks, revised, elapsed)


def heldout_prompts(engine: Engine, first: int, n: int, max_tokens: int) -> list[str]:
    """`n` held-out function prompts that leave room for `max_tokens`, from the `first`-th, in
    the order training/evaluate.py picks them (it takes the first 48)."""
    budget = engine.context - max_tokens
    sources = read_sources(split_files()[1])
    fitting = [
        p
        for p in function_prompts(sources, 10 * (first + n))
        if len(engine.tokenizer.encode(p)) <= budget
    ]
    return fitting[first : first + n]


def settings(
    base: SamplingParams, drafts: list[float], verify: list[float]
) -> dict[str, SamplingParams]:
    """For each draft (commit) threshold, the plain rule and then each verify threshold, on
    otherwise identical fields."""
    out = {}
    for draft in drafts:
        out[f"threshold {draft:g}, off"] = base.replace(threshold=draft, verify_threshold=None)
        for v in verify:
            name = f"threshold {draft:g}, verify {v:g}" + (" (ReMDM-style)" if v == 1.0 else "")
            out[name] = base.replace(threshold=draft, verify_threshold=v)
    return out


def measure(
    engine: Engine, prompts: list[str], runs: dict[str, SamplingParams], rounds: int, seed: int
) -> dict[str, list[Probe]]:
    """Each setting once per round, in turn, after an untimed warm-up (the first setting on
    a few prompts): round r seeds every setting alike."""
    probe(engine, prompts[:4], next(iter(runs.values())), seed)
    probes: dict[str, list[Probe]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, params in runs.items():
            probes[name].append(probe(engine, prompts, params, seed + 1000 * r))
    return probes


def row(name: str, prompts: list[str], runs: list[Probe], quality: bool) -> str:
    texts = [t for r in runs for t in r.texts]
    tokens = sum(r.completion_tokens for r in runs)
    rate = statistics.median(r.completion_tokens / r.seconds for r in runs)
    cells = [name]
    if quality:
        ok = sum(compiles(p, t) for p, t in zip(prompts * len(runs), texts))
        cells += [
            f"{ok}/{len(texts)} ({ok / len(texts):.0%})",
            f"{sum(map(code_share, texts)) / len(texts):.0%}",
            f"{repeated_share(texts):.0%}",
        ]
    cells += [
        f"{tokens / sum(r.forwards for r in runs):.2f}",
        f"{sum(r.remasks for r in runs) / max(tokens, 1):.2f}",
        f"{sum(r.revised for r in runs) / max(sum(r.remasks for r in runs), 1):.0%}",
        f"{rate:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def table(
    title: str, prompts: list[str], probes: dict[str, list[Probe]], quality: bool
) -> list[str]:
    head = ["setting"] + (["compile", "code", "repeated"] if quality else [])
    head += ["tok/fwd", "remask/tok", "revised", "tok/s"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    lines += [row(name, prompts, runs, quality) for name, runs in probes.items()]
    return lines + [""]


def fields(params: SamplingParams) -> str:
    varied = ("threshold", "verify_threshold")
    shown = {k: v for k, v in params.to_dict().items() if k not in varied}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="held-out function prompts")
    parser.add_argument(
        "--first-prompt", type=int, default=0, help="skip this many (a fresh set: 48)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--drafts", default="", help="embedded model's commit thresholds (default: its serving one)"
    )
    parser.add_argument("--verify", default="0.5,0.9,1.0", help="verify thresholds to compare")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds, each with its own seeds"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--embedded-overrides",
        default="",
        help="fields over the embedded model's serving defaults: temperature=0,cache=none",
    )
    parser.add_argument("--skip-llada-tiny", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    verify = [float(v) for v in args.verify.split(",") if v]
    drafts = [float(v) for v in args.drafts.split(",") if v]
    config = SchedulerConfig(max_batch_size=64)

    embedded = Engine.from_pretrained(config=config, progress=False)
    prompts = heldout_prompts(embedded, args.first_prompt, args.prompts, args.max_tokens)
    overrides: dict[str, Any] = {}
    for item in filter(None, args.embedded_overrides.split(",")):
        key, value = item.split("=")
        try:
            overrides[key] = json.loads(value)  # numbers, null, true/false
        except json.JSONDecodeError:
            overrides[key] = value  # names, e.g. cache=none
    base = embedded.defaults.replace(max_tokens=args.max_tokens, **overrides)
    print(
        f"cpu threads {args.threads}; {len(prompts)} prompts (from #{args.first_prompt}) x "
        f"{args.rounds} rounds (round r: "
        f"seed {args.seed} + 1000 r + i); tok/s is noisy on a shared CPU, the rest is not\n"
    )
    print(f"embedded model, every setting: {fields(base)}\n")
    runs = settings(base, drafts or [base.threshold], verify)
    probes = measure(embedded, prompts, runs, args.rounds, args.seed)
    print("\n".join(table("Embedded model (held-out function prompts)", prompts, probes, True)))
    if not args.skip_llada_tiny:
        tiny = Engine.from_pretrained(LLADA_TINY, config=config, progress=False)
        # Random weights often stop at once: ignore_eos keeps every completion max_tokens long.
        tiny_base = tiny.defaults.replace(max_tokens=args.max_tokens, ignore_eos=True)
        print(f"llada-tiny, every setting: {fields(tiny_base)}\n")
        # Held-out prompts again, those that fit its context in its own tokens.
        tiny_prompts = heldout_prompts(tiny, args.first_prompt, args.prompts, args.max_tokens)
        runs = settings(tiny_base, [tiny_base.threshold], verify)
        probes = measure(tiny, tiny_prompts, runs, args.rounds, args.seed)
        title = "llada-tiny (random weights: tokens per forward and tokens/s only)"
        print("\n".join(table(title, tiny_prompts, probes, False)))
    print(LEGEND)


if __name__ == "__main__":
    main()
