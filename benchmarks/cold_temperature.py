"""Where the samplers' plain quotient logits / T breaks, and what it gives above that: the
measurement behind `marble.model.sampling.COLD_TEMPERATURE`.

For each sampled family (LLaDA2's joint rule, DiffusionGemma's entropy bound) it completes the
same prompts, seeds and samplers (plain, top-k 3, top-p 0.5) once at the limit (a temperature
below the floor) and then, with the floor set to 0 so every T > 0 takes the plain quotient, at
each temperature of `--temperatures`. Prints per temperature how many completions failed (inf
or NaN in the sampler) and how many equal the limit's text token for token. The floor is sound
where the quotient still equals the limit just above it and fails some decades below it.

    python benchmarks/cold_temperature.py       # ~1 min on a CPU, the tiny checkpoints
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import marble.model.sampling as sampling  # noqa: E402
from tests.golden_cases import REFERENCE  # noqa: E402
from tests.server_helpers import serving  # noqa: E402

FAMILIES = ("llada2-tiny", "diffusiongemma-tiny")
SAMPLERS = ({}, {"top_k": 3}, {"top_p": 0.5})
TEMPERATURES = "1e-10,1e-20,1e-25,1e-30,1e-33,1e-35,1e-36,1e-37,1e-38,1e-40"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--temperatures", default=TEMPERATURES, help="comma-separated")
    p.add_argument("--seeds", type=int, default=5, help="seeds per sampler")
    p.add_argument("--max-tokens", type=int, default=32)
    return p.parse_args()


async def completions(client: object, t: float, args: argparse.Namespace) -> list[str]:
    """Every seed and sampler's text at temperature `t` (an error's status instead)."""
    out = []
    for seed in range(1, args.seeds + 1):
        for sampler in SAMPLERS:
            body = {"prompt": "Why is the sky blue?", "max_tokens": args.max_tokens}
            body |= {"seed": seed, "temperature": t, **sampler}
            r = await client.post("/v1/completions", json=body)  # type: ignore[attr-defined]
            ok = r.status_code == 200
            out.append(r.json()["choices"][0]["text"] if ok else f"HTTP {r.status_code}")
    return out


async def main(args: argparse.Namespace) -> None:
    temperatures = [float(t) for t in args.temperatures.split(",")]
    floor = sampling.COLD_TEMPERATURE
    print(f"COLD_TEMPERATURE = {floor:g}")
    for family in FAMILIES:
        async with serving(REFERENCE / family) as (_, client):
            sampling.COLD_TEMPERATURE = floor
            limit = await completions(client, floor / 1e10, args)
            sampling.COLD_TEMPERATURE = 0.0
            try:
                for t in temperatures:
                    got = await completions(client, t, args)
                    failed = sum(g.startswith("HTTP") for g in got)
                    same = sum(g == want for g, want in zip(got, limit, strict=True))
                    print(
                        f"{family:20s} T={t:7.0e}  plain quotient: failed {failed:2d}/{len(got)}"
                        f", equals the limit {same:2d}/{len(got)}"
                    )
            finally:
                sampling.COLD_TEMPERATURE = floor


if __name__ == "__main__":
    torch.set_num_threads(1)
    asyncio.run(main(parse_args()))
