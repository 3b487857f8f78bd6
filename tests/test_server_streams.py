"""Native step streams in-process: event order and invariants, `Last-Event-ID` resume, slow
subscribers, and that a disconnecting client aborts its request within two steps."""

from __future__ import annotations

import asyncio
import json

import pytest

from marble.server.event_log import Event
from marble.server.subscriber import Subscriber
from tests.server_helpers import parse_sse, serving

pytestmark = pytest.mark.anyio

LIFECYCLE_ORDER = ["request.queued", "request.started"]


async def generate(client, **body):
    r = await client.post("/v1/diffusion/generate", json=body)
    assert r.status_code == 200, r.text
    return r, parse_sse(r.text)


async def test_generate_event_sequence_and_invariants(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        body = {"prompt": "Hello", "max_tokens": 16, "steps": 8, "block_length": 8}
        r, events = await generate(client, ignore_eos=True, draft_every=2, **body)
        rid = r.headers["x-request-id"]
        names = [e.event for e in events]
        assert names[:2] == LIFECYCLE_ORDER and names[-1] == "request.completed"
        assert names.count("block.committed") == 2
        datas = [e.json() for e in events]
        assert [int(e.id) for e in events] == [d["sequence_number"] for d in datas]
        assert [d["sequence_number"] for d in datas] == list(range(1, len(events) + 1))
        assert all(d["type"] == e.event and d["request_id"] == rid for d, e in zip(datas, events))
        steps = [d for d in datas if d["type"] == "step"]
        assert [s["step"] for s in steps] == list(range(1, 9))
        assert all(s["total_steps"] == 8 for s in steps)
        masked = [s["num_masked"] for s in steps]
        assert masked == sorted(masked, reverse=True) and masked[-1] == 0
        positions = [c["pos"] for s in steps for c in s["committed"]]
        assert sorted(positions) == list(range(16))  # every position committed exactly once
        assert all(0 <= c["confidence"] <= 1 for s in steps for c in s["committed"])
        assert ["draft" in s for s in steps] == [s["step"] % 2 == 0 for s in steps]
        done = datas[-1]
        assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 16
        assert done["timings"]["total_s"] >= done["timings"]["time_to_first_step_s"] > 0
        # The final draft has no placeholder left and matches the completed text.
        assert steps[-1]["draft"] == done["text"]


async def test_generate_with_n_tags_choices(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        _, events = await generate(
            client, prompt=[1, 2, 3], n=2, seed=3, temperature=1.0, max_tokens=8, steps=4
        )
        datas = [e.json() for e in events]
        assert {d["choice_index"] for d in datas} == {0, 1}
        assert [d["type"] for d in datas].count("request.completed") == 2


async def test_attach_and_resume_after_last_event_id(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        r, events = await generate(
            client, prompt="Hi", max_tokens=16, steps=8, block_length=8, ignore_eos=True
        )
        rid = r.headers["x-request-id"]
        url = f"/v1/diffusion/requests/{rid}/events"
        full = parse_sse((await client.get(url)).text)
        assert [(e.id, e.data) for e in full] == [(e.id, e.data) for e in events]
        for k in (0, 3, len(events) - 1):
            resumed = parse_sse((await client.get(url, headers={"Last-Event-ID": str(k)})).text)
            assert [e.id for e in resumed] == [e.id for e in events[k:]]
            assert [e.data for e in resumed] == [e.data for e in events[k:]]
        # The OpenAI id prefix also resolves, and the query form works too.
        again = await client.get(f"/v1/diffusion/requests/cmpl-{rid}/events?last_event_id=3")
        assert [e.id for e in parse_sse(again.text)] == [e.id for e in events[3:]]
        missing = await client.get("/v1/diffusion/requests/nope/events")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"


async def test_evicted_log_resyncs_with_a_snapshot(llada_tiny_path):
    from marble.server.settings import Settings

    async with serving(llada_tiny_path, Settings(event_log_size=16)) as (_, client):
        r, events = await generate(
            client, prompt="Hi", max_tokens=32, steps=32, block_length=8, ignore_eos=True
        )
        rid = r.headers["x-request-id"]
        resumed = parse_sse(
            (await client.get(f"/v1/diffusion/requests/{rid}/events?last_event_id=1")).text
        )
        assert [e.event for e in resumed] == ["snapshot", "request.completed"]
        snap = resumed[0].json()
        assert (
            snap["num_masked"] == 0
            and snap["finished"]
            and snap["text"] == events[-1].json()["text"]
        )
        assert int(resumed[0].id) == len(events)


async def test_openai_requests_are_attachable(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        r = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "steps": 4})
        events = parse_sse(
            (await client.get(f"/v1/diffusion/requests/{r.json()['id']}/events")).text
        )
        assert events[-1].json()["text"] == r.json()["choices"][0]["text"]


def step_event(seq: int, choice: int = 0) -> Event:
    return Event("step", seq, {"type": "step", "sequence_number": seq, "choice_index": choice})


async def test_slow_subscriber_drops_only_steps_and_resyncs():
    dropped = []
    sub = Subscriber(capacity=2, on_drop=lambda: dropped.append(1))
    sub.push(Event("request.queued", 1, {}))
    for seq in range(2, 7):
        sub.push(step_event(seq), resync=lambda e: Event("snapshot", e.seq, {}))
    sub.push(Event("block.committed", 7, {}))
    assert len(dropped) == 3  # steps 4, 5, 6 did not fit
    got = [(await sub.get()) for _ in range(4)]
    assert [(e.name, e.seq) for e in got] == [
        ("request.queued", 1),
        ("step", 2),
        ("step", 3),
        ("block.committed", 7),
    ]
    sub.push(step_event(8), resync=lambda e: Event("snapshot", e.seq, {}))
    assert [(e.name, e.seq) for e in [await sub.get()]] == [("snapshot", 8)]  # catches up
    sub.close()
    assert await sub.get() is None


async def test_stuck_subscriber_is_cut_off():
    sub = Subscriber(capacity=1, hard_limit=3)
    for seq in range(10):
        sub.push(Event("request.completed", seq, {}))
    assert sub.closed
    seen = []
    while (e := await sub.get()) is not None:
        seen.append(e.seq)
    assert seen == [0, 1, 2]


# --------------------------------------------------------------------------- disconnects
async def call_app(
    app, path: str, body: dict, disconnect: asyncio.Event, method: str = "POST"
) -> list[dict]:
    """Drive the ASGI app directly so the test decides when the client goes away."""
    payload = json.dumps(body).encode()
    sent: list[dict] = []
    first = True

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": payload, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"marble")],
        "client": ("127.0.0.1", 1),
        "server": ("marble", 80),
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    "path,extra",
    [
        ("/v1/completions", {}),
        ("/v1/completions", {"stream": True}),
        ("/v1/diffusion/generate", {}),
    ],
)
async def test_disconnect_aborts_within_two_steps(llada_tiny_path, path, extra):
    async with serving(llada_tiny_path) as (app, _):
        lifecycle = app.state.lifecycle
        thread = lifecycle.engine.thread
        at_abort: list[int] = []
        real_abort = thread.abort

        def abort(request_id: str) -> None:
            request = lifecycle.engine.engine.requests.get(request_id)
            at_abort.append(request.num_steps if request else -1)
            real_abort(request_id)

        thread.abort = abort
        disconnect = asyncio.Event()
        body = {"prompt": "Hi", "max_tokens": 256, "steps": 256, "ignore_eos": True, **extra}
        task = asyncio.create_task(call_app(app, path, body, disconnect))
        registry = lifecycle.engine.registry
        while not any(c.last for r in registry for c in r.choices):
            await asyncio.sleep(0.005)
        (record,) = registry
        disconnect.set()
        await asyncio.wait_for(task, 10)
        await asyncio.wait_for(registry.idle.wait(), 10)
        (choice,) = record.choices
        assert choice.last.finish_reason == "abort"
        assert at_abort and choice.last.step - at_abort[0] <= 2
        assert choice.last.step < 256
        metrics = (await asyncio.to_thread(lifecycle.metrics.render))[0].decode()
        assert "marble_client_disconnects_total 1.0" in metrics
        assert 'marble_requests_total{outcome="abort"} 1.0' in metrics
        assert "marble_requests_running 0.0" in metrics


async def test_a_subscriber_that_never_reads_loses_steps_only(llada_tiny_path):
    from marble.server.settings import Settings

    async with serving(llada_tiny_path, Settings(subscriber_queue_size=2)) as (app, client):
        firehose = app.state.lifecycle.engine.registry.firehose
        sub = firehose.subscribe()  # a dashboard that reads nothing until the end
        body = {"prompt": "Hi", "max_tokens": 16, "steps": 16, "block_length": 8}
        r = await client.post("/v1/completions", json={**body, "ignore_eos": True})
        assert r.status_code == 200  # the engine was not held back
        sub.close()
        names = []
        while (event := await sub.get()) is not None:
            names.append(event.name)
        assert names.count("step") == 8 and sub.dropped == 8  # dashboard: 4 x queue size
        for name in ("request.queued", "request.started", "request.completed"):
            assert names.count(name) == 1
        assert names.count("block.committed") == 2
        metrics = (await client.get("/metrics")).text
        assert "marble_dropped_step_events_total 8.0" in metrics
