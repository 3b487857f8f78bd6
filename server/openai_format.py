"""The OpenAI output format: completion and chat responses from step outputs, as streamed
chunks or one JSON body (native_events.py is the other format).

Streams carry append-only deltas of the stable text (it only grows, so nothing sent is ever
taken back), or with `diffusing` the whole current draft in each chunk (replace, not append).
`logprobs` are the log-probabilities each token had at the step it was committed.
Knows nothing of HTTP transport: routes wrap these in responses.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import StepOutput
from marble.scheduler.healing import unheal
from marble.scheduler.scheduler import DEADLINE_EXCEEDED
from marble.server.draft import DraftRenderer
from marble.server.errors import APIError
from marble.server.request_record import RequestRecord
from marble.structured.tools import ToolPlan

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]
_UNLIKELY = -9999.0  # OpenAI's stand-in for a probability too small to represent


@dataclass
class ChoiceState:
    index: int
    prompt_index: int
    echo: str = ""
    sent: str = ""  # completion text already streamed (echo excluded)
    logprob_at: dict[int, float] = field(default_factory=dict)  # pos -> logprob at commit
    tokens_sent: int = 0  # tokens whose logprobs were already streamed
    draft: str | None = None
    last: StepOutput | None = None
    done: bool = False
    calls_sent: int = 0  # tool calls already streamed


class OpenAIResponse:
    """Consumes one record's raw outputs (`record.outputs`) and produces OpenAI shapes.

    `on_failure` runs when a streamed choice fails or is aborted (the others are aborted).
    With `tools`, a chat choice's text is content up to its first call and calls from there
    (`finish_reason` "tool_calls"); a stream sends each call whole once its text is stable,
    and holds back text that could be the start of one."""

    def __init__(
        self,
        kind: Kind,
        record: RequestRecord,
        draft: DraftRenderer,
        *,
        n: int,
        retry_after_s: int,
        on_failure: Callable[[], None],
        echo: list[str] | None = None,
        logprobs: int | None = None,
        diffusing: bool = False,
        include_usage: bool = False,
        tools: ToolPlan | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.kind = kind
        self.record = record
        self.draft = draft
        self.tokenizer: TextTokenizer = draft.tokenizer
        self.retry_after_s = retry_after_s
        self.on_failure = on_failure
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + record.request_id
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.logprobs = logprobs  # None: off; k: on, with k alternatives asked for
        self.diffusing = diffusing
        self.include_usage = include_usage
        self.tools = tools  # read the text for calls (chat with tools, a choice but "none")
        self.skip_special_tokens = skip_special_tokens  # as the engine decoded the text
        self.n = n
        total = len(record.choices)
        self.states = [ChoiceState(i, i // n, (echo[i // n] if echo else "")) for i in range(total)]

    # ------------------------------------------------------------------------- common
    def _absorb(self, state: ChoiceState, out: StepOutput) -> None:
        if self.logprobs is not None:
            for c in out.committed:  # JSON has no -inf/NaN: those become OpenAI's stand-in
                state.logprob_at[c.pos] = c.logprob if math.isfinite(c.logprob) else _UNLIKELY
        state.last = out
        state.done = out.finished

    def _delta(self, state: ChoiceState, out: StepOutput) -> str:
        """New stable text since the last call; the engine promises it only grows."""
        if not out.text.startswith(state.sent):
            log.warning("request %s: stable text changed; not resending", self.record.request_id)
            return ""
        delta = out.text[len(state.sent) :]
        state.sent = out.text
        return delta

    def _tool_delta(self, state: ChoiceState, out: StepOutput) -> tuple[str, list[dict[str, Any]]]:
        """(new content, new whole calls as deltas) since the last call. Content ends where
        the first call starts; text that may still become a call's start is held back, and
        sent as content at the end if no call came of it."""
        assert self.tools is not None
        text, start = out.text, self.tools.format.open
        at = text.find(start)
        if at >= 0:
            content = text[:at]
        elif out.finished:
            content = text
        else:
            content = text[: len(text) - _partial_suffix(text, start)]
        calls: list[dict[str, Any]] = []
        if at >= 0:
            _, parsed = self.tools.parse(text)
            for call in parsed[state.calls_sent :]:
                calls.append({"index": state.calls_sent, **call.to_json()})
                state.calls_sent += 1
            if out.finished and not state.calls_sent:
                content = text  # no call after all: everything was content
        if state.calls_sent and at >= 0:
            content = content.rstrip()
        new = content[len(state.sent) :] if content.startswith(state.sent) else ""
        state.sent += new
        return new, calls

    def _token_count(self, state: ChoiceState, out: StepOutput) -> int:
        """Completion tokens that the text sent so far covers."""
        n = min(out.completion_tokens, len(out.tokens))
        if not out.finished or not out.tokens:
            return n
        # A stop string may cut the text inside the token run: keep the tokens that reach it.
        # Lengths count the healed prompt text, which `out.text` leaves out.
        target = len(out.heal_text) + len(out.text)
        skip = self.skip_special_tokens
        if len(self.tokenizer.decode(out.tokens[:n], skip)) <= target:
            return n
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(out.tokens[:mid], skip)) >= target:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _new_logprobs(
        self, state: ChoiceState, out: StepOutput
    ) -> tuple[list[int], list[float], str]:
        """(new ids, their logprobs, healed text the first of them starts with)."""
        upto = self._token_count(state, out)
        start = state.tokens_sent
        if upto <= start:
            return [], [], ""
        ids = out.tokens[start:upto]
        lps = [state.logprob_at.get(start + i, _UNLIKELY) for i in range(len(ids))]
        state.tokens_sent = upto
        return ids, lps, out.heal_text if start == 0 else ""

    def _logprobs_json(
        self, state: ChoiceState, ids: list[int], lps: list[float], offset: int, heal: str = ""
    ) -> dict[str, Any]:
        texts = self.tokenizer.token_text(ids)
        texts[0] = unheal(texts[0], heal)  # the healed part is the prompt's, not the text's
        want_top = bool(self.logprobs)
        if self.kind == "chat":
            content = []
            for text, lp in zip(texts, lps):
                entry = {"token": text, "logprob": lp, "bytes": list(text.encode())}
                top = [dict(entry)] if want_top else []
                content.append({**entry, "top_logprobs": top})
            return {"content": content, "refusal": None}
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": lps,
            # Only the committed token is known: the denoiser scores whole positions at once.
            "top_logprobs": [{t: lp} for t, lp in zip(texts, lps)] if want_top else None,
            "text_offset": offsets,
        }

    def usage(self) -> dict[str, int]:
        """Each prompt counted once (its choices share it), completions summed."""
        prompt = sum(c.prompt_tokens for c in self.record.choices if c.index % self.n == 0)
        completion = sum(s.last.completion_tokens for s in self.states if s.last)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _failure(self) -> APIError | None:
        for s in self.states:
            out = s.last
            if out is None or not out.finished:
                continue
            if out.finish_reason == "error":
                message = f"generation failed: {out.error or 'engine error'}"
                code = out.error_code or "engine_error"
                # Ran out of time (request_timeout_s): the server's answer was too slow.
                status = 504 if code == DEADLINE_EXCEEDED else 500
                return APIError(status, message, type_="server_error", code=code)
            if out.finish_reason == "abort":
                retry = {"Retry-After": str(self.retry_after_s)}
                return APIError(
                    503,
                    "the request was aborted (server shutting down)",
                    code="aborted",
                    headers=retry,
                )
        return None

    async def _outputs(self) -> AsyncIterator[tuple[ChoiceState, StepOutput]]:
        queue = self.record.outputs
        assert queue is not None
        remaining = sum(1 for s in self.states if not s.done)
        while remaining:
            index, out = await queue.get()
            state = self.states[index]
            self._absorb(state, out)
            if out.finished:
                remaining -= 1
            yield state, out

    # ---------------------------------------------------------------------- one body
    async def collect(self) -> dict[str, Any]:
        async for _ in self._outputs():
            pass
        failure = self._failure()
        if failure is not None:
            raise failure
        choices = []
        for s in self.states:
            out = s.last
            assert out is not None
            text = out.text
            choice: dict[str, Any] = {"index": s.index, "finish_reason": out.finish_reason}
            _with_code(choice, out)
            logprobs = None
            if self.logprobs is not None:
                ids, lps, heal = self._new_logprobs(s, out)
                logprobs = self._logprobs_json(s, ids, lps, len(s.echo), heal)
            if self.kind == "chat" and self.tools is not None:
                content, calls = self.tools.parse(text)
                choice["message"] = {"role": "assistant", "content": content}
                if calls:
                    choice["message"]["tool_calls"] = [c.to_json() for c in calls]
                    choice["finish_reason"] = _with_calls(out.finish_reason)
            elif self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = s.echo + text
            choice["logprobs"] = logprobs
            choices.append(choice)
        return {
            "id": self.id,
            "object": self.object,
            "created": self.record.created,
            "model": self.record.model,
            "choices": choices,
            "usage": self.usage(),
        }

    # ------------------------------------------------------------------------ stream
    def _chunk(self, choices: list[dict[str, Any]], usage: dict | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.record.created,
            "model": self.record.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))

    def _choice_chunk(
        self,
        state: ChoiceState,
        text: str | None,
        finish: str | None,
        logprobs: Any,
        role: bool,
        calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
            return {
                "index": state.index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        return {
            "index": state.index,
            "text": text or "",
            "logprobs": logprobs,
            "finish_reason": finish,
        }

    async def stream(self) -> AsyncIterator[str]:
        """`data:` payloads: chunks, then the usage chunk when asked, then `[DONE]`."""
        if self.kind == "chat":  # the role first, as OpenAI does
            yield self._chunk([self._choice_chunk(s, "", None, None, True) for s in self.states])
        else:
            echoes = [s for s in self.states if s.echo]
            if echoes and not self.diffusing:
                yield self._chunk(
                    [self._choice_chunk(s, s.echo, None, None, False) for s in echoes]
                )
        async for state, out in self._outputs():
            if out.finished and out.finish_reason in ("error", "abort"):
                failure = self._failure()
                assert failure is not None
                self.on_failure()
                yield json.dumps(failure.body())
                yield "[DONE]"
                return
            finish = out.finish_reason if out.finished else None
            logprobs = None
            if self.logprobs is not None:
                ids, lps, heal = self._new_logprobs(state, out)
                if ids:
                    offset = len(state.echo) + len(state.sent)
                    logprobs = self._logprobs_json(state, ids, lps, offset, heal)
            calls: list[dict[str, Any]] = []
            text: str | None
            if self.diffusing:
                text = out.text if out.finished else self.draft.render(out.tokens, out.heal_text)
                if self.kind == "completion":
                    text = state.echo + text
                if text == state.draft and finish is None and logprobs is None:
                    continue
                state.draft = text
            elif self.tools is not None and self.kind == "chat":
                text, calls = self._tool_delta(state, out)
                if state.calls_sent and finish is not None:
                    finish = _with_calls(finish)
                if not text and not calls and finish is None and logprobs is None:
                    continue
                text = text or None  # a delta of calls alone carries no content
            else:
                text = self._delta(state, out)
                if not text and finish is None and logprobs is None:
                    continue
            chunk = self._choice_chunk(state, text, finish, logprobs, False, calls)
            yield self._chunk([_with_code(chunk, out)])
        if self.include_usage:
            yield self._chunk([], self.usage())
        yield "[DONE]"


def _with_code(choice: dict[str, Any], out: StepOutput) -> dict[str, Any]:
    """A finished choice's code beside its finish reason, where it has one ("length" under a
    constraint: "constraint_incomplete")."""
    if out.finished and out.error_code is not None:
        choice["error_code"] = out.error_code
    return choice


def _with_calls(finish_reason: str | None) -> str | None:
    """A choice that ended by itself with calls ended to call them."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def _partial_suffix(text: str, mark: str) -> int:
    """The length of the longest end of `text` that `mark` starts with."""
    for size in range(min(len(mark) - 1, len(text)), 0, -1):
        if mark.startswith(text[-size:]):
            return size
    return 0
