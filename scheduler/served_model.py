"""One model an engine serves (`ServedModel`): its weights, tokenizer, runner, serving defaults
and the limits its requests are checked against.

An engine steps every model it serves together: each step, the running requests of a model
share that model's runner, and the models take their forwards one after the other. Loading a
checkpoint folder into one is `load_served`, through the family its config names
(`scheduler/family.py`): nothing here knows one family from another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from marble.model.compiled_forward import CompiledForward
from marble.model.default import CHECKPOINT_DIR
from marble.model.device import resolve_dtype
from marble.model.prefix_cache import PrefixCache
from marble.model.tokenizer import SpecialIds, TextTokenizer
from marble.scheduler.family import Family, family_for_config, family_for_model
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.step_result import CachedRowsRunner, Runner
from marble.structured.compiler import GrammarCompiler


@dataclass
class ServedModel:
    name: str  # what requests name it by (the OpenAI `model` field)
    model: torch.nn.Module
    tokenizer: TextTokenizer
    defaults: SamplingParams
    # What the engine asks of its kind of model (None: the registered family that owns it).
    family: type[Family] | None = None
    # Run the family's cached forward compiled (`Family.compile`): True for inductor, or a
    # torch.compile backend's name; False: eager.
    compile: bool | str = False
    special: SpecialIds = field(init=False)
    runner: Runner = field(init=False)
    context: int = field(init=False)  # longest canvas: prompt + generated + suffix
    vocab_size: int = field(init=False)  # ids the tokenizer can decode and the model score
    kv_bytes_per_token: int = field(init=False)  # per cached canvas position, where priced so
    compiled: CompiledForward | None = field(init=False)  # the compiled forward, if compiling
    grammars: GrammarCompiler = field(init=False)  # structured-output constraints, compiled
    # Finished prompt blocks shared across its requests (`share_prefixes`); None: not shared.
    prefixes: PrefixCache | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = family_for_model(self.model)
        self.special = self.tokenizer.special
        self.vocab_size = min(len(self.tokenizer), self.model.cfg.vocab_size)
        self.context = self.family.context(self.model)
        self.kv_bytes_per_token = self.family.kv_bytes_per_token(self.model)
        self.runner = self.family.runner(self)
        backend = "inductor" if self.compile is True else self.compile or None
        self.compiled = self.family.compile(self.runner, backend) if backend else None
        _ = self.tokenizer.max_token_chars  # a vocabulary scan: at load, not in a request
        self.grammars = GrammarCompiler(
            self.tokenizer.tok.to_str,
            len(self.tokenizer),
            self.model.cfg.vocab_size,
            sorted(self.special.stop_ids),
        )

    def share_prefixes(self) -> None:
        """Keep finished prompt blocks for later requests where the family says that is
        exact (within the room the engine gives the cache each step, its `capacity`)."""
        if self.family.shares_prefixes:
            assert isinstance(self.runner, CachedRowsRunner)
            self.prefixes = self.runner.prefix_cache = PrefixCache()

    def claim_kv(self, request: Request) -> int:
        """The KV bytes the request's row holds if admitted now: its `kv_bytes`, less what it
        reads from the prefix cache, claimed for it until its row ends (`unclaim` if it is
        not admitted after all)."""
        if self.prefixes is None:
            return request.kv_bytes
        assert isinstance(self.runner, CachedRowsRunner)
        return request.kv_bytes - self.runner.claim_prefix(request)

    def unclaim(self, request: Request) -> None:
        if self.prefixes is not None:
            self.prefixes.detach(request.request_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def shown_params(self, params: SamplingParams) -> dict[str, Any]:
        """`params` as JSON-ready values, only the fields this model reads."""
        return {k: v for k, v in params.to_dict().items() if k in self.family.fields}


def load_served(
    path: str | Path | None,
    name: str,
    device: str,
    dtype: torch.dtype | str,
    defaults: SamplingParams | None = None,
    progress: bool = True,
    compile: bool | str = False,
) -> ServedModel:
    """A local checkpoint folder (None: the embedded default model) on a resolved `device`,
    loaded by the family its `config.json` names; serving defaults stored with it apply
    unless given. `compile` runs its cached forward compiled (`ServedModel.compile`)."""
    path = CHECKPOINT_DIR if path is None else Path(path)
    family = family_for_config(json.loads((path / "config.json").read_text()))
    model = family.load(path, device, resolve_dtype(dtype, device), progress)
    if defaults is None:
        defaults = load_defaults(path, family)
    return ServedModel(name, model, TextTokenizer(path), defaults, family, compile)


def load_defaults(path: str | Path, family: type[Family] | None = None) -> SamplingParams:
    """Serving defaults stored with a checkpoint (`marble_defaults.json`) over its family's
    (`Family.defaults`; None: the family its config names) over Marble's own."""
    path = Path(path)
    if family is None:
        config = path / "config.json"
        family = family_for_config(json.loads(config.read_text()) if config.exists() else {})
    file = path / "marble_defaults.json"
    stored = json.loads(file.read_text()) if file.exists() else {}
    return SamplingParams.from_dict({**family.defaults(path), **stored})
