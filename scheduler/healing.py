"""Token healing for prompts that end in whitespace.

Byte-level BPE merges a newline with the indentation after it ("\n    " is one token), so a
prompt cut after "\n" ends on a token that, in training text, is only ever followed by a line
at column 0: a code model then closes the function instead of writing its body. Healing takes
that last token off the prompt and lets the first generated token be any token whose text
starts with it ("\n", "\n   ", "\n\n", ...); the completion's text leaves the healed part
out, so prompt + completion reads as before. Only whitespace is healed: it decodes the same
alone or merged, so the text stays exact. Knows nothing of batching or models.
"""

from __future__ import annotations

from marble.model.tokenizer import TextTokenizer


def heal(
    tokenizer: TextTokenizer, prompt_ids: list[int], vocab: int, banned: frozenset[int]
) -> tuple[list[int], str, list[int] | None]:
    """(prompt ids, healed text, allowed first tokens); unchanged ("", None) if nothing heals.

    `vocab` bounds the ids that may be generated and `banned` (special tokens, the mask) may
    never start the completion.
    """
    if len(prompt_ids) < 2:
        return prompt_ids, "", None
    texts = tokenizer.token_texts
    last = prompt_ids[-1]
    text = texts[last] if last < len(texts) else ""
    if not text or not text.isspace() or last in banned:
        return prompt_ids, "", None
    allowed = [i for i in tokenizer.ids_starting_with(text) if i < vocab and i not in banned]
    return prompt_ids[:-1], text, allowed


def unheal(text: str, heal_text: str) -> str:
    """Completion text from decoded generated tokens: the healed prompt text they start with,
    which the prompt already holds, left out."""
    return text[len(heal_text) :] if heal_text and text.startswith(heal_text) else text
