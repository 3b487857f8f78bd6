"""Completion-quality probes for the default model: held-out function prompts and compile checks.

A prompt is a held-out function's header and docstring (dedented so it stands alone); a
completion counts when the prompt plus the completion, cut at its last complete line, compiles
and the completion added at least one line of code (blank and comment-only lines do not count:
a header and docstring alone already compile). Knows nothing about how text is generated.
"""

from __future__ import annotations

import ast
import textwrap

import numpy as np


def function_prompts(sources: list[str], limit: int, max_chars: int = 600) -> list[str]:
    """Header + docstring of functions with a docstring and a body after it, in file order."""
    prompts: list[str] = []
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            if len(body) < 2 or ast.get_docstring(node) is None:
                continue
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            head = "\n".join(lines[first - 1 : body[0].end_lineno])
            prompt = textwrap.dedent(head) + "\n"
            if len(prompt) <= max_chars:
                prompts.append(prompt)
            if len(prompts) >= limit:
                return prompts
    return prompts


def cut_last_line(completion: str) -> str:
    """Keep whole lines only: everything up to the last newline."""
    at = completion.rfind("\n")
    return completion[: at + 1] if at >= 0 else ""


def code_lines(text: str) -> list[str]:
    """Lines that hold code: not blank, not comment-only."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def repeated_share(texts: list[str]) -> float:
    """Share of all completions' code lines that repeat an earlier code line of their own
    completion (the embedded model's failure mode is a line written again and again)."""
    lines = repeats = 0
    for text in texts:
        seen: set[str] = set()
        for line in code_lines(text):
            key = line.strip()
            repeats += key in seen
            seen.add(key)
            lines += 1
    return repeats / max(lines, 1)


def code_share(completion: str) -> float:
    """Share of a completion's lines that hold code (an undertrained model's failure mode is
    a canvas of blank lines and '#', which compiles but is not code)."""
    lines = completion.splitlines()
    return len(code_lines(completion)) / len(lines) if lines else 0.0


def compiles(prompt: str, completion: str) -> bool:
    body = cut_last_line(completion)
    if not code_lines(body):
        return False
    try:
        compile(prompt + body, "<completion>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def unigram_completions(
    train: list[np.ndarray], vocab_size: int, n: int, length: int, seed: int = 0
) -> list[np.ndarray]:
    """Baseline: `n` completions of `length` ids drawn from train unigram frequencies."""
    counts = np.bincount(np.concatenate(train), minlength=vocab_size).astype(np.float64)
    rng = np.random.default_rng(seed)
    return [rng.choice(vocab_size, size=length, p=counts / counts.sum()) for _ in range(n)]
