"""Engine settings that keep a benchmark's sides doing the same work: the prefix cache off.
Benchmarks send the same prompts again (warm-ups, batch sizes one after another, in-process
against HTTP), and a cache would serve the later side from the earlier one. An older tree
measured through PYTHONPATH has no such setting, and needs none.
"""

from __future__ import annotations

from typing import Any

from marble.scheduler.scheduler import SchedulerConfig

# For a `python -m marble.server` the benchmark starts (an older server ignores it).
SERVER_ENV = {"MARBLE_PREFIX_CACHE": "false"}


def scheduler_config(**fields: Any) -> SchedulerConfig:
    """`SchedulerConfig(**fields)` with the prefix cache off where the tree has one."""
    if "prefix_cache" in SchedulerConfig.__dataclass_fields__:
        fields.setdefault("prefix_cache", False)
    return SchedulerConfig(**fields)
