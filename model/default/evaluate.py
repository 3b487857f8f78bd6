"""Measure the default model: held-out masked-diffusion bound and a unigram baseline.

The bound is the MDLM/LLaDA negative ELBO in nats per token on whole held-out stdlib files cut
into fixed windows, estimated with a fixed t grid and seeded masks so numbers compare across
runs. Completion compile-rate needs the engine's sampler and lives elsewhere (TODO).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from model.default import CHECKPOINT_DIR
from model.default.corpus import encode_files, read_sources, split_files
from model.default.objective import masked_loss, noise
from model.transformer import Denoiser

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
    """Nats/token upper bound: mean over windows [N, L] and a midpoint t grid of the loss."""
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
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = masked_loss(model, batch, canvas, masked, eligible, t)
            total += float(loss) * len(batch)
            count += len(batch)
    model.train(was_training)
    return total / count


def unigram_nats(train: list[np.ndarray], heldout: torch.Tensor, vocab_size: int) -> float:
    """Held-out nats/token of add-one-smoothed train unigram frequencies (the floor to beat)."""
    counts = np.bincount(np.concatenate(train), minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout.numpy().ravel()].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description="Held-out bound of a Marble checkpoint")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT_DIR))
    parser.add_argument("--n-t", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from model.loader import load_model

    folder = Path(args.checkpoint)
    model = load_model(folder, progress=False)
    cfg = model.cfg
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    train_paths, held_paths = split_files()
    held = encode_files(tok, read_sources(held_paths), cfg.eos_token_id)
    x0 = windows(held, cfg.max_seq_len)
    if args.max_windows:
        x0 = x0[:: max(1, len(x0) // args.max_windows)][: args.max_windows]
    bound = heldout_bound(model, x0, cfg.mask_token_id, n_t=args.n_t)
    train = encode_files(tok, read_sources(train_paths), cfg.eos_token_id)
    result = {
        "heldout_windows": len(x0),
        "heldout_tokens": x0.numel(),
        "heldout_bound_nats_per_token": round(bound, 4),
        "unigram_nats_per_token": round(unigram_nats(train, x0, cfg.vocab_size), 4),
        # TODO: share of completions that compile, via scheduler.engine's offline generate().
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
