"""Measure the default model and write the quality report next to the checkpoint.

The bound is the MDLM/LLaDA negative ELBO in nats per token on whole held-out stdlib files cut
into fixed windows, estimated with a fixed t grid and seeded masks so numbers compare across
runs. The completion probe asks the serving engine to complete held-out functions' headers and
docstrings, with a few seeds each, and counts those that compile, against a unigram baseline,
for each candidate set of sampling settings (WINO's verify among them; a chosen verify must also
beat the same settings without it on fresh prompts); `--set-defaults` stores the best set as
the checkpoint's serving defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tokenizers import Tokenizer

from marble.families.masked.model import Denoiser
from marble.model.default import CHECKPOINT_DIR
from marble.training.completions import (
    code_share,
    compiles,
    function_prompts,
    repeated_share,
    unigram_completions,
)
from marble.training.corpus import encode_files, read_sources, split_files
from marble.training.objective import masked_loss, noise

if TYPE_CHECKING:
    from marble.scheduler.engine import Engine

log = logging.getLogger(__name__)


def windows(files: list[np.ndarray], seq_len: int) -> torch.Tensor:
    """Non-overlapping full windows [N, seq_len] of each file's tokens (remainders dropped)."""
    rows = [f[i : i + seq_len] for f in files for i in range(0, len(f) - seq_len + 1, seq_len)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


@torch.no_grad()
def heldout_bound(
    model: Denoiser,
    x0: torch.Tensor,
    mask_id: int,
    n_t: int = 8,
    seed: int = 0,
    batch_size: int = 32,
    bf16: bool = False,
) -> float:
    """Nats/token upper bound: mean over windows [N, L] and a midpoint t grid of the loss.

    Masks are drawn on the CPU, so the bound's noise does not depend on the model's device.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    grid = (torch.arange(n_t, dtype=torch.float32) + 0.5) / n_t
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for t_value in grid.tolist():
        for start in range(0, len(x0), batch_size):
            batch = x0[start : start + batch_size]
            t = torch.full((len(batch),), t_value)
            prefix = torch.zeros(len(batch), dtype=torch.long)
            canvas, masked, eligible = noise(batch, t, prefix, mask_id, gen)
            moved = (a.to(device) for a in (batch, canvas, masked, eligible, t))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = masked_loss(model, *moved)
            total += float(loss) * len(batch)
            count += len(batch)
    model.train(was_training)
    return total / count


def unigram_nats(train: list[np.ndarray], heldout: torch.Tensor, vocab_size: int) -> float:
    """Held-out nats/token of add-one-smoothed train unigram frequencies (the floor to beat)."""
    counts = np.bincount(np.concatenate(train), minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout.numpy().ravel()].mean())


# Candidate serving settings (SamplingParams fields), compared by the completion probe. Each
# decodes in parallel (a confidence threshold) with the dual KV cache; a default must make at
# least MIN_TOKENS_PER_FORWARD tokens per forward, or it hides what a diffusion model does.
# The probe's prompts end in "\n", the case token healing is for: every candidate heals.
# The `-verify` candidates add WINO's verify (`verify_threshold`): drafting at a low
# threshold, then masking again what later steps no longer believe; each beside its plain twin,
# so the report shows what verify changes on this model and the choice makes it a default only
# if it wins by the same rule as everything else.
_SETTINGS: dict[str, dict[str, Any]] = {
    "t0-threshold0.9": {"temperature": 0.0, "threshold": 0.9},
    "t0-threshold0.8": {"temperature": 0.0, "threshold": 0.8},
    "t0-threshold0.7": {"temperature": 0.0, "threshold": 0.7},
    "t0-threshold0.6": {"temperature": 0.0, "threshold": 0.6},
    "t0-threshold0.5": {"temperature": 0.0, "threshold": 0.5},
    "t0.4-threshold0.9": {"temperature": 0.4, "threshold": 0.9},
    "t0.4-threshold0.7": {"temperature": 0.4, "threshold": 0.7},
    "t0.4-threshold0.5": {"temperature": 0.4, "threshold": 0.5},
    "t0.4-threshold0.5-verify0.7": {"temperature": 0.4, "threshold": 0.5, "verify_threshold": 0.7},
    "t0.4-threshold0.3": {"temperature": 0.4, "threshold": 0.3},
    "t0.4-threshold0.3-verify0.7": {"temperature": 0.4, "threshold": 0.3, "verify_threshold": 0.7},
    "t0-threshold0.3": {"temperature": 0.0, "threshold": 0.3},
    "t0-threshold0.3-verify0.7": {"temperature": 0.0, "threshold": 0.3, "verify_threshold": 0.7},
    "t0.7-threshold0.7": {"temperature": 0.7, "threshold": 0.7},
    "t1.0-threshold0.7": {"temperature": 1.0, "threshold": 0.7},
    "t1.0-threshold0.5": {"temperature": 1.0, "threshold": 0.5},
    "t1.0-threshold0.5-verify0.7": {"temperature": 1.0, "threshold": 0.5, "verify_threshold": 0.7},
    "t1.0-threshold0.3": {"temperature": 1.0, "threshold": 0.3},
    "t1.0-threshold0.3-verify0.7": {"temperature": 1.0, "threshold": 0.3, "verify_threshold": 0.7},
}
CANDIDATES = {
    name: {"token_healing": True, "remasking": "low_confidence", "cache": "dual", **settings}
    for name, settings in _SETTINGS.items()
}
MIN_TOKENS_PER_FORWARD = 1.5
# Seeds of the fresh prompts' confirmation run, apart from the choice's (round r: 1000 r).
FRESH_SEED = 7000
# Defaults must write code: the best compile rate among candidates whose completion lines
# are mostly code (blank and comment lines compile but are an undertrained model's collapse).
MIN_CODE_SHARE = 0.5


def choose_defaults(probes: dict[str, dict[str, Any]], noise: int) -> str:
    """The candidate that compiles the most completions among mostly-code ones that decode at
    least MIN_TOKENS_PER_FORWARD; counts within `noise` completions of the best (one prompt
    per round of seeds) are a tie, broken by the larger code-line share."""
    parallel = [
        n for n in probes if probes[n].get("tokens_per_forward", 0) >= MIN_TOKENS_PER_FORWARD
    ] or list(probes)
    coding = [n for n in parallel if probes[n]["code_line_share"] >= MIN_CODE_SHARE] or parallel
    best = max(probes[n]["compiled"] for n in coding)
    tied = [n for n in coding if probes[n]["compiled"] >= best - noise]
    return max(tied, key=lambda n: (probes[n]["code_line_share"], probes[n]["compiled"]))


def keeps_verify(verified: dict[str, Any], plain: dict[str, Any], noise: int) -> bool:
    """Whether verify earned its place on the fresh prompts: it compiles more than `noise`
    completions more than the same settings without it (a win on the prompts that chose it
    may be those prompts' luck, and verify costs forwards and coarsens the stream)."""
    return verified["compiled"] > plain["compiled"] + noise


def serving_engine(folder: Path) -> Engine:
    """The serving engine on `folder`, batching up to 16 probe prompts at once."""
    # The probe drives the serving engine itself: this evaluation tool sits above the
    # scheduler (nothing on the serving path imports it), so the import is local.
    from marble.scheduler.engine import Engine
    from marble.scheduler.scheduler import SchedulerConfig

    return Engine.from_pretrained(folder, config=SchedulerConfig(max_batch_size=16), progress=False)


def completion_probe(
    engine: Engine,
    prompts: list[str],
    settings: dict[str, Any],
    max_tokens: int,
    rounds: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Compile rate, code and repeated-line shares, tokens per forward and serving tokens/s of
    the engine on `prompts` with `settings`, pooled over `rounds` (round r seeds prompt i with
    seed + 1000 r + i, alike for every candidate)."""
    from marble.scheduler.step_result import REMASK  # local for the reason serving_engine gives

    # Whatever the checkpoint stores now, only the candidate's settings vary.
    base = engine.defaults.replace(
        max_tokens=max_tokens, block_length=32, steps=None, verify_threshold=None
    )
    texts: list[str] = []
    rates: list[float] = []
    filled = remasked = forwards = 0
    for r in range(rounds):
        params = [base.replace(**settings, seed=seed + 1000 * r + i) for i in range(len(prompts))]
        ids = {
            engine.add(engine.make_request(p, sp)).request_id: i
            for i, (p, sp) in enumerate(zip(prompts, params))
        }
        done: dict[int, str] = {}
        generated = 0
        start = time.perf_counter()
        while engine.has_unfinished():
            outputs = engine.step()
            for o in outputs:
                # A remasked position is filled again later: count each position once.
                remasks = sum(c.op == REMASK for c in o.changes)
                filled += len(o.committed) - remasks
                remasked += remasks
                forwards += o.forward is not None
                if o.finished:
                    done[ids[o.request_id]] = o.text
                    generated += o.completion_tokens
        rates.append(generated / (time.perf_counter() - start))
        texts += [done[i] for i in range(len(prompts))]
    ok = [compiles(p, t) for p, t in zip(prompts * rounds, texts)]
    return {
        "settings": settings,
        "completions": len(ok),
        "compiled": sum(ok),
        "compile_rate": round(sum(ok) / len(ok), 3),
        "code_line_share": round(sum(map(code_share, texts)) / len(texts), 3),
        "repeated_line_share": round(repeated_share(texts), 3),
        "positions_filled": filled,
        "remasks": remasked,
        "forwards": forwards,
        "tokens_per_forward": round(filled / max(forwards, 1), 2),
        "remasks_per_position": round(remasked / max(filled, 1), 3),
        "tokens_per_s": round(statistics.median(rates), 1),
        "samples": [
            {"prompt": prompts[i], "completion": texts[i], "compiles": ok[i]}
            for i in range(min(3, len(prompts)))
        ],
    }


def without_samples(probe: dict[str, Any]) -> dict[str, Any]:
    """A probe's figures, without its sample completions (for logs and summaries)."""
    return {k: v for k, v in probe.items() if k != "samples"}


def unigram_probe(
    tok: Tokenizer, train: list[np.ndarray], prompts: list[str], vocab: int, length: int, eos: int
) -> float:
    draws = unigram_completions(train, vocab, len(prompts), length)
    texts = []
    for ids in draws:
        ids = ids.tolist()
        texts.append(tok.decode(ids[: ids.index(eos)] if eos in ids else ids))
    return round(sum(compiles(p, t) for p, t in zip(prompts, texts)) / len(prompts), 3)


def training_summary(training: dict[str, Any]) -> str:
    """'N tokens in H h of training time' over every stage, for example for a warm-started run."""
    stages, stage = [], training
    while stage:
        stages.append(stage)
        stage = stage.get("init_from")
    tokens = sum(s["tokens_seen"] for s in stages)
    hours = sum(s.get("train_seconds", 0) for s in stages) / 3600
    parts = [
        f"{s['tokens_seen'] / 1e6:.1f}M tokens, {s.get('train_seconds', 0) / 3600:.2f} h"
        for s in reversed(stages)
    ]
    detail = f" (stages: {'; '.join(parts)})" if len(stages) > 1 else ""
    return f"{tokens / 1e6:.1f}M tokens in {hours:.2f} h of training time{detail}"


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """evaluation.json (machine-readable) and EVALUATION.md (for people) in the checkpoint."""
    (folder / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Default model: quality report", ""]
    if "training" in report:
        lines.append(f"- training: {training_summary(report['training'])}")
    lines += [
        f"- held-out bound: **{report['heldout_bound_nats_per_token']} nats/token** "
        f"({report['heldout_tokens']} held-out tokens); unigram: "
        f"{report['unigram_nats_per_token']} nats/token",
        f"- completions that compile ({report['prompts']} held-out function prompts x "
        f"{report['rounds']} seeds, {report['max_tokens']} tokens, cut at the last complete "
        f"line): unigram baseline {report['unigram_compile_rate']:.0%}",
    ]
    for name, probe in report["probes"].items():
        lines.append(
            f"  - `{name}` {json.dumps(probe['settings'])}: "
            f"{probe['compiled']}/{probe['completions']} ({probe['compile_rate']:.0%}) "
            f"compile, {probe['code_line_share']:.0%} of lines are code, "
            f"{probe['repeated_line_share']:.0%} of code lines repeat an earlier one, "
            f"{probe['tokens_per_forward']} tokens/forward, "
            f"{probe['remasks_per_position']} remasks/position, {probe['tokens_per_s']} tokens/s"
        )
    if "cache_comparison" in report:
        c = report["cache_comparison"]
        lines.append(
            f"- the chosen settings with `cache: none` instead of `dual`: "
            f"{c['compiled']}/{c['completions']} ({c['compile_rate']:.0%}) compile, "
            f"{c['code_line_share']:.0%} code lines, {c['tokens_per_forward']} "
            f"tokens/forward, {c['tokens_per_s']} tokens/s (the held-out bound scores full "
            "forwards, so no cache can change it); serving default: "
            f"`cache: {report.get('cache_chosen', 'dual')}` (none only when it compiles more "
            "than one prompt per seed more)"
        )
    check = report.get("verify_confirmation")
    if check:
        verdict = (
            "kept"
            if check["kept"]
            else "dropped (not more than one prompt per seed ahead), so the defaults are the "
            "choice among the candidates without verify"
        )
        lines.append(
            f"- `{check['candidate']}` against the same settings without verify on "
            f"{check['prompts']} fresh held-out prompts x {report['rounds']} seeds: "
            f"{check['verify']['compiled']}/{check['verify']['completions']} vs "
            f"{check['plain']['compiled']}/{check['plain']['completions']} compile, "
            f"{check['verify']['tokens_per_forward']} vs "
            f"{check['plain']['tokens_per_forward']} tokens/forward: verify {verdict}"
        )
    lines += [
        "",
        f"Serving defaults chosen: `{report['chosen']}` (best compile rate among candidates "
        f"that make at least {MIN_TOKENS_PER_FORWARD} tokens per forward and whose completion "
        f"lines are at least {MIN_CODE_SHARE:.0%} code; counts within one prompt per seed of "
        "the best count as a tie, broken by the larger share of code lines)",
        "",
        "## Samples",
        "",
    ]
    for sample in report["probes"][report["chosen"]]["samples"]:
        lines += ["```python", sample["prompt"] + sample["completion"], "```", ""]
    (folder / "EVALUATION.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description="Quality report of a Marble checkpoint")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT_DIR))
    parser.add_argument("--n-t", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=48, help="held-out function prompts")
    parser.add_argument(
        "--fresh-prompts",
        type=int,
        default=96,
        help="held-out prompts after those, on which a chosen verify must beat its plain twin",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=3, help="seeds per prompt (compile rates pool them)"
    )
    parser.add_argument(
        "--candidates",
        default=",".join(CANDIDATES),
        help="comma-separated names of candidate sampling settings",
    )
    parser.add_argument("--write", action="store_true", help="write the report into the checkpoint")
    parser.add_argument(
        "--set-defaults",
        action="store_true",
        help="store the best candidate as marble_defaults.json",
    )
    args = parser.parse_args()
    names = args.candidates.split(",")
    if unknown := [n for n in names if n not in CANDIDATES]:
        parser.error(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    if all("verify_threshold" in CANDIDATES[n] for n in names):
        # A verify that fails its fresh check falls back to a candidate without it.
        parser.error("--candidates needs at least one candidate without verify_threshold")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from marble.families.masked.loader import load_model

    folder = Path(args.checkpoint)
    model = load_model(folder, progress=False)
    cfg = model.cfg
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    train_paths, held_paths = split_files()
    held_sources = read_sources(held_paths)
    held = encode_files(tok, held_sources, cfg.eos_token_id)
    x0 = windows(held, cfg.max_seq_len)
    if args.max_windows:
        x0 = x0[:: max(1, len(x0) // args.max_windows)][: args.max_windows]
    bound = heldout_bound(model, x0, cfg.mask_token_id, n_t=args.n_t)
    train = encode_files(tok, read_sources(train_paths), cfg.eos_token_id)
    budget = cfg.max_seq_len - args.max_tokens
    fitting = [
        p
        for p in function_prompts(held_sources, 10 * (args.prompts + args.fresh_prompts))
        if len(tok.encode(p).ids) <= budget
    ]
    prompts, fresh = fitting[: args.prompts], fitting[args.prompts :][: args.fresh_prompts]
    engine, probes = serving_engine(folder), {}
    for name in names:
        probes[name] = completion_probe(
            engine, prompts, CANDIDATES[name], args.max_tokens, args.rounds
        )
        log.info("%s: %s", name, without_samples(probes[name]))
    chosen = choose_defaults(probes, noise=args.rounds)
    confirmation = None
    if "verify_threshold" in CANDIDATES[chosen]:
        twin = {k: v for k, v in CANDIDATES[chosen].items() if k != "verify_threshold"}
        confirmation = {"candidate": chosen, "prompts": len(fresh), "seed": FRESH_SEED}
        for side, settings in {"verify": CANDIDATES[chosen], "plain": twin}.items():
            probe = completion_probe(
                engine, fresh, settings, args.max_tokens, args.rounds, FRESH_SEED
            )
            confirmation[side] = without_samples(probe)
        log.info("verify on fresh prompts: %s", confirmation)
        confirmation["kept"] = keeps_verify(
            confirmation["verify"], confirmation["plain"], args.rounds
        )
        if not confirmation["kept"]:
            plain = {n: p for n, p in probes.items() if "verify_threshold" not in CANDIDATES[n]}
            chosen = choose_defaults(plain, noise=args.rounds)
    uncached = CANDIDATES[chosen] | {"cache": "none"}
    comparison = completion_probe(engine, prompts, uncached, args.max_tokens, args.rounds)
    summary = without_samples(comparison)
    log.info("%s without cache: %s", chosen, summary)
    # The cache stays unless going without it compiles more than one prompt per seed more
    # (the same noise rule as the choice itself): then it measurably hurts this model.
    more = comparison["compiled"] - probes[chosen]["compiled"]
    cache = "none" if more > args.rounds else "dual"
    report = {
        "heldout_windows": len(x0),
        "heldout_tokens": x0.numel(),
        "heldout_bound_nats_per_token": round(bound, 4),
        "unigram_nats_per_token": round(unigram_nats(train, x0, cfg.vocab_size), 4),
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "unigram_compile_rate": unigram_probe(
            tok, train, prompts, cfg.vocab_size, args.max_tokens, cfg.eos_token_id
        ),
        "probes": probes,
        "verify_confirmation": confirmation,
        "chosen": chosen,
        "cache_comparison": summary,
        "cache_chosen": cache,
    }
    training = folder / "marble_training.json"
    if training.exists():
        report["training"] = json.loads(training.read_text())
    print(json.dumps(report, indent=2))
    if args.write:
        write_report(folder, report)
    if args.set_defaults:
        defaults = {"block_length": 32, "steps": None, **CANDIDATES[chosen], "cache": cache}
        (folder / "marble_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")


if __name__ == "__main__":
    main()
