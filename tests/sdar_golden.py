"""SDAR's recorded upstream runs (`../shared/reference/golden/sdar/golden_generate.json`), for
the tests under tests/families/sdar/: the checkpoint, every case, and which ones hit upstream's
overwrite quirk. A test module importing this is skipped when the reference data is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
SDAR_TINY = REFERENCE / "sdar-tiny"
GOLDEN = REFERENCE / "golden" / "sdar" / "golden_generate.json"
if not GOLDEN.exists():
    pytest.skip(f"reference data {GOLDEN} is absent", allow_module_level=True)

CASES = json.loads(GOLDEN.read_text())["cases"]
OVERWRITE = [c for c in CASES if c["overwrite_events"]]
EXACT = [c for c in CASES if not c["overwrite_events"]]
