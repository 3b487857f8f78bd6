"""Marble against the PyPI peer server `dlmserve`, over HTTP, on one random LLaDA-8B-shaped model.

The checkpoint is issue 12's: preset `llada-vocab` (LLaDA-8B's 126,464-token vocabulary and 32
layers, d_model 512), random weights (seed 0), with the reference tokenizer rewritten so that
`<|mdm_mask|>` is id 126,336, the id dlmserve hard-codes. It is exported twice into a temp
folder, sharing the weight file: as a Marble checkpoint, and as a `transformers` remote-code
checkpoint (`benchmarks/peer_llada/`) whose model is Marble's own `Denoiser`, so both servers
run the same transformer and the figures compare serving and sampling, not kernels.

Each server runs alone on 127.0.0.1 in turn; N clients send their requests one after another
to `/v1/chat/completions` (same chat prompt, T=0, `max_tokens` 64 in blocks of 32; every
request writes all 64 tokens, so Marble's get `ignore_eos`, as dlmserve has no EOS stop).
Completion tokens come from the responses' `usage`. Settings:
  marble default     Marble's own (threshold 0.9, dual KV cache), at float32 (its CPU default)
                     and bfloat16
  steps S, no cache  like-for-like work on both servers: S full forwards per request
  dlmserve default   its algorithm, one token per step (num_denoising_steps 64), in bfloat16
                     (its only CPU dtype). Each of its steps is a full forward of the same
                     canvas whatever the step count, so this row is projected from its
                     measured steps-S row; `--fixed-steps 64` measures it outright (hours on
                     two shared CPU cores, where one bfloat16 step takes seconds)

    python benchmarks/peers.py --peer-python /tmp/peer-venv/bin/python
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from local_server import local_server
from safetensors.torch import save_file

import marble.model
from marble.families.masked.config import preset
from marble.families.masked.model import Denoiser

REPO = Path(__file__).resolve().parents[1]
ADAPTER = Path(__file__).resolve().parent / "peer_llada"
TOKENIZER_FROM = REPO.parent / "shared" / "reference" / "llada-tiny"
PRESET = "llada-vocab"
PEER_MASK_ID = 126336  # dlmserve refuses a tokenizer whose <|mdm_mask|> is any other id
MASK_TOKEN = "<|mdm_mask|>"
COPIED = ("special_tokens_map.json", "generation_config.json")


# ------------------------------------------------------------------------------ export
def peer_tokenizer(source: Path, folder: Path) -> None:
    """The reference tokenizer with MASK_TOKEN moved to PEER_MASK_ID, every other id kept.

    `tokenizers` numbers added tokens after the model vocabulary, so an added token cannot
    sit at a far id alone: every added token also enters the BPE vocabulary at its own id."""
    tok = json.loads((source / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] == MASK_TOKEN:
            added["id"] = PEER_MASK_ID
        tok["model"]["vocab"][added["content"]] = added["id"]
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = json.loads((source / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        str(PEER_MASK_ID if entry["content"] == MASK_TOKEN else int(key)): entry
        for key, entry in cfg.get("added_tokens_decoder", {}).items()
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    for name in COPIED:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)


def export(root: Path, tokenizer_from: Path) -> tuple[Path, Path]:
    """-> (Marble checkpoint, transformers checkpoint): one model, one tokenizer, one file of
    weights (the second folder links to the first's)."""
    special = json.loads((tokenizer_from / "config.json").read_text())
    cfg = preset(
        PRESET,
        mask_token_id=PEER_MASK_ID,
        eos_token_id=special["eos_token_id"],
        pad_token_id=special["pad_token_id"],
    )
    torch.manual_seed(0)  # the same model benchmarks/cache.py builds for this preset
    model = Denoiser(cfg)
    model.init_weights()
    ours, peer = root / "marble", root / "peer"
    ours.mkdir(parents=True)
    peer.mkdir()
    (ours / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, ours / "model.safetensors"
    )
    del model
    peer_tokenizer(tokenizer_from, ours)
    for path in ours.iterdir():
        if path.name != "config.json":
            (peer / path.name).symlink_to(path)
    for source in ADAPTER.glob("*.py"):
        shutil.copy(source, peer / source.name)
    hf_config = {
        "architectures": ["MarbleDenoiserModel"],
        "model_type": "marble_denoiser",
        "auto_map": {
            "AutoConfig": "configuration_marble_denoiser.MarbleDenoiserConfig",
            "AutoModel": "modeling_marble_denoiser.MarbleDenoiserModel",
        },
        "marble": cfg.to_json_dict(),
        "vocab_size": cfg.vocab_size,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }
    (peer / "config.json").write_text(json.dumps(hf_config, indent=2))
    return ours, peer


# ------------------------------------------------------------------------------ load
@dataclass
class Run:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    cpu_seconds: float = 0.0  # the server process's, all threads: less swayed by other load

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def tok_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds


async def _client(http: httpx.AsyncClient, url: str, bodies: list[dict], run: Run) -> None:
    for body in bodies:
        t0 = time.perf_counter()
        response = await http.post(url, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")
        run.tokens += response.json()["usage"]["completion_tokens"]
        run.latencies.append(time.perf_counter() - t0)


async def drive(base: str, body: dict, clients: int, per_client: int, timeout_s: float) -> Run:
    """`clients` closed-loop clients, each sending `per_client` chat requests in turn."""
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        model = (await http.get(f"{base}/v1/models")).json()["data"][0]["id"]
        bodies = [{"model": model, **body} for _ in range(per_client)]
        url, run = f"{base}/v1/chat/completions", Run()
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(http, url, bodies, run) for _ in range(clients)))
        run.seconds = time.perf_counter() - t0
    return run


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples over all its labels."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ----------------------------------------------------------------------------- servers
@dataclass
class Server:
    """One server process to start, and where its /metrics count batched rows and steps."""

    name: str
    dtype: str
    command: list[str] | None  # None: `python -m marble.server`
    flags: list[str]
    env: dict[str, str]
    rows_metric: str
    steps_metric: str
    warmup: dict
    settings: dict[str, dict] = field(default_factory=dict)  # setting -> its body fields

    def batch(self, before: str, after: str) -> tuple[float, float]:
        """(steps run, mean rows per step) between two /metrics scrapes."""
        steps = metric(after, self.steps_metric) - metric(before, self.steps_metric)
        rows = metric(after, self.rows_metric) - metric(before, self.rows_metric)
        return steps, rows / max(steps, 1.0)


