"""Scheduler bookkeeping without a model: admission, budget, queue bound, aborts."""

from __future__ import annotations

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
