"""Scheduler bookkeeping without a model: admission (long vs short, across served models),
budget, queue bounds, aborts and deadlines."""

from __future__ import annotations

import time

import pytest

from marble.scheduler.request import Request, RequestStatus, steps_per_block
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.scheduler import QueueFullError, Scheduler, SchedulerConfig

MASK = 99


def make(rid: str, prompt_len: int = 4, **params) -> Request:
    return Request(rid, list(range(prompt_len)), SamplingParams(**params), MASK)


def test_admission_respects_batch_size_and_fifo():
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_queue=10))
    for i in range(4):
        s.add(make(f"r{i}"))
    running, aborted = s.schedule()
    assert [r.request_id for r in running] == ["r0", "r1"] and not aborted
    assert all(r.status is RequestStatus.RUNNING for r in running)
    s.finish(running[0], RequestStatus.FINISHED_LENGTH)
    running, _ = s.schedule()
    assert [r.request_id for r in running] == ["r1", "r2"]


def test_token_budget_limits_the_batch():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_batch_tokens=300))
    s.add(make("a", prompt_len=100, max_tokens=100))  # 200 tokens
    s.add(make("b", prompt_len=50, max_tokens=50))  # 100 tokens
    s.add(make("c", prompt_len=10, max_tokens=10))  # would exceed
    running, _ = s.schedule()
    assert [r.request_id for r in running] == ["a", "b"]
    with pytest.raises(ValueError):
        s.add(make("huge", prompt_len=200, max_tokens=200))
    with pytest.raises(ValueError):  # CFG doubles the cost
        s.add(make("cfg", prompt_len=100, max_tokens=100, cfg_scale=1.0))


def test_queue_is_bounded():
    s = Scheduler(SchedulerConfig(max_queue=2))
    s.add(make("a"))
    s.add(make("b"))
    with pytest.raises(QueueFullError):
        s.add(make("c"))


def test_abort_waiting_and_running_at_the_boundary():
    s = Scheduler(SchedulerConfig(max_batch_size=1))
    a, b = make("a"), make("b")
    s.add(a)
    s.add(b)
    s.schedule()
    s.abort("a")
    s.abort("b")
    assert a.status is RequestStatus.RUNNING  # nothing changes before the boundary
    running, aborted = s.schedule()
    assert running == [] and {r.request_id for r in aborted} == {"a", "b"}
    assert a.status is RequestStatus.FINISHED_ABORTED and b.status is RequestStatus.FINISHED_ABORTED
    assert not s.has_unfinished()


def test_sampling_params_validation():
    for bad in (
        dict(max_tokens=0),
        dict(threshold=1.5),
        dict(remasking="nope"),
        dict(top_p=0.0),
        dict(temperature=-1),
        dict(steps=0),
        dict(stop=("",)),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(remasking="maskgit_plus").remasking == "low_confidence"
    with pytest.raises(ValueError):
        SamplingParams.from_dict({"nonsense": 1})


def test_blocks_and_step_split():
    r = make("x", max_tokens=50, block_length=32, threshold=None, steps=25)
    assert r.blocks == [(0, 32), (32, 50)]
    assert r.block_steps == [16, 9]
    assert steps_per_block(16, 32, [8, 8, 8, 8]) == [4, 4, 4, 4]  # LLaDA's steps / blocks
    assert make("y").total_steps is None  # threshold rule: dynamic


def test_stored_defaults_keep_explicit_nulls(tmp_path):
    import json

    from marble.scheduler.served_model import load_defaults

    (tmp_path / "marble_defaults.json").write_text(
        json.dumps({"temperature": 0.7, "threshold": None, "block_length": None})
    )
    defaults = load_defaults(tmp_path)
    assert defaults.threshold is None and defaults.block_length is None
    assert defaults.temperature == 0.7 and defaults.max_tokens == SamplingParams().max_tokens
    assert load_defaults(tmp_path / "absent") == SamplingParams()


def _long(rid: str, model: str | None = None) -> Request:
    request = make(rid)
    request.model = model
    request.max_forwards = 10 * SchedulerConfig.long_forwards
    return request


def test_a_short_request_starts_beside_a_full_batch_of_long_ones():
    """Long requests never take the reserved slots: a short one waits for no long one."""
    s = Scheduler(SchedulerConfig(max_batch_size=4, short_slots=1))
    longs = [_long(f"long{i}") for i in range(6)]
    for request in longs:
        s.add(request)
    running, _ = s.schedule()
    assert [r.request_id for r in running] == ["long0", "long1", "long2"]  # one slot kept
    s.add(make("short"))
    running, _ = s.schedule()
    assert "short" in {r.request_id for r in running} and len(running) == 4
    s.finish(running[0], RequestStatus.FINISHED_LENGTH)
    running, _ = s.schedule()  # a long one's slot goes to the next long one, FIFO
    assert [r.request_id for r in running] == ["long1", "long2", "short", "long3"]
    assert SchedulerConfig(max_batch_size=16).reserved_short >= 1
    assert SchedulerConfig(max_batch_size=1).reserved_short == 0  # one slot: nothing to keep
    with pytest.raises(ValueError):
        SchedulerConfig(max_batch_size=2, short_slots=2)


def test_free_slots_go_to_the_model_running_fewest():
    """One model's flood does not delay another model's request: each freed slot goes to the
    model with the fewest running, FIFO within a model and on a tie."""
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_queue=64))
    s.serve_models(2)
    flood = [make(f"a{i}") for i in range(10)]
    for request in flood:
        request.model = "a"
        s.add(request)
    other = make("b0")
    other.model = "b"
    s.add(other)
    running, _ = s.schedule()
    assert [r.request_id for r in running] == ["a0", "b0"]
    s.finish(running[1], RequestStatus.FINISHED_LENGTH)
    running, _ = s.schedule()
    assert [r.request_id for r in running] == ["a0", "a1"]


def test_each_model_holds_at_most_its_share_of_the_waiting_queue():
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_queue=4))
    s.serve_models(2)
    for i in range(2):
        request = make(f"a{i}")
        request.model = "a"
        s.add(request)
    flood = make("a2")
    flood.model = "a"
    with pytest.raises(QueueFullError):
        s.add(flood)
    for i in range(2):
        request = make(f"b{i}")
        request.model = "b"
        s.add(request)  # the flooded model never filled b's share
    assert s.num_waiting == 4


def test_requests_past_their_deadline_end_at_the_boundary():
    s = Scheduler(SchedulerConfig(max_batch_size=1))
    running_one, waiting_one, fresh = make("run"), make("wait"), make("fresh")
    for request in (running_one, waiting_one, fresh):
        s.add(request)
    s.schedule()
    past = time.monotonic() - 1
    running_one.deadline = waiting_one.deadline = past
    fresh.deadline = time.monotonic() + 3600
    assert running_one.status is RequestStatus.RUNNING  # nothing changes before the boundary
    running, ended = s.schedule()
    assert [r.request_id for r in running] == ["fresh"]
    assert {r.request_id for r in ended} == {"run", "wait"}
    for request in ended:
        assert request.status is RequestStatus.FINISHED_ERROR
        assert request.error_code == "deadline_exceeded" and request.error
    assert s.num_waiting == 0
