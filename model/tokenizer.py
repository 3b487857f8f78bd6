"""Tokenizer of a checkpoint folder: `tokenizers` for text, jinja2 for chat templates.

Special ids (mask, eos, end-of-turn, pad) are read from the checkpoint's `config.json`,
`tokenizer_config.json` and `generation_config.json`, never from code. Knows nothing of models
or requests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Qwen2's split pattern (used for Dream's vocab.json + merges.txt layout).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# What a template can raise on inputs it does not expect (a kwarg of the wrong type, a message
# without a field it reads): TemplateError covers jinja's own (undefined, sandbox, syntax,
# `raise_exception`); the rest are Python errors from inside the template's expressions.
_RENDER_ERRORS = (
    TemplateError,
    ArithmeticError,
    AttributeError,
    LookupError,
    TypeError,
    ValueError,
    RecursionError,
)


class ChatTemplateError(ValueError):
    """The checkpoint has no chat template, or rendering it failed."""


class ReservedTemplateVariable(ValueError):
    """Template kwargs naming variables the renderer sets itself; `names` lists them."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"chat template variables {names} are set by the server")
        self.names = names


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    eos: int | None
    pad: int | None
    eot: int | None  # end of turn (<|eot_id|>, <|im_end|>), found through the chat template
    # Further ids the checkpoint lists as ending a generation (an `eos_token_id` list, e.g.
    # DiffusionGemma's [1, 106, 50] in generation_config.json).
    listed: frozenset[int] = frozenset()

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a generation; the text is cut before the first of them."""
        return frozenset(i for i in (self.eos, self.eot) if i is not None) | self.listed

    @property
    def padding(self) -> int:
        """The id a batch's padded positions hold: the pad token, else the mask."""
        return self.pad if self.pad is not None else self.mask


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _build_from_vocab(folder: Path) -> Tokenizer:
    """Byte-level BPE from vocab.json + merges.txt (Qwen2 layout), with added tokens."""
    tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = _read_json(folder / "added_tokens.json")
    tok.add_special_tokens([t for t, _ in sorted(added.items(), key=lambda kv: kv[1])])
    return tok


class TextTokenizer:
    """Encode/decode text and render chat prompts the way `transformers` does."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if (folder / "tokenizer.json").exists():
            self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            self.tok = _build_from_vocab(folder)
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json (or vocab.json + merges.txt)")
        self.config = _read_json(folder / "tokenizer_config.json")
        self.chat_template: str | None = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        if self.chat_template is None and (folder / "chat_template.jinja").exists():
            # Newer checkpoints (Gemma 4) ship the template as a file beside tokenizer_config.
            self.chat_template = (folder / "chat_template.jinja").read_text()
        self.special = self._special_ids(folder)
        self._ids_by_prefix: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _id_of(self, key: str) -> int | None:
        content = _token_content(self.config.get(key))
        return None if content is None else self.tok.token_to_id(content)

    def _special_ids(self, folder: Path) -> SpecialIds:
        model_cfg = _read_json(folder / "config.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        mask = model_cfg.get("mask_token_id")
        if mask is None:
            mask = gen_cfg.get("mask_token_id") or self._id_of("mask_token")
        if mask is None:
            raise ValueError(f"{folder}: no mask token (mask_token_id or mask_token)")
        eos = model_cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None:
            eos = self._id_of("eos_token")
        pad = model_cfg.get("pad_token_id")
        if pad is None:
            pad = self._id_of("pad_token")
        listed = [
            i
            for cfg in (model_cfg, gen_cfg)
            if isinstance(cfg.get("eos_token_id"), list)
            for i in cfg["eos_token_id"]
        ]
        return SpecialIds(
            mask=mask,
            eos=eos,
            pad=pad if pad is not None else eos,
            eot=self._end_of_turn_id(eos),
            listed=frozenset(listed),
        )

    def _end_of_turn_id(self, eos: int | None) -> int | None:
        """The special token the chat template writes right after a message's content."""
        if not self.chat_template:
            return None
        probe = "marble-probe"
        try:
            text = self.render_chat(
                [{"role": "user", "content": probe}], add_generation_prompt=False
            )
        except ChatTemplateError:
            return None
        tail = text.split(probe, 1)[-1]
        for token in self.tok.get_added_tokens_decoder().values():
            if token.special and tail.startswith(token.content):
                return self.tok.token_to_id(token.content)
        return eos if eos is not None and tail.startswith(self.decode([eos], False)) else None

    def encode(self, text: str) -> list[int]:
        """Text -> ids, special tokens in the text recognised, no BOS/EOS added.

        Through `encode_batch`, which releases the GIL while it works (plain `encode` holds
        it), so a long text tokenized in a worker thread does not stall the event loop."""
        return self.tok.encode_batch([text], add_special_tokens=False)[0].ids

    @cached_property
    def max_token_chars(self) -> int:
        """UTF-8 bytes of the longest token text, so at least its characters: n tokens never
        decode to more than n times this, which bounds the text worth tokenizing for a
        context of n tokens."""
        return max(1, max(len(t.encode("utf-8")) for t in self.token_texts))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def added_tokens(self) -> frozenset[str]:
        """The texts of the tokens added over the base vocabulary (each is one token)."""
        return frozenset(t.content for t in self.tok.get_added_tokens_decoder().values())

    @cached_property
    def token_texts(self) -> list[str]:
        """Every id's display string, computed once (token healing scans the vocabulary)."""
        return self.token_text(list(range(len(self))))

    def ids_starting_with(self, text: str) -> list[int]:
        """Ids whose display string starts with `text`. Cached per text: healing asks on every
        request, and a real vocabulary is 100k+ strings to scan."""
        if text not in self._ids_by_prefix:
            matches = [i for i, t in enumerate(self.token_texts) if t.startswith(text)]
            self._ids_by_prefix[text] = matches
        return self._ids_by_prefix[text]

    def token_text(self, ids: list[int]) -> list[str]:
        """Per-token display strings (bytes that are not valid UTF-8 alone become U+FFFD)."""
        return [self.tok.decode([i], skip_special_tokens=False) for i in ids]

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render with the checkpoint's jinja2 template, as transformers' apply_chat_template.

        `tools` are OpenAI's tool objects (the template's `tools` variable); `template_kwargs`
        reach the template as variables (e.g. `{"enable_thinking": True}`).
        One naming a variable the renderer sets itself raises ReservedTemplateVariable; a failed
        render, whatever the template raised, ChatTemplateError."""
        template_kwargs = template_kwargs or {}
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda v, indent=None: json.dumps(
            v, indent=indent, ensure_ascii=False
        )
        specials = {
            key: _token_content(self.config.get(key))
            for key in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
        }
        ours = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
            **{k: (v or "") for k, v in specials.items()},
        }
        # A variable would shadow a global the template calls (`namespace`, `raise_exception`);
        # `self` is jinja's reference to the template, which no variable replaces.
        clash = sorted(set(template_kwargs) & (set(ours) | set(env.globals) | {"self"}))
        if clash:
            raise ReservedTemplateVariable(clash)
        try:
            # One mapping, not keywords: any variable name is then just a key.
            return env.from_string(self.chat_template).render({**ours, **template_kwargs})
        except _RENDER_ERRORS as exc:
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
