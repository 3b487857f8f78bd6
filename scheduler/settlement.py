"""Text settlement: after a step, which generated text can no longer change, where it ends
(the first EOS or end-of-turn, a stop string) and what may be streamed of it now.

The stable prefix is the committed tokens up to the first mask (or less, while a family's
self-correction may still change the current block); its text is decoded only when it grows,
cut at stop strings, and held back by a partial UTF-8 character or the start of a stop string
the next tokens could complete. Knows nothing of runners or the scheduler.
"""

from __future__ import annotations

from marble.scheduler.healing import unheal
from marble.scheduler.request import Request, RequestStatus
from marble.scheduler.served_model import ServedModel


def settle(
    m: ServedModel, request: Request, stable_len: int, complete: bool
) -> tuple[str, RequestStatus | None]:
    """After a step: the text to stream and the request's final status, if it ended (at EOS
    or a stop string, or `complete`: every generated position final)."""
    text, cut_by_stop = _stable_text(m, request, _advance_stable(m, request, stable_len))
    if cut_by_stop:
        return text, RequestStatus.FINISHED_STOPPED
    if complete:
        return text, RequestStatus.FINISHED_LENGTH
    return hold_back(request, text), None


def _advance_stable(m: ServedModel, request: Request, stable_len: int) -> bool:
    """Extend the stable prefix (text that can no longer change) to `stable_len`, noting the
    first EOS/end-of-turn in the part just added; returns whether the prefix grew."""
    old = request.stable_len
    tokens = request.tokens
    request.stable_len = stable_len
    if request.eos_at is None and not request.params.ignore_eos:
        stop_ids = m.special.stop_ids
        request.eos_at = next(
            (i for i in range(old, request.stable_len) if tokens[i] in stop_ids), None
        )
    return request.stable_len != old


def decode(m: ServedModel, request: Request, ids: list[int]) -> str:
    """Completion text of generated ids, without the healed prompt text they start with."""
    text = m.tokenizer.decode(ids, request.params.skip_special_tokens)
    return unheal(text, request.heal_text)


def cut(request: Request) -> int:
    """End of the generated text: the first EOS/end-of-turn, else the stable prefix."""
    return request.stable_len if request.eos_at is None else request.eos_at


def completion_len(request: Request) -> int:
    if request.eos_at is not None:
        return request.eos_at
    return request.stable_len if not request.is_finished() else len(request.tokens)


def _stable_text(m: ServedModel, request: Request, grew: bool) -> tuple[str, bool]:
    """(text that can no longer change, whether EOS or a stop string ended it); decoded only
    when the stable prefix grew."""
    if not grew:
        return request.stable_text, False
    text = decode(m, request, request.tokens[: cut(request)])
    request.stable_text = text
    for stop in request.params.stop:
        at = text.find(stop)
        if at >= 0:
            return text[:at], True
    if request.eos_at is not None:
        # Fill the rest with EOS so the canvas is complete; no more forwards are needed.
        eos = m.special.eos
        fill = eos if eos is not None else request.tokens[request.eos_at]
        for i in range(request.eos_at, len(request.tokens)):
            if request.tokens[i] == request.mask_id:
                request.tokens[i] = fill
        request.num_masked = 0
    return text, request.eos_at is not None


def hold_back(request: Request, text: str) -> str:
    """Keep back what may still change: a partial UTF-8 character, or the start of a stop
    string that the next tokens could complete."""
    longest = max((len(s) for s in request.params.stop), default=1)
    keep = len(text) - (longest - 1)
    text = text[: max(keep, 0)]
    return text.rstrip("\ufffd")


def held_text(m: ServedModel, request: Request, end: int) -> str:
    """An aborted or failed request's text: it stopped mid-way, so what could still change is
    kept back."""
    return hold_back(request, decode(m, request, request.tokens[:end]))
