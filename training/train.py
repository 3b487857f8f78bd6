"""Train Marble's default masked-diffusion LM on Python sources; resumable; `--export` writes it.

`python -m marble.training.train` trains (or resumes) in a run dir (runs/default/): tokenizer,
`state.pt` (weights, optimizer, step, RNG states) saved every few minutes, `train.log` and
`metrics.jsonl`. `--init-from RUN` starts a new run from another run's final weights and
tokenizer (a second stage with its own schedule and corpus). `--export DIR` writes a serving
checkpoint from the latest state. Same seed and same corpus give the same run (on one device
type). `--device cuda` trains on a GPU; `--budget-s` sizes the run to a wall-clock budget from the
throughput it measures in its first steps. Knows nothing about serving.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from marble.families.masked.config import ModelConfig
from marble.families.masked.model import Denoiser
from marble.training.corpus import (
    EOS_TOKEN,
    MASK_TOKEN,
    encode_files,
    package_sources,
    read_sources,
    split_files,
    train_tokenizer,
)
from marble.training.evaluate import heldout_bound, windows
from marble.training.export import export_checkpoint
from marble.training.objective import features, masked_loss, noise, stratified_t

log = logging.getLogger("marble.train")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 768
    seq_len: int = 256
    batch_size: int = 32
    tokens: int = 24_000_000  # total training tokens: sets the number of steps and the schedule
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 150
    decay_frac: float = 0.3  # warmup-stable-decay: linear decay over the last share of steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps: float = 1e-3  # t ~ U(eps, 1)
    prefix_share: float = 0.4  # rows with a clean prompt prefix (completion-style)
    end_share: float = 0.15  # rows forced to contain a file end (then EOS padding: learn to stop)
    eval_every: int = 250
    eval_windows: int = 32
    save_every_s: float = 300.0
    threads: int = 2
    device: str = "cpu"  # "cuda" trains on the GPU; data and masks are still drawn on the CPU
    # Wall-clock seconds for a fresh run, corpus loading and compilation included: it measures
    # its tokens/s over its first steps and resets `tokens` to what fits, so the schedule (and
    # its decay) ends inside the budget.
    budget_s: float = 0.0
    bf16: bool = True  # autocast: about 2x tokens/s on AVX512-BF16 cores, and on GPUs
    compile: bool = True
    max_files: int | None = None  # smoke tests: only the first N training files
    # Comma-separated installed packages whose sources join the training text (held-out stays
    # stdlib); rows come from the stdlib with probability stdlib_share, else from these.
    extra_packages: str = ""
    stdlib_share: float = 0.4
    init_from: str = ""  # run dir whose final weights and tokenizer this run starts from

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


# Fields a resumed run may change; the rest define the run and must match the saved state.
RESUMABLE_OVERRIDES = {
    "tokens",
    "eval_every",
    "eval_windows",
    "save_every_s",
    "threads",
    "compile",
    "device",
}
# Budgeted runs time these steps (after the compile warm-up) to measure tokens/s.
BUDGET_WINDOW = (10, 60)


def model_config(tc: TrainConfig, tok: Tokenizer) -> ModelConfig:
    eos, mask = tok.token_to_id(EOS_TOKEN), tok.token_to_id(MASK_TOKEN)
    return ModelConfig(
        arch="marble",
        vocab_size=tok.get_vocab_size(),
        d_model=tc.d_model,
        n_layers=tc.n_layers,
        n_heads=tc.n_heads,
        n_kv_heads=tc.n_heads,
        mlp_hidden=tc.mlp_hidden,
        tie_embeddings=True,
        max_seq_len=tc.seq_len,
        mask_token_id=mask,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def lr_at(tc: TrainConfig, step: int) -> float:
    """Warmup, constant, then linear decay to min_lr_ratio over the last decay_frac of steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    decay_start = int(tc.steps * (1 - tc.decay_frac))
    if step < decay_start:
        return tc.lr
    frac = min(1.0, (step - decay_start) / max(1, tc.steps - decay_start))
    return tc.lr * (1 - (1 - tc.min_lr_ratio) * frac)


