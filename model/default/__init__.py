"""Marble's embedded default model: a small masked-diffusion LM trained on Python's stdlib.

`CHECKPOINT_DIR` is the packaged serving checkpoint (same layout as any real one); `train.py`
reproduces it and `evaluate.py` measures it. Nothing here is imported by the serving path
except this constant.
"""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
