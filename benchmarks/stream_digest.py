"""Fingerprint Marble's responses on fixed seeds, to show that a change leaves them unchanged.

Starts `marble serve` (the command given, so an older checkout can be run the same way), sends
a fixed list of requests one at a time (native streams, attach and resume, the dashboard
replay, OpenAI streams and bodies, chat on a checkpoint with a template), and writes each raw
response body to `--out`, with a sha256 per request. Only what the wall clock decides is
masked before hashing: request ids (each becomes its case's name), `created`, the
`timings`/`queue_s` seconds and SSE ping comments.
Run it before and after a change with the same arguments and compare the digests.

    python benchmarks/stream_digest.py --out /tmp/after
    python benchmarks/stream_digest.py --out /tmp/after-chat --model ../shared/reference/dream-tiny
    python /path/to/new/benchmarks/stream_digest.py --out /tmp/before \\
        --serve "python -m server" --cwd /path/to/old/checkout      # before the `marble` name
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import httpx
from local_server import local_server

_MASKS = [
    (re.compile(rb'"created":\s?\d+'), b'"created":0'),
    (
        re.compile(rb'"(queue_s|time_to_first_step_s|time_to_first_text_s|total_s)":\s?[-0-9.e]+'),
        rb'"\1":0',
    ),
    (re.compile(rb"^: ping.*\r?\n", re.M), b""),
]


def mask(body: bytes) -> bytes:
    for pattern, replacement in _MASKS:
        body = pattern.sub(replacement, body)
    return body


def native_cases() -> list[tuple[str, str, str, dict | None]]:
    """(name, method, path, body): run in this order, each after the previous one ended."""
    base = {"max_tokens": 48, "block_length": 16, "seed": 7}
    return [
        (
            "gen-greedy",
            "POST",
            "/v1/diffusion/generate",
            {**base, "prompt": "def add(a, b):\n", "temperature": 0.0, "draft_every": 1},
        ),
        (
            "gen-sampled-n2",
            "POST",
            "/v1/diffusion/generate",
            {**base, "prompt": "import os\n", "temperature": 0.8, "top_p": 0.9, "n": 2},
        ),
        (
            "gen-steps-stop",
            "POST",
            "/v1/diffusion/generate",
            {**base, "prompt": "class Stack:\n", "steps": 24, "stop": ["\n\n"], "diffusing": True},
        ),
        (
            "gen-ids-suffix",
            "POST",
            "/v1/diffusion/generate",
            {**base, "prompt": [10, 11, 12, 13], "suffix": "\nreturn x\n", "threshold": 0.7},
        ),
        ("attach", "GET", "/v1/diffusion/requests/{gen-greedy}/events", None),
        (
            "attach-resume",
            "GET",
            "/v1/diffusion/requests/{gen-sampled-n2}/events?last_event_id=5",
            None,
        ),
        (
            "cmpl-json",
            "POST",
            "/v1/completions",
            {**base, "prompt": ["x = 1\n", "for i in"], "echo": True, "logprobs": 1},
        ),
        (
            "cmpl-stream",
            "POST",
            "/v1/completions",
            {
                **base,
                "prompt": "def f():\n",
                "stream": True,
                "logprobs": 0,
                "stream_options": {"include_usage": True},
                "temperature": 0.5,
            },
        ),
        (
            "cmpl-diffusing",
            "POST",
            "/v1/completions",
            {**base, "prompt": "while True:\n", "stream": True, "diffusing": True},
        ),
        ("bad-top-p", "POST", "/v1/completions", {"prompt": "x", "top_p": 0}),
        ("bad-max-tokens", "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1 << 30}),
        ("models", "GET", "/v1/models", None),
        ("dashboard-replay", "GET", "/v1/diffusion/events?last_event_id=0", None),
    ]


def chat_cases() -> list[tuple[str, str, str, dict | None]]:
    base = {"max_tokens": 24, "block_length": 8, "seed": 3}
    messages = [{"role": "user", "content": "Say hello."}]
    return [
        (
            "chat-json",
            "POST",
            "/v1/chat/completions",
            {**base, "messages": messages, "logprobs": True, "top_logprobs": 1, "n": 2},
        ),
        (
            "chat-stream",
            "POST",
            "/v1/chat/completions",
            {
                **base,
                "messages": messages,
                "stream": True,
                "temperature": 0.7,
                "stream_options": {"include_usage": True},
            },
        ),
        (
            "chat-gen",
            "POST",
            "/v1/diffusion/generate",
            {**base, "prompt": "hello", "temperature": 0.0},
        ),
        # The model's own block or canvas (a canvas model refuses any other): sampled, two
        # choices in one batch.
        (
            "chat-own-block",
            "POST",
            "/v1/chat/completions",
            {"max_tokens": 24, "seed": 5, "messages": messages, "temperature": 1.0, "n": 2},
        ),
        (
            "chat-own-block-stream",
            "POST",
            "/v1/chat/completions",
            {"max_tokens": 24, "seed": 6, "messages": messages, "stream": True},
        ),
    ]


def fetch(
    client: httpx.Client, ids: dict[str, str], name: str, method: str, path: str, body: dict | None
) -> bytes:
    """The status line and raw body, each request id the server made replaced by its case name
    (ids are random); `{case}` in a path stands for that case's id."""
    for case, request_id in ids.items():
        path = path.replace("{" + case + "}", request_id)
    # The dashboard stream never ends: its replay is over once it has been quiet for a while.
    quiet = httpx.Timeout(120, read=2.0) if path.startswith("/v1/diffusion/events") else None
    chunks = []
    with client.stream(method, path, json=body, timeout=quiet or 120) as r:
        ids[name] = r.headers["x-request-id"]
        try:
            for chunk in r.iter_bytes():
                chunks.append(chunk)
        except httpx.ReadTimeout:
            if quiet is None:
                raise
    raw = f"{r.status_code}\n".encode() + b"".join(chunks)
    for case, request_id in ids.items():
        raw = raw.replace(request_id.encode(), case.encode())
    return raw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: embedded)")
    parser.add_argument(
        "--serve",
        default=f"{sys.executable} -m marble.server",
        help="the command that starts `marble serve` (flags are appended)",
    )
    parser.add_argument("--cwd", default=None, help="where to run it")
    args = parser.parse_args()
    flags = ["--torch-threads", "1", "--log-level", "warning"]
    if args.model:
        flags += ["--model", str(Path(args.model).resolve())]
    cases = chat_cases() if args.model else native_cases()
    args.out.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    ids: dict[str, str] = {}
    with local_server(flags, command=args.serve.split(), cwd=args.cwd) as (url, _):
        with httpx.Client(base_url=url, timeout=120) as client:
            for name, method, path, body in cases:
                raw = mask(fetch(client, ids, name, method, path, body))
                (args.out / f"{name}.txt").write_bytes(raw)
                digests[name] = hashlib.sha256(raw).hexdigest()[:16]
                print(f"{name:18} {len(raw):7d} bytes  {digests[name]}")
    (args.out / "digests.json").write_text(json.dumps(digests, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
