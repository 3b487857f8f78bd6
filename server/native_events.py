"""The native event contract: what each event of a `/v1/diffusion` stream carries.

`request.queued`, `request.started`, `step`, `block.committed`, `snapshot`, `error` and
`request.completed` payloads, built from engine `StepOutput`s (README's event table is the
documentation). The head every event starts with (`type`, `request_id`, `sequence_number`,
`choice_index`) is the request record's; this module builds what follows it. Pure: no
queues, no listeners.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from marble.model.tokenizer import TextTokenizer
from marble.scheduler.engine import StepOutput
from marble.scheduler.healing import unheal
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.step_result import EDIT
from marble.server.draft import DraftRenderer
from marble.server.metrics import Timing


def _num(x: float | None) -> float | None:
    """JSON-safe float (NaN and infinities become null)."""
    return x if x is not None and math.isfinite(x) else None


def _seconds(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 6)


class NativeEvents:
    def __init__(
        self,
        tokenizer: TextTokenizer,
        draft: DraftRenderer,
        shown_params: Callable[[SamplingParams], dict[str, Any]],
    ) -> None:
        self.tokenizer = tokenizer
        self.draft = draft
        # The settings `request.queued` shows: those the model reads (ServedModel.shown_params).
        self.shown_params = shown_params

    def queued(
        self,
        created: int,
        model: str,
        prompt_tokens: int,
        prompt: str | list[int],
        params: SamplingParams,
    ) -> dict[str, Any]:
        return {
            "created": created,
            "model": model,
            "prompt_tokens": prompt_tokens,
            # The prompt as sent (token ids decoded), so a dashboard card can show it.
            "prompt": prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt),
            "params": self.shown_params(params),
        }

    @staticmethod
    def started(timing: Timing | None) -> dict[str, Any]:
        started = timing.started if timing else None
        submitted = timing.submitted if timing else None
        return {"queue_s": _seconds(submitted, started)}

    def step(self, out: StepOutput, draft_every: int) -> dict[str, Any]:
        """What this step committed; the whole draft every `draft_every` steps (0: never)
        and at the last step."""
        texts = self.tokenizer.token_text([c.token_id for c in out.committed])
        data: dict[str, Any] = {
            "step": out.step,
            "total_steps": out.total_steps,
            "block_index": out.block_index,
            "num_blocks": out.num_blocks,
            "num_masked": out.num_masked,
            # Which forward produced this step (full, prefix_cached, dual_cached) and how many
            # canvas positions it computed for this request.
            "forward": out.forward,
            "positions": out.positions,
            "committed": [
                {
                    "pos": c.pos,
                    "token_id": c.token_id,
                    "text": text,
                    "confidence": _num(c.confidence),
                    "logprob": _num(c.logprob),
                }
                for c, text in zip(out.committed, texts)
            ],
        }
        if out.forwards.get("encode"):
            data["forwards"] = out.forwards  # this step encoded a canvas before its decode
        data.update(out.extras)  # the family's own figures (a canvas's accepted count...)
        if out.canvas_span is not None:
            # A uniform-state model: no mask, and a shown token may change
            # until its canvas is final. `changed` lists every position whose token changed,
            # with what it held before and its `op`: accept (a kept candidate), renoise (noise
            # again) or final (the canvas ended: these tokens are its last).
            ctexts = self.tokenizer.token_text([c.token_id for c in out.changes])
            if out.forwards.get("encode"):
                # A canvas's first step carries it whole (its noise included); later steps
                # carry only what changed.
                start, end = out.canvas_span
                ids = out.tokens[start:end]
                data["canvas"] = {
                    "start": start,
                    "token_ids": ids,
                    "texts": self.tokenizer.token_text(ids),
                }
            data["changed"] = [
                {
                    "pos": c.pos,
                    "token_id": c.token_id,
                    "text": text,
                    "previous": c.previous,
                    "op": c.op,
                    "entropy": _num(c.score),
                }
                for c, text in zip(out.changes, ctexts)
            ]
        elif out.changes:
            # A masked model that corrects itself: `changed` lists the filled positions this
            # step replaced (`op` edit) or masked again (`op` remask), with what they held.
            ctexts = self.tokenizer.token_text([c.token_id for c in out.changes])
            data["changed"] = [
                {
                    "pos": c.pos,
                    "token_id": c.token_id,
                    "text": text if c.op == EDIT else None,
                    "previous": c.previous,
                    "op": c.op,
                    "confidence": _num(c.score),
                }
                for c, text in zip(out.changes, ctexts)
            ]
        if draft_every and (out.step % draft_every == 0 or out.finished):
            data["draft"] = self.draft.render(out.tokens, out.heal_text)
        return data

    def block_committed(self, out: StepOutput, block: tuple[int, int]) -> dict[str, Any]:
        start, end = block
        ids = out.tokens[start:end]
        return {
            "step": out.step,
            "block_index": out.block_completed,
            "num_blocks": out.num_blocks,
            "start": start,
            "tokens": ids,
            "text": unheal(self.tokenizer.decode(ids), out.heal_text if start == 0 else ""),
        }

    @staticmethod
    def error(out: StepOutput) -> dict[str, Any]:
        return {"message": out.error or "engine error", "code": out.error_code or "engine_error"}

    @staticmethod
    def completed(out: StepOutput, prompt_tokens: int, timing: Timing | None) -> dict[str, Any]:
        t = timing
        return {
            "text": out.text,
            "finish_reason": out.finish_reason,
            **({"error_code": out.error_code} if out.error_code else {}),
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "total_tokens": prompt_tokens + out.completion_tokens,
            },
            "steps": out.step,
            "forwards": out.forwards_total,
            "timings": {
                "queue_s": _seconds(t.submitted, t.started) if t else None,
                "time_to_first_step_s": _seconds(t.submitted, t.first_step) if t else None,
                "time_to_first_text_s": _seconds(t.submitted, t.first_text) if t else None,
                "total_s": _seconds(t.submitted, t.finished) if t else None,
            },
        }

    def snapshot(
        self, last: StepOutput | None, max_tokens: int, num_blocks: int, finished: bool
    ) -> dict[str, Any]:
        """The whole state of one choice, standing in for events a listener missed."""
        out = last
        tokens = out.tokens if out and out.tokens else [self.draft.mask_id] * max_tokens
        return {
            "step": out.step if out else 0,
            "total_steps": out.total_steps if out else None,
            "block_index": out.block_index if out else 0,
            "num_blocks": num_blocks,
            "num_masked": out.num_masked if out else max_tokens,
            "tokens": tokens,
            "draft": self.draft.render(tokens, out.heal_text if out else ""),
            "text": out.text if out else "",
            "finished": finished,
        }
