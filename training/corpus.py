"""The default model's corpus and tokenizer: Python sources that exist offline everywhere.

Lists the interpreter's own stdlib `.py` files (no tests, no site-packages), splits them into
train and held-out by a hash of the relative path, trains the byte-level BPE tokenizer and
encodes files to token arrays. Extra training text may come from installed packages that Marble
itself depends on (so they exist wherever Marble trains); held-out files are always stdlib ones,
so the bound stays comparable across recipes. Knows nothing about models or losses.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, MASK_TOKEN]  # ids 0 and 1; pad is eos
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
ENCODE_CHUNK = 1000  # files per tokenizer batch
HELDOUT_PER_MILLE = 50  # about 5% of files, chosen by path hash so every machine agrees


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted relative paths of the stdlib's `.py` sources, without test folders."""
    return python_files(root or stdlib_root())


def python_files(root: Path) -> list[str]:
    """Sorted relative paths of the `.py` files under root, without test folders."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        out.append(rel.as_posix())
    return sorted(out)


def package_root(name: str) -> Path:
    """The source folder of an installed package (e.g. "torch"); one error names what is missing."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed as a source folder")
    return Path(next(iter(spec.submodule_search_locations)))


def package_sources(names: Iterable[str]) -> list[str]:
    """Texts of the named packages' `.py` files (test folders excluded), in a fixed order."""
    texts = []
    for name in names:
        root = package_root(name)
        texts.extend(read_sources(python_files(root), root))
    return texts


def is_heldout(rel_path: str) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PER_MILLE


def read_sources(rel_paths: Iterable[str], root: Path | None = None) -> list[str]:
    """File texts (UTF-8; undecodable files are skipped, they are a handful of legacy ones)."""
    root = root or stdlib_root()
    texts = []
    for rel in rel_paths:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
    return texts


def split_files(root: Path | None = None) -> tuple[list[str], list[str]]:
    """(train, held-out) relative paths."""
    files = stdlib_files(root)
    return [f for f in files if not is_heldout(f)], [f for f in files if is_heldout(f)]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE, so decode(encode(text)) == text for any text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_files(tok: Tokenizer, texts: list[str], eos_id: int) -> list[np.ndarray]:
    """One int32 array per file, each ending with one EOS."""
    out = []
    # In chunks: an Encoding keeps strings and offsets per token, far more than the ids.
    for i in range(0, len(texts), ENCODE_CHUNK):
        encodings = tok.encode_batch(texts[i : i + ENCODE_CHUNK], add_special_tokens=False)
        out.extend(np.array([*e.ids, eos_id], dtype=np.int32) for e in encodings)
    return out
