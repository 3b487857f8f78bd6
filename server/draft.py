"""A canvas as text: committed tokens decoded, each still-masked position shown as the
placeholder (`mask_placeholder`). Native `step`/`snapshot` events and OpenAI `diffusing`
streams both show drafts this way."""

from __future__ import annotations

from marble.model.tokenizer import TextTokenizer
from marble.scheduler.healing import unheal


class DraftRenderer:
    def __init__(self, tokenizer: TextTokenizer, placeholder: str) -> None:
        self.tokenizer = tokenizer
        self.placeholder = placeholder
        self.mask_id = tokenizer.special.mask
        self.stop_ids = tokenizer.special.stop_ids

    def render(self, tokens: list[int], heal_text: str = "") -> str:
        """The whole canvas up to its first stop token. `heal_text` (token healing) is left
        out of a committed first token, as in the text."""
        parts: list[str] = []
        run: list[int] = []
        for token in tokens:
            if token in self.stop_ids:
                break
            if token == self.mask_id:
                if run:
                    parts.append(self.tokenizer.decode(run))
                    run = []
                parts.append(self.placeholder)
            else:
                run.append(token)
        if run:
            parts.append(self.tokenizer.decode(run))
        first_committed = bool(tokens) and tokens[0] != self.mask_id
        return unheal("".join(parts), heal_text if first_committed else "")