class Batches:
    """Training rows from tokenised files: windows within one file, EOS-padded past its end.

    `pools` are lists of files (the stdlib first, then any extra text); a row picks its pool by
    `weights`, then a uniformly random token position within that pool. Rows are drawn as arrays
    (no per-row Python) so a GPU step is not kept waiting for its batch.
    """

    def __init__(
        self, pools: list[list[np.ndarray]], weights: list[float], tc: TrainConfig, eos_id: int
    ) -> None:
        self.weights, self.tc, self.eos_id = np.asarray(weights), tc, eos_id
        self.flat = [np.concatenate(files) for files in pools]
        self.offsets = [np.cumsum([0] + [len(f) for f in files]) for files in pools]
        self.rng = np.random.default_rng(tc.seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x0 [B, L] int64, prefix_len [B] int64)."""
        b, n, rng = self.tc.batch_size, self.tc.seq_len, self.rng
        # A single pool draws nothing here, so one-pool runs keep their data stream.
        pool = rng.choice(len(self.flat), size=b, p=self.weights) if len(self.flat) > 1 else None
        x0 = np.full((b, n), self.eos_id, dtype=np.int64)
        at_end = rng.random(b) < self.tc.end_share
        back = rng.integers(1, n, size=b)
        prefix = np.where(rng.random(b) < self.tc.prefix_share, rng.integers(1, n, size=b), 0)
        for p, (flat, offsets) in enumerate(zip(self.flat, self.offsets, strict=True)):
            rows = np.arange(b) if pool is None else np.flatnonzero(pool == p)
            pos = rng.integers(offsets[-1], size=len(rows))
            f = np.searchsorted(offsets, pos, side="right") - 1
            start, end = offsets[f], offsets[f + 1]
            # Rows forced to hold their file's end learn EOS padding, i.e. when to stop.
            pos = np.where(at_end[rows], np.maximum(start, end - back[rows]), pos)
            idx = pos[:, None] + np.arange(n)
            inside = idx < end[:, None]
            x0[rows] = np.where(inside, flat[np.minimum(idx, len(flat) - 1)], self.eos_id)
        return torch.from_numpy(x0), torch.from_numpy(prefix)


def setup_logging(run_dir: Path) -> None:
    for old in list(log.handlers):  # one run dir at a time (tests train twice in one process)
        log.removeHandler(old)
        old.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(fmt)
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def load_corpus(
    tc: TrainConfig, run_dir: Path
) -> tuple[Tokenizer, list[list[np.ndarray]], list[float], torch.Tensor]:
    """(tokenizer, train pools, pool weights, held-out eval windows).

    The tokenizer is trained once per run on the stdlib, or copied from the `init_from` run.
    """
    train_paths, held_paths = split_files()
    if tc.max_files:
        train_paths, held_paths = train_paths[: tc.max_files], held_paths[:4]
    train_texts, held_texts = read_sources(train_paths), read_sources(held_paths)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.exists() and tc.init_from:
        shutil.copyfile(Path(tc.init_from) / "tokenizer.json", tok_path)
    if tok_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer(train_texts, tc.vocab_size)
        tok.save(str(tok_path))
    eos = tok.token_to_id(EOS_TOKEN)
    pools, weights = [encode_files(tok, train_texts, eos)], [1.0]
    names = [n.strip() for n in tc.extra_packages.split(",") if n.strip()]
    if names:
        extra = package_sources(names)
        if tc.max_files:
            extra = extra[: tc.max_files]
        pools.append(encode_files(tok, extra, eos))
        weights = [tc.stdlib_share, 1 - tc.stdlib_share]
    held = windows(encode_files(tok, held_texts, eos), tc.seq_len)
    return tok, pools, weights, held


def initial_weights(tc: TrainConfig, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, lineage) of the `init_from` run's final state; its architecture must match."""
    source = torch.load(Path(tc.init_from) / "state.pt", map_location="cpu", weights_only=False)
    if source["model_config"] != cfg.to_json_dict():
        raise SystemExit(f"--init-from {tc.init_from}: its model config differs from this run's")
    lineage = {
        "run_dir": tc.init_from,
        "train_config": source["train_config"],
        "tokens_seen": source["tokens_seen"],
        "last_eval": source["history"][-1] if source["history"] else None,
    }
    return source["model"], lineage


def eval_sample(held: torch.Tensor, n: int) -> torch.Tensor:
    """A fixed, evenly spread subset of held-out windows for cheap periodic evaluation."""
    idx = np.linspace(0, len(held) - 1, num=min(n, len(held))).round().astype(int)
    return held[idx]