def servers(ours: Path, peer: Path, work: Path, args: argparse.Namespace) -> list[Server]:
    """Marble at each of `--marble-dtypes`, then dlmserve, with the settings each runs."""
    fixed = args.fixed_steps
    marble_server = dict(
        command=None,
        env={},
        rows_metric="marble_forwards_total",
        steps_metric="marble_denoising_steps_total",
        warmup={"max_tokens": 32, "block_length": 32, "steps": 2},  # a full and a cached forward
        settings={
            "default": {"ignore_eos": True},
            f"steps {fixed}, cache none": {"ignore_eos": True, "steps": fixed, "cache": "none"},
        },
    )
    flags = ["--model", str(ours), "--log-level", "warning"]
    pylib = work / "pylib" / "marble"  # `marble.model` alone, for the adapter's imports
    pylib.mkdir(parents=True)
    (pylib / "model").symlink_to(Path(marble.model.__path__[0]), target_is_directory=True)
    return [
        *(
            Server("marble", dtype, flags=[*flags, "--dtype", dtype], **marble_server)
            for dtype in args.marble_dtypes
        ),
        Server(
            "dlmserve",
            "bfloat16",
            command=[args.peer_python, "-m", "uvicorn", "dlmserve.api.server:app"],
            flags=["--log-level", "warning"],
            env={
                "DLMSERVE_MODEL": str(peer),
                "DLMSERVE_DTYPE": "bf16",  # on CPU its only choice (int4 needs CUDA)
                "DLMSERVE_DEVICE": "cpu",
                "DLMSERVE_LOG_LEVEL": "warning",
                "PYTHONPATH": str(work / "pylib"),
                "HF_HOME": str(work / "hf"),
                "HF_HUB_OFFLINE": "1",
            },
            rows_metric="dlmserve_step_batch_size_sum",
            steps_metric="dlmserve_step_batch_size_count",
            warmup={"max_tokens": 32, "block_length": 32, "num_denoising_steps": 1},
            settings={f"steps {fixed}": {"num_denoising_steps": fixed}},
        ),
    ]


