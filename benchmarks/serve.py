"""Serving benchmark: N concurrent clients over HTTP vs the same load on the in-process engine.

Both paths do identical work: one explicit parameter set (every `SamplingParams` field given,
so no checkpoint's serving defaults apply) is sent as the HTTP body and given to the in-process
engine, and the server's `request.queued` echo of its parameters is checked against it. Each
of N clients sends R requests one after another through `POST /v1/diffusion/generate` (native
step stream) to a real `python -m marble.server` on 127.0.0.1, and records the time to the first
`step` event and to `request.completed`. The baseline drives the same requests through
`Engine.step()` in this process with N requests kept in flight. Printed per N: throughput
(completion tokens/s, requests/s), p50/p99 latency, p50 time to first step, the share of wall
time spent inside `Engine.step()` ("busy"; for HTTP from the server's /metrics), each the
median over the repeats, and the ratio of the median throughputs, in-process / HTTP (1.00 = no
serving overhead; the target is <= 1.10).

    python benchmarks/serve.py                      # the embedded default model
    python benchmarks/serve.py --model ../shared/reference/llada-tiny --clients 1,4,16
    python benchmarks/serve.py --preset small       # a random-weight "small" Marble model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from local_server import local_server
from same_work import SERVER_ENV, scheduler_config

from marble.families.masked.config import preset
from marble.families.masked.model import Denoiser
from marble.model.default import CHECKPOINT_DIR
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams
from marble.server.settings import default_torch_threads

REPO = Path(__file__).resolve().parents[1]

LEGEND = """\
  N         concurrent clients, each sending its requests one after another
  tok/s     completion tokens / wall seconds of the run (median over the repeats)
  req/s     requests completed / wall seconds of the run
  p50, p99  request latency in seconds, submit to completion (HTTP: to request.completed)
  TTFS ms   median time to the first denoising step (HTTP: to the first `step` event)
  busy      share of the run's wall time spent inside Engine.step() (HTTP: server /metrics)
  ratio     median engine tok/s / median HTTP tok/s: serving overhead (1.00 = none)"""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


@dataclass
class Result:
    seconds: float
    latencies: list[float]
    first_steps: list[float]
    tokens: int
    step_seconds: float = 0.0  # time inside Engine.step(): the rest is serving overhead

    @property
    def requests(self) -> int:
        return len(self.latencies)

    def row(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        return {
            "tok_s": self.tokens / self.seconds,
            "req_s": self.requests / self.seconds,
            "p50": statistics.median(lat),
            "p99": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
            "ttfs": statistics.median(self.first_steps),
            "busy": self.step_seconds / self.seconds,
        }


def median_row(results: list[Result]) -> dict[str, float]:
    rows = [r.row() for r in results]
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def synth_checkpoint(folder: Path, tokenizer_from: Path, name: str) -> Path:
    """A random-weight Marble checkpoint of a named preset, with a reference tokenizer."""
    from safetensors.torch import save_file

    special = json.loads((tokenizer_from / "config.json").read_text())
    cfg = preset(
        name,
        mask_token_id=special["mask_token_id"],
        eos_token_id=special["eos_token_id"],
        pad_token_id=special["pad_token_id"],
        max_seq_len=1024,
    )
    torch.manual_seed(0)
    model = Denoiser(cfg)
    model.init_weights()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    for file in TOKENIZER_FILES:
        if (tokenizer_from / file).exists():
            shutil.copy(tokenizer_from / file, folder / file)
    return folder


def prompts(count: int) -> list[str]:
    return [f"Request {i}: write a short note about diffusion." for i in range(count)]


# ------------------------------------------------------------------------- in-process
def run_in_process(engine: Engine, params: SamplingParams, clients: int, per_client: int) -> Result:
    """N closed-loop clients: each submits its next request when the previous finishes."""
    texts = prompts(clients * per_client)
    queue = [texts[c * per_client : (c + 1) * per_client] for c in range(clients)]
    started: dict[str, float] = {}
    owner: dict[str, int] = {}
    latencies, first_steps, tokens = [], [], 0
    seen_first: set[str] = set()

    def submit(client: int) -> None:
        if queue[client]:
            request = engine.add(engine.make_request(queue[client].pop(0), params))
            started[request.request_id] = time.perf_counter()
            owner[request.request_id] = client

    t0 = time.perf_counter()
    for c in range(clients):
        submit(c)
    step_seconds = 0.0
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        step_seconds += time.perf_counter() - start
        for out in outputs:
            now = time.perf_counter()
            rid = out.request_id
            if rid not in seen_first and out.step > 0:
                seen_first.add(rid)
                first_steps.append(now - started[rid])
            if out.finished:
                latencies.append(now - started[rid])
                tokens += out.completion_tokens
                submit(owner[rid])
    return Result(time.perf_counter() - t0, latencies, first_steps, tokens, step_seconds)


# ------------------------------------------------------------------------------- HTTP
async def _client(
    http: httpx.AsyncClient, url: str, body: dict, texts: list[str], result: Result
) -> None:
    for text in texts:
        t0 = time.perf_counter()
        first = None
        async with http.stream("POST", url, json={**body, "prompt": text}) as r:
            r.raise_for_status()
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    if event == "step" and first is None:
                        first = time.perf_counter() - t0
                elif line.startswith("data: ") and event == "request.queued":
                    # The server must run exactly what the engine runs (it shows the fields
                    # its model reads).
                    served = json.loads(line[6:])["params"]
                    if any(served[k] != body[k] for k in served):
                        raise RuntimeError(f"the server ran {served}, not the body {body}")
                elif line.startswith("data: ") and event == "request.completed":
                    done = json.loads(line[6:])
                    result.tokens += done["usage"]["completion_tokens"]
        result.latencies.append(time.perf_counter() - t0)
        result.first_steps.append(first if first is not None else float("nan"))


def server_step_seconds(base: str) -> float:
    """Total time the server's engine thread spent in steps (from its /metrics)."""
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("marble_step_duration_seconds_sum "):
            return float(line.split()[1])
    raise RuntimeError("no marble_step_duration_seconds_sum in /metrics")