def save_state(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save never leaves a broken state


def train(
    tc: TrainConfig, resume: dict[str, Any] | None = None, stop_after: int | None = None
) -> dict[str, Any]:
    """Train to tc.steps (resuming from `resume`; at most `stop_after` steps in this call).

    With `tc.budget_s`, a fresh run resets `tc.tokens` once it has measured its speed.
    """
    if tc.budget_s and resume is None and tc.steps * (1 - tc.decay_frac) <= BUDGET_WINDOW[1]:
        raise SystemExit("--budget-s: --tokens must reach past the speed measurement; raise it")
    timing = {-1: time.monotonic()}  # step -> time; -1 is the start, before the corpus loads
    torch.set_num_threads(tc.threads)
    device = torch.device(tc.device)
    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    torch.manual_seed(tc.seed)
    tok, pools, weights, held = load_corpus(tc, run_dir)
    cfg = model_config(tc, tok)
    model = Denoiser(cfg)
    model.init_weights()
    model.to(device)
    lineage = None
    if tc.init_from and resume is None:
        start, lineage = initial_weights(tc, cfg)
        model.load_state_dict(start)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]  # norms: no weight decay
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": tc.weight_decay}, {"params": vectors}],
        lr=tc.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    batches = Batches(pools, weights, tc, cfg.eos_token_id)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    step, tokens_seen, history = 0, 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        batches.rng.bit_generator.state = resume["data_rng"]
        gen.set_state(resume["mask_rng"])
        step, tokens_seen, history = resume["step"], resume["tokens_seen"], resume["history"]
        lineage = resume.get("init_from")
        log.info("resumed at step %d (%d tokens)", step, tokens_seen)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("config %s", json.dumps(dataclasses.asdict(tc)))
    log.info("python %s, torch %s, device %s", platform.python_version(), torch.__version__, device)
    log.info(
        "model %s, %.2fM params, train tokens per pool %s (weights %s), %d held-out windows",
        json.dumps(cfg.to_json_dict()),
        n_params / 1e6,
        [sum(len(f) for f in files) for files in pools],
        weights,
        len(held),
    )
    if lineage:
        log.info("initialised from %s (%d tokens)", lineage["run_dir"], lineage["tokens_seen"])
    trunk = torch.compile(features) if tc.compile else features
    probe = eval_sample(held, tc.eval_windows)

    def payload() -> dict[str, Any]:
        return {
            "train_config": dataclasses.asdict(tc),
            "model_config": cfg.to_json_dict(),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "data_rng": batches.rng.bit_generator.state,
            "mask_rng": gen.get_state(),
            "step": step,
            "tokens_seen": tokens_seen,
            "history": history,
            "init_from": lineage,
        }

    def evaluate() -> float:
        bound = heldout_bound(model, probe, cfg.mask_token_id, n_t=4, bf16=tc.bf16)
        record = {"step": step, "tokens": tokens_seen, "heldout_bound": round(bound, 4)}
        history.append(record)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("eval step %d tokens %d heldout_bound %.4f", step, tokens_seen, bound)
        return bound

    stop = {"flag": False}
    # SIGTERM (kill PID) stops at the next step boundary and saves, so a run can be resumed.
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    last_save = time.monotonic()
    ema, bar = None, tqdm(total=tc.steps, initial=step, mininterval=5, dynamic_ncols=True)
    model.train()
    cap = math.inf if stop_after is None else step + stop_after
    last_step = min(tc.steps, cap)
    while step < last_step and not stop["flag"]:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(tc, step)
        x0, prefix = batches.next()
        t = stratified_t(len(x0), tc.eps, gen)
        canvas, masked, eligible = noise(x0, t, prefix, cfg.mask_token_id, gen)
        x0, canvas, masked, eligible, t = (
            a.to(device, non_blocking=True) for a in (x0, canvas, masked, eligible, t)
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.bf16):
            loss = masked_loss(model, x0, canvas, masked, eligible, t, trunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        opt.step()
        step += 1
        tokens_seen += x0.numel()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}")
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        tok_s = x0.numel() / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(
            loss=f"{ema:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{lr_at(tc, step):.2e}", refresh=False
        )
        if step % 25 == 0 or step == 1:
            log.info(
                "step %d tokens %d loss %.4f ema %.4f grad_norm %.3f lr %.2e tok/s %.0f",
                step,
                tokens_seen,
                value,
                ema,
                grad_norm,
                lr_at(tc, step - 1),
                tok_s,
            )
        if tc.budget_s and resume is None and step in BUDGET_WINDOW:
            timing[step] = time.monotonic()
            if step == BUDGET_WINDOW[1]:
                last_step = min(plan_budget(tc, timing, tokens_seen), cap)
                bar.total = tc.steps
        if step % tc.eval_every == 0 or step == tc.steps:
            evaluate()
        if time.monotonic() - last_save > tc.save_every_s:
            save_state(run_dir / "state.pt", payload())
            last_save = time.monotonic()
    bar.close()
    signal.signal(signal.SIGTERM, previous)
    final = payload()
    save_state(run_dir / "state.pt", final)
    log.info("saved step %d (%s)", step, "stopped" if stop["flag"] else "done")
    if step >= tc.steps:
        export(run_dir, run_dir / "export")
    return final