# -------------------------------------------------------------------------------- main
@dataclass
class Row:
    server: str
    setting: str
    dtype: str
    clients: int
    runs: list[Run] = field(default_factory=list)
    steps: float = 0.0
    batch: float = 0.0
    scale: float = 1.0  # projected rows: measured tok/s times this (1.0: measured)

    @property
    def tok_s(self) -> float:
        return statistics.median(r.tok_s for r in self.runs) * self.scale

    @property
    def tok_cpu_s(self) -> float:
        return statistics.median(r.tok_cpu_s for r in self.runs) * self.scale

    @property
    def p50(self) -> float:
        return statistics.median(x for r in self.runs for x in r.latencies) / self.scale


def measure(server: Server, work: Path, rows: dict, args: argparse.Namespace) -> None:
    log = work / f"{server.name}-{server.dtype}.log"
    common = {"messages": [{"role": "user", "content": args.prompt}], "temperature": 0.0}
    common |= {"max_tokens": args.max_tokens, "block_length": args.block_length}
    with log.open("a") as output:
        try:
            context = local_server(
                server.flags, command=server.command, cwd=str(work), env=server.env, output=output
            )
            with context as (base, proc):
                asyncio.run(drive(base, {**common, **server.warmup}, 1, 1, args.timeout_s))
                for clients in args.clients:
                    for setting, fields in server.settings.items():
                        key = (server.name, setting, server.dtype, clients)
                        row = rows.setdefault(key, Row(*key))
                        before = httpx.get(f"{base}/metrics").text
                        cpu = cpu_seconds(proc.pid)
                        body = {**common, **fields}
                        run = asyncio.run(
                            drive(base, body, clients, args.requests_per_client, args.timeout_s)
                        )
                        row.steps, row.batch = server.batch(
                            before, httpx.get(f"{base}/metrics").text
                        )
                        run.cpu_seconds = cpu_seconds(proc.pid) - cpu
                        row.runs.append(run)
                        print(
                            f"  {server.name} {server.dtype} {setting}, {clients} clients: "
                            f"{run.tokens} tokens in {run.seconds:.1f} s",
                            flush=True,
                        )
        except BaseException:
            output.flush()
            print(f"--- {log} (tail) ---\n{log.read_text()[-3000:]}")
            raise


def project(rows: dict, max_tokens: int, fixed: int) -> None:
    """dlmserve's default, one token per step, from its `fixed`-step rows: each of its steps
    is one full forward of the same canvas whatever the step count, so tokens/s scale by
    fixed / max_tokens and latency by the inverse (measured outright when they are equal)."""
    for (name, setting, dtype, clients), row in list(rows.items()):
        if name == "dlmserve" and setting == f"steps {fixed}" and fixed != max_tokens:
            projected = Row(name, f"default: steps {max_tokens}", dtype, clients, row.runs)
            projected.steps = row.steps * max_tokens / fixed
            projected.batch, projected.scale = row.batch, fixed / max_tokens
            rows[(name, projected.setting, dtype, clients)] = projected