async def run_http(base: str, body: dict, clients: int, per_client: int) -> Result:
    texts = prompts(clients * per_client)
    result = Result(0.0, [], [], 0)
    busy_before = server_step_seconds(base)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                _client(
                    http,
                    f"{base}/v1/diffusion/generate",
                    body,
                    texts[c * per_client : (c + 1) * per_client],
                    result,
                )
                for c in range(clients)
            )
        )
        result.seconds = time.perf_counter() - t0
    result.step_seconds = server_step_seconds(base) - busy_before
    return result


def server(model: Path, port: int, threads: int, max_batch: int, device: str):
    flags = ["--model", str(model), "--log-level", "warning", "--torch-threads", str(threads)]
    flags += ["--max-batch-size", str(max_batch), "--device", device, "--dtype", "float32"]
    return local_server(flags, port=port, env=SERVER_ENV)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=CHECKPOINT_DIR,
        help="checkpoint folder (default: the embedded default model)",
    )
    parser.add_argument(
        "--preset", help="synthesise a random-weight checkpoint of this preset instead of --model"
    )
    parser.add_argument(
        "--tokenizer-from",
        type=Path,
        default=REPO.parent / "shared" / "reference" / "llada-tiny",
        help="tokenizer for a --preset checkpoint",
    )
    parser.add_argument("--clients", default="1,4,16", help="values of N (default 1,4,16)")
    parser.add_argument("--requests-per-client", type=int, default=4, help="R (default 4)")
    parser.add_argument("--max-tokens", type=int, default=64, help="per request (default 64)")
    parser.add_argument("--steps", type=int, default=32, help="forwards per request (default 32)")
    parser.add_argument("--block-length", type=int, default=32, help="(default 32)")
    parser.add_argument("--cache", default="dual", help="none, prefix or dual (default dual)")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_torch_threads(),
        help="torch threads, here and in the server (default: the server's, every core but one)",
    )
    parser.add_argument("--port", type=int, default=8765, help="server port (default 8765)")
    parser.add_argument("--device", default="cpu", help="both paths (default cpu)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs per N; medians are printed"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.preset:
            model = synth_checkpoint(Path(tmp) / args.preset, args.tokenizer_from, args.preset)
        clients = [int(c) for c in args.clients.split(",")]
        # One explicit parameter set for both paths: every field given, so neither side falls
        # back on the checkpoint's serving defaults (the embedded model's are T=1 with token
        # healing); those the benchmark does not choose are SamplingParams' own. The HTTP body
        # is this dict; the engine gets SamplingParams built from it.
        body = SamplingParams().to_dict() | {
            "max_tokens": args.max_tokens,
            "steps": args.steps,
            "block_length": args.block_length,
            "threshold": None,  # fixed step count: `steps` forwards per request
            "remasking": "low_confidence",
            "schedule": "llada",
            "temperature": 0.0,
            "top_k": 0,
            "top_p": 1.0,
            "cfg_scale": 0.0,
            "seed": None,
            "stop": [],
            "ignore_eos": True,  # every request does the same work
            "token_healing": False,
            "cache": args.cache,
        }
        params = SamplingParams.from_dict(body)
        engine = Engine.from_pretrained(
            model,
            device=args.device,
            config=scheduler_config(max_batch_size=max(clients)),
            progress=False,
        )
        print(
            f"model {model}: {sum(p.numel() for p in engine.model.parameters()) / 1e6:.2f} M "
            f"params; {args.max_tokens} tokens in {args.steps} steps per request (greedy, "
            f"EOS ignored, no healing, same explicit params on both paths); "
            f"{args.requests_per_client} requests per client; torch threads {args.threads}; "
            f"cpu cores {os.cpu_count()}; device {args.device}; median of {args.repeats} runs"
        )
        run_in_process(engine, params, 1, 1)  # warm-up
        rows = []
        with server(model, args.port, args.threads, max(clients), args.device) as (base, _):
            asyncio.run(run_http(base, body, 1, 1))  # warm-up
            for n in clients:
                # Alternate the two so drifting background load hits both alike.
                locals_, remotes = [], []
                for _ in range(args.repeats):
                    locals_.append(run_in_process(engine, params, n, args.requests_per_client))
                    remotes.append(asyncio.run(run_http(base, body, n, args.requests_per_client)))
                local, remote = median_row(locals_), median_row(remotes)
                rows.append((n, local, remote, local["tok_s"] / remote["tok_s"]))
        header = (
            f"{'N':>3} | {'HTTP tok/s':>10} {'req/s':>6} {'p50 s':>7} {'p99 s':>7} "
            f"{'TTFS ms':>8} {'busy':>5} | {'engine tok/s':>12} {'req/s':>6} {'p50 s':>7} "
            f"{'p99 s':>7} {'TTFS ms':>8} {'busy':>5} | {'ratio':>5}"
        )
        print(header)
        print("-" * len(header))
        for n, local, remote, ratio in rows:
            print(
                f"{n:>3} | {remote['tok_s']:>10.1f} {remote['req_s']:>6.2f} {remote['p50']:>7.3f} "
                f"{remote['p99']:>7.3f} {remote['ttfs'] * 1e3:>8.1f} {remote['busy']:>5.0%} | "
                f"{local['tok_s']:>12.1f} {local['req_s']:>6.2f} {local['p50']:>7.3f} "
                f"{local['p99']:>7.3f} {local['ttfs'] * 1e3:>8.1f} {local['busy']:>5.0%} | "
                f"{ratio:>5.2f}"
            )
        print(LEGEND)


if __name__ == "__main__":
    main()
