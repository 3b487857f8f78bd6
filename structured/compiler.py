"""Constraints compiled for one model's tokenizer: llguidance builds a token-level matcher
from the tokenizer's own `tokenizer.json`, once per distinct constraint (an LRU cache, errors
included, so a hostile schema costs its compile once). Compiling runs in a small pool of its
own with a wall-clock bound and llguidance's fuel limits, so no schema stalls the caller's
thread for long; the caller (request building) already runs off the event loop and off the
engine's step. Knows nothing of requests, runners or HTTP.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import llguidance

from marble.structured.constraint import Constraint

MAX_SOURCE_CHARS = 256 * 1024  # a schema, regex or grammar longer than this is refused unread
COMPILE_TIMEOUT_S = 10.0
CACHE_ENTRIES = 256
# llguidance's own bounds on one grammar: its size, and the work of building its lexer and of
# each token mask (its defaults, stated here so they are ours to change).
LIMITS = dict(max_grammar_size=500_000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000)
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="marble-grammar")
# Texts a match is most often completed with, in the order a closing search tries them: the
# ones that end a string, an object or an array first, then the comma that ends a number
# (before a digit, which would only lengthen it), then the shortest values.
CLOSERS = ('"', "}", "]", ",", "0", "f", "n", "t", "a", " ", "1", ":", "-", ".", ")", ">")


class ConstraintError(ValueError):
    """A constraint that cannot be served: `param` names the request field it came from."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class CompiledGrammar:
    """A compiled constraint: a fresh matcher per request is a copy of this one's start."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab: int, stop_ids: list[int], closers: list[int]
    ) -> None:
        self._start = matcher
        self.vocab = vocab
        self.stop_ids = frozenset(stop_ids)  # what may end a complete match
        self.closers = closers  # the ids of CLOSERS that are one token each, in its order

    def matcher(self) -> llguidance.LLMatcher:
        return self._start.deep_copy()


class GrammarCompiler:
    """One per served model: its llguidance tokenizer (built on first use, from the text of
    its `tokenizer.json`) and its cache. Masks are `vocab` wide: the model's logits."""

    def __init__(
        self, tokenizer_json: Callable[[], str], tokens: int, vocab: int, stop_ids: list[int]
    ) -> None:
        self.vocab = vocab
        self._tokenizer_json = tokenizer_json
        self._tokens = max(tokens, vocab)  # ids past the tokenizer's have no text: never allowed
        self._stop_ids = sorted(stop_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._closers: list[int] = []
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar | str] = OrderedDict()

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """The constraint's compiled grammar; raises ConstraintError naming its field."""
        if len(constraint.source) > MAX_SOURCE_CHARS:
            raise ConstraintError(
                constraint.param,
                f"the {constraint.kind} is {len(constraint.source)} characters; "
                f"at most {MAX_SOURCE_CHARS} are compiled",
            )
        with self._lock:
            cached = self._cache.get(constraint.key)
            if cached is not None:
                self._cache.move_to_end(constraint.key)
        if cached is None:
            future = _POOL.submit(self._build, constraint)
            try:
                cached = future.result(timeout=COMPILE_TIMEOUT_S)
            except FutureTimeout:
                cached = f"compiling the {constraint.kind} took over {COMPILE_TIMEOUT_S:g} s"
            with self._lock:
                self._cache[constraint.key] = cached
                while len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        if isinstance(cached, str):
            raise ConstraintError(constraint.param, cached)
        return cached

    def _build(self, constraint: Constraint) -> CompiledGrammar | str:
        """The compiled grammar, or why it cannot be one."""
        try:
            grammar = constraint.grammar()
        except ValueError as exc:
            return f"invalid {constraint.kind}: {exc}"
        matcher = llguidance.LLMatcher(
            self._llg_tokenizer(), grammar, log_level=0, limits=llguidance.LLParserLimits(**LIMITS)
        )
        if not matcher.is_error():
            matcher.compute_bitmask()  # the first mask: surfaces a lexer past its limits now
        if matcher.is_error():
            return f"invalid {constraint.kind}: {matcher.get_error()}"
        return CompiledGrammar(matcher, self.vocab, self._stop_ids, self._closers)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json(), n_vocab=self._tokens, eos_token=self._stop_ids
                )
                ids = [self._tokenizer.tokenize_str(text) for text in CLOSERS]
                self._closers = [i[0] for i in ids if len(i) == 1 and i[0] < self.vocab]
            return self._tokenizer