LEGEND = """\
  N          concurrent clients, each sending its requests one after another
  tok/s      completion tokens (from `usage`) / wall seconds of the run
  tok/cpu-s  completion tokens / CPU seconds the server process used in the run
  p50 s      median request latency
  steps      denoising steps the server ran (its /metrics); batch: rows per step
  projected  dlmserve's one-token-per-step default from its measured fixed-step rows"""


def report(rows: dict, clients: list[int], max_tokens: int, fixed: int) -> None:
    print(
        f"\n{'server':9} {'dtype':9} {'setting':20} {'N':>2} {'tok/s':>7} {'tok/cpu-s':>9} "
        f"{'p50 s':>7} {'steps':>5} {'batch':>5}  how"
    )
    for (name, setting, dtype, n), row in sorted(rows.items(), key=lambda kv: kv[0][0] != "marble"):
        how = "measured" if row.scale == 1 else f"projected from steps {fixed}"
        print(
            f"{name:9} {dtype:9} {setting:20} {n:>2} {row.tok_s:>7.2f} {row.tok_cpu_s:>9.2f} "
            f"{row.p50:>7.1f} {row.steps:>5.0f} {row.batch:>5.2f}  {how}"
        )
    print(LEGEND)
    peer_default = f"steps {max_tokens}" if fixed == max_tokens else f"default: steps {max_tokens}"
    pairs = [("default", peer_default), (f"steps {fixed}, cache none", f"steps {fixed}")]
    print("\nMarble / dlmserve (bfloat16), tok/s (tok/cpu-s)")
    for ours, theirs in pairs:
        for dtype in dict.fromkeys(key[2] for key in rows if key[0] == "marble"):
            cells = []
            for n in clients:
                a = rows.get(("marble", ours, dtype, n))
                b = rows.get(("dlmserve", theirs, "bfloat16", n))
                if a and b:
                    wall, cpu = a.tok_s / b.tok_s, a.tok_cpu_s / b.tok_cpu_s
                    cells.append(f"N={n}: {wall:5.2f} ({cpu:5.2f})")
            print(f"  marble {ours:20} {dtype:9} / dlmserve {theirs:16} {'   '.join(cells)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", required=True, help="python of a venv with dlmserve")
    parser.add_argument("--clients", default="1,8", help="values of N (default 1,8)")
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument(
        "--fixed-steps",
        type=int,
        default=2,
        help="steps of the like-for-like rows (default 2; 64 is one token per step, hours here)",
    )
    parser.add_argument("--prompt", default="Write a short note about diffusion models.")
    parser.add_argument(
        "--marble-dtypes",
        default="float32,bfloat16",
        help="Marble's runs (float32 is its CPU default; bfloat16 at 8 clients takes most of "
        "the time here)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the servers")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per request")
    parser.add_argument("--tokenizer-from", type=Path, default=TOKENIZER_FROM)
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.marble_dtypes = args.marble_dtypes.split(",")
    blocks = args.max_tokens // args.block_length
    if args.max_tokens % args.block_length or args.fixed_steps % blocks:
        parser.error("max_tokens must be whole blocks and --fixed-steps a multiple of them")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="marble-peers-") as tmp:
        work = Path(tmp)
        ours, peer = export(work / "checkpoint", args.tokenizer_from)
        print(
            f"{PRESET}: random weights, vocab 126,464, mask id {PEER_MASK_ID}; "
            f"{args.max_tokens} tokens in blocks of {args.block_length}, T=0; "
            f"{args.requests_per_client} request(s) per client; cpu cores {os.cpu_count()}",
            flush=True,
        )
        rows: dict = {}
        plan = servers(ours, peer, work, args)
        for _ in range(args.repeats):  # servers alternate, so drifting load hits each alike
            for server in plan:
                measure(server, work, rows, args)
        project(rows, args.max_tokens, args.fixed_steps)
        report(rows, args.clients, args.max_tokens, args.fixed_steps)
    print(f"\nwall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