def plan_budget(tc: TrainConfig, timing: dict[int, float], tokens_seen: int) -> int:
    """Reset tc.tokens so training ends within tc.budget_s; returns the new last step.

    Speed comes from the steps in BUDGET_WINDOW, after compilation; 3% is kept back for the
    periodic evaluations and saves.
    """
    first, last = BUDGET_WINDOW
    per_step = (timing[last] - timing[first]) / (last - first)
    left = tc.budget_s - (timing[last] - timing[-1])
    steps_left = max(0, int(0.97 * left / per_step))
    tc.tokens = tokens_seen + steps_left * tc.batch_size * tc.seq_len
    log.info(
        "budget %.0f s: %.0f tokens/s, %d more steps, tokens set to %d",
        tc.budget_s,
        tc.batch_size * tc.seq_len / per_step,
        steps_left,
        tc.tokens,
    )
    return tc.steps


def training_seconds(log_path: Path) -> float:
    """Wall time of the training processes that wrote this train.log (0 if there is none).

    A process starts with `resumed at` (when resuming) or `config`; its time runs from there to
    its last line, so restarts' idle gaps do not count and lost, redone work does.
    """
    if not log_path.exists():
        return 0.0
    spans: list[list[datetime]] = []  # [first, last] line time of each process
    for line in log_path.read_text().splitlines():
        try:
            when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            continue
        if not spans or " INFO resumed at " in line or " INFO config " in line:
            spans.append([when, when])
        spans[-1][1] = when
    return sum((last - first).total_seconds() for first, last in spans)


def export(run_dir: Path, out_dir: Path) -> Path:
    """Serving checkpoint from run_dir/state.pt into out_dir."""
    state = torch.load(run_dir / "state.pt", map_location="cpu", weights_only=False)
    raw_cfg = dict(state["model_config"])
    raw_cfg.pop("model_type", None)
    cfg = ModelConfig(**raw_cfg)
    history = state["history"]
    extra = {
        "train_config": state["train_config"],
        "step": state["step"],
        "tokens_seen": state["tokens_seen"],
        "last_eval": history[-1] if history else None,
        "train_seconds": round(training_seconds(run_dir / "train.log")),
        "init_from": state.get("init_from"),
    }
    if extra["init_from"]:
        source_log = Path(extra["init_from"]["run_dir"]) / "train.log"
        extra["init_from"] = extra["init_from"] | {
            "train_seconds": round(training_seconds(source_log))
        }
    out = export_checkpoint(out_dir, cfg, state["model"], run_dir / "tokenizer.json", extra)
    log.info("exported step %d to %s", state["step"], out)
    return out


def parse_args() -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", metavar="DIR", help="write a serving checkpoint and exit")
    parser.add_argument("--restart", action="store_true", help="ignore an existing state.pt")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int}[f.type]
            parser.add_argument(flag, type=kind, default=None)
    args = parser.parse_args()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return args, {k: v for k, v in given.items() if v is not None}


def main() -> None:
    args, given = parse_args()
    run_dir = Path(given.get("run_dir", TrainConfig.run_dir))
    if args.export:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        print(export(run_dir, Path(args.export)))
        return
    state_path = run_dir / "state.pt"
    resume = None
    if state_path.exists() and not args.restart:
        resume = torch.load(state_path, map_location="cpu", weights_only=False)
        saved = resume["train_config"]
        changed = {k for k, v in given.items() if saved.get(k) != v} - {"run_dir"}
        if changed - RESUMABLE_OVERRIDES:
            raise SystemExit(
                f"cannot change {sorted(changed - RESUMABLE_OVERRIDES)} on resume "
                f"(use --restart or another --run-dir)"
            )
        tc = TrainConfig(**(saved | given))
    else:
        tc = TrainConfig(**given)
    train(tc, resume)


if __name__ == "__main__":
    main()
