"""One running request's constraint: a matcher at the end of its committed text. A step asks
it which tokens may come next (`allowed`, one mask) and offers it the row's proposals in order
(`accept`): it takes the longest valid run and counts what it turned away.

Finishing within the canvas: a diffusion request knows how many positions its output has left.
When a completion of the match found by a bounded search (forced tokens, then short closing
texts, depth first) needs nearly all of them, the row closes: its next token is that
completion's, one a step, so the output ends complete instead of cut; until then a step's run
of parallel commits may not spend the room that completion needs. A complete match that could
go on ends with a stop token while one still fits. Knows nothing of models
or runners beyond token ids.
"""

from __future__ import annotations

import llguidance

from marble.structured.compiler import CompiledGrammar

CLOSE_WITHIN = 96  # positions left at which the closing search starts running
MARGIN = 4  # positions a free token may add to the shortest completion
SEARCH_NODES = 256  # tokens the closing search may try per step


class RowConstraint:
    def __init__(self, grammar: CompiledGrammar) -> None:
        self.matcher = grammar.matcher()
        self.vocab = grammar.vocab
        self.stop_ids = grammar.stop_ids
        self.closers = grammar.closers
        self.rejected = 0  # proposals turned away so far
        self.accepted = 0  # tokens taken so far
        self.closing = False  # this step's token is a completion's, not the model's choice
        # Near the end: tokens a step may take and still leave room for the completion found
        # (a run of parallel commits must not spend it in one step). None: not near the end.
        self.room: int | None = None
        self.closed = 0  # steps it has closed in

    def allowed(self, left: int) -> bytes:
        """The tokens that may come next, one bit each (token 8i + j is bit j of byte i), with
        `left` positions left for the output (this one included; one more is kept for the stop
        token): stop tokens once it accepts, a completion's next token when closing."""
        self.closing, self.room = False, None
        if self.done and left <= MARGIN + 1:
            # A complete match that could go on (a number's digits, more array items) ends
            # while a stop token still fits, rather than running on into the canvas's end.
            self.closing, self.closed = True, self.closed + 1
            only = bytearray((self.vocab + 7) // 8)
            for token in self.stop_ids:
                if token < self.vocab:
                    only[token // 8] |= 1 << (token % 8)
            return bytes(only)
        if not self.done and left <= CLOSE_WITHIN:
            path = self.completion(left - 1)
            if path is not None:
                self.room = left - 1 - len(path) - MARGIN
            if path is not None and len(path) + MARGIN >= left - 1:
                self.closing, self.closed = True, self.closed + 1
                only = bytearray((self.vocab + 7) // 8)
                only[path[0] // 8] = 1 << (path[0] % 8)
                return bytes(only)
        return self.matcher.compute_bitmask()

    def completion(self, budget: int) -> list[int] | None:
        """Tokens that complete the match from here, at most `budget` of them, or None when
        the search finds none within its bound (not proof that none exists)."""
        return self._complete(self.matcher.deep_copy(), budget, [SEARCH_NODES])

    def _complete(self, m: llguidance.LLMatcher, budget: int, nodes: list[int]) -> list[int] | None:
        if m.is_accepting():
            return []
        forced = m.compute_ff_tokens()
        if forced:
            if len(forced) > budget or not m.consume_tokens(forced):
                return None
            rest = self._complete(m, budget - len(forced), nodes)
            return None if rest is None else forced + rest
        if budget <= 0:
            return None
        for token in self.closers:
            if nodes[0] <= 0:
                return None
            nodes[0] -= 1
            if m.validate_tokens([token]) == 1:
                branch = m.deep_copy()
                branch.consume_token(token)
                rest = self._complete(branch, budget - 1, nodes)
                if rest is not None:
                    return [token, *rest]
        return None

    def accept(self, proposals: list[int]) -> int:
        """Take the longest prefix of `proposals` the grammar allows, a stop token included
        once the match is complete (it ends the output); returns its length. Near the end at
        most `room` of them, one when closing (the completion's)."""
        if self.closing or self.room is not None:
            proposals = proposals[: 1 if self.closing else max(1, self.room or 0)]
        n = self.matcher.validate_tokens(proposals)
        if n and not self.matcher.consume_tokens(proposals[:n]):
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
        if n < len(proposals) and proposals[n] in self.stop_ids and self.done:
            n += 1
        self.accepted += n
        self.rejected += len(proposals) - n
        return n

    @property
    def done(self) -> bool:
        """The output so far is a complete match (only a stop token may follow)."""
        return self.matcher.is_accepting()
