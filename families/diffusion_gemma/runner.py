"""One denoising step for a batch of uniform-state requests (DiffusionGemma).

Owns each running request's device-side state: its encoder KV cache, its current canvas, the
previous step's scaled logits (self-conditioning), its stop-rule history and its random
generator. A request's step first encodes what its cache still lacks (the prompt, or the
canvas it finished last step: a causal forward that writes the cache), then takes one
bidirectional decoder forward over its canvas; the decoder forwards of every row share one
batched call that reads their caches in place (a `SlotStore` per layer kind, rows taken in
slot order). There is no mask token: each step
accepts the lowest-entropy candidates within the entropy budget and re-noises the rest, so a
canvas's tokens change until it is final (the stop rule fired, or its steps ran out).
One row's failure fails that row alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from marble.families.diffusion_gemma.compiled import CompiledDecode
from marble.families.diffusion_gemma.grammar_prefix import (
    candidates,
    grammar_prefix,
    write_prefix,
)
from marble.families.diffusion_gemma.model import DiffusionGemma
from marble.model import uniform_sampling as us
from marble.model.cascade import SharedKeys
from marble.model.compiled_forward import CompiledForward
from marble.model.kv_slots import (
    KVRoom,
    SlotCache,
    SlotGroups,
    SlotStores,
    capacity_class,
)
from marble.model.prefix_cache import Block, readers
from marble.model.sampling import COLD_TEMPERATURE, scale_logits
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.step_result import (
    ACCEPT,
    CONSTRAINT_UNSATISFIABLE,
    DECODE,
    ENCODE,
    FINAL,
    NON_FINITE_LOGITS,
    RENOISE,
    CachedRowsRunner,
    Change,
    RowError,
    RowStep,
    request_generator,
)

REFINE_THRESHOLD = 0.95  # greedy refinement commits above this confidence (the pipeline's)
# Prompt positions per prefix-cache block. The encoder is causal, so any page is exact to
# share; pages much smaller than a real canvas (256) share most of a common prompt.
PROMPT_PAGE = 32


@dataclass
class _CanvasRow:
    generator: torch.Generator
    cache: SlotCache
    pending: Tensor | None  # [T] ids the cache lacks: encoded before the next decode
    canvas: Tensor | None = None  # [L] the decoder's next input
    scaled: Tensor | None = None  # [L, V] the last step's logits fed back (self-conditioning)
    committed: Tensor | None = None  # [L] bool: greedy refinement's sticky commits
    history: Tensor | None = None  # [S, L] the stop rule's argmax history
    remaining: int = 0  # denoising steps left in this canvas, counting this one
    fixed: list[int] = field(default_factory=list)  # a constrained canvas's grammar prefix

    def saved(self) -> _CanvasRow:
        """A copy to roll back to: tensors are replaced, never written in place, and a step
        writes its slots only past `cache.length`."""
        return replace(self, cache=self.cache.copy_refs())


@dataclass
class _Decision:
    """One step's decisions for some rows, every field [n, L] (self_cond [n, L, V])."""

    argmax: Tensor  # the canvas if the stop rule fires now
    entropy: Tensor  # per position, what the stop rule reads
    kept: Tensor  # bool: accepted this step (sampled) or committed so far (greedy)
    fresh: Tensor  # bool: kept for the first time this step (op "accept")
    canvas: Tensor  # the next decoder input: kept tokens, noise elsewhere
    self_cond: Tensor  # the logits the next step reads back


class UniformRunner(CachedRowsRunner):
    rows: dict[str, _CanvasRow]

    def __init__(self, model: DiffusionGemma) -> None:
        super().__init__()
        self.model = model
        self.device = model.embed_tokens.weight.device
        # One store per layer kind (sliding, full): their keys differ in heads and width.
        self.stores: dict[bool, SlotStores] = {}
        self.kv_room = KVRoom()  # one budget room for both kinds' spare slots
        for sliding in sorted({layer.sliding for layer in model.layers}):
            kind = [layer.self_attn for layer in model.layers if layer.sliding == sliding]
            self.stores[sliding] = SlotStores(
                len(kind),
                kind[0].n_kv,
                kind[0].head_dim,
                self.device,
                model.embed_tokens.weight.dtype,
                room=self.kv_room,
            )
        self._compiled: CompiledDecode | None = None  # the decoder forward, once compiled

    def compile_forward(self, backend: str) -> CompiledForward:
        """Run every decoder forward compiled from now on (encoding stays eager)."""
        self._compiled = CompiledDecode(self.model, backend)
        for stores in self.stores.values():
            stores.round_slots()  # few storage shapes, each a compile
        return self._compiled.forward

    def add(self, request: Request) -> None:
        """A new row: its slots, and its prompt pages in the prefix cache final at once (read
        where they are, its slots holding the positions after them, or, compiled, copied)."""
        key = request.request_id
        generator = request_generator(request, self.device)
        prompt = torch.tensor(request.prompt_ids, dtype=torch.long, device=self.device)
        tokens = self.cached_positions(request)
        taken = 0
        if self.prefix_cache is None or not request.params.prefix_cache:
            caches = [store.add(key, tokens) for store in self.stores.values()]
        elif self.reads_in_place:
            taken = self.share_in_place(request)
            caches = [store.add(key, tokens - taken, taken) for store in self.stores.values()]
        else:
            caches = [store.add(key, tokens) for store in self.stores.values()]

            def write(start: int, block: Block) -> None:
                for store, part in zip(self.stores.values(), block):
                    store.write(key, start, part)

            taken = self.prefix_cache.attach(key, request.prompt_ids, PROMPT_PAGE, write)
            caches[0].advance(taken)
        self.rows[key] = _CanvasRow(generator, caches[0], prompt[taken:])

    def remove(self, request_id: str) -> None:
        super().remove(request_id)
        for store in self.stores.values():
            store.remove(request_id)

    def prefix_size(self, request: Request) -> int:
        return PROMPT_PAGE

    @property
    def reads_in_place(self) -> bool:
        """A compiled decode's shapes do not vary with what rows share: it takes a copy."""
        return self._compiled is None

    def cached_positions(self, request: Request) -> int:
        """The prompt and every canvas (the last one's keys are a decode's scratch)."""
        length = self.model.cfg.canvas_length
        return len(request.prompt_ids) + -(-request.params.max_tokens // length) * length

    def slot_bytes(self, positions: int) -> int:
        return slot_bytes(self.model, positions)

    def read_prefix(self, key: str, start: int, length: int) -> Block:
        column = start - self.rows[key].cache.start
        return tuple(store.read(key, column, length) for store in self.stores.values())

    def _shared_keys(
        self, keys: list[str], positions: Tensor, encoder: bool
    ) -> dict[bool, list[SharedKeys]]:
        """What the rows `keys` (batch rows, in order; their queries at `positions` [B, T])
        read from the prefix cache, per layer kind: one `SharedKeys` per run segment with
        every row that reads it, a sliding kind's masked to its window."""
        shared: dict[bool, list[SharedKeys]] = {kind: [] for kind in self.stores}
        for segment, rows in readers(self.shared, keys).items():
            index = torch.tensor(rows, device=self.device)
            for (sliding, stores), parts in zip(self.stores.items(), segment.parts()):
                layers = stores.shape[0]
                kv = [parts[i : i + 1] for i in range(2 * layers)]  # keys first
                mask = None
                if sliding:
                    queries = positions[index]
                    mask = self.model.shared_mask(queries, segment.start, segment.length, encoder)
                shared[sliding].append(SharedKeys(index, kv[:layers], kv[layers:], mask))
        return shared

    @property
    def cache_bytes(self) -> int:
        return sum(store.nbytes for store in self.stores.values())

    @property
    def spare_kv_bytes(self) -> int:
        return sum(store.spare_bytes for store in self.stores.values())

    def release_kv(self, nbytes: float) -> int:
        """Every layer kind's spare slots alike (their stores hold the rows in one order)."""
        return sum(store.release(float("inf")) for store in self.stores.values())

    def grow_kv(self) -> None:
        for store in self.stores.values():
            store.grow()

    def _slots(self, caches: list[SlotCache], width: int) -> dict[bool, SlotGroups]:
        """Every store's batch for the rows of `caches` writing `width` positions after their
        caches."""
        keys = [c.key for c in caches]
        columns = [c.length - c.start for c in caches]
        widths = [width] * len(keys)
        return {k: s.batch(keys, columns, widths, width) for k, s in self.stores.items()}

    def _compiled_decode(
        self,
        canvas: Tensor,
        positions: Tensor,
        cache: dict[bool, SlotGroups],
        self_cond: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        """`decode` compiled, one forward per store (each sees one storage's shapes); the rows
        are in the stores' order, every layer kind's parts alike."""
        assert self._compiled is not None
        kinds = list(cache)
        out = []
        for parts in zip(*(cache[kind].parts for kind in kinds)):
            rows = parts[0][0]
            out.append(
                self._compiled(
                    canvas[rows],
                    positions[rows],
                    {kind: batch for kind, (_, batch) in zip(kinds, parts)},
                    None if self_cond is None else self_cond[rows],
                    None if mask is None else mask[rows],
                )
            )
        return torch.cat(out)

    def _step(self, requests: list[Request]) -> list[RowStep | RowError]:
        """The step in the stores' order (store by store, slot by slot: every layer kind's
        alike), so that a step over a store's every row reads it as a view; results back in
        request order."""
        stores = next(iter(self.stores.values()))
        order = sorted(range(len(requests)), key=lambda i: stores.place(requests[i].request_id))
        results = self._step_in_order([requests[i] for i in order])
        back = sorted(range(len(order)), key=order.__getitem__)
        return [results[i] for i in back]

    @torch.inference_mode()
    def _step_in_order(self, requests: list[Request]) -> list[RowStep | RowError]:
        rows = [self.rows[r.request_id] for r in requests]
        cfg, dev = self.model.cfg, self.device
        length, vocab = cfg.canvas_length, cfg.vocab_size
        params = [r.params for r in requests]
        encoded = [
            self._encode_pending(row, p.steps or 1, p.stability_threshold)
            for row, p in zip(rows, params)
        ]

        caches = [row.cache for row in rows]
        cache = self._slots(caches, length)
        canvas = torch.stack([row.canvas for row in rows])  # type: ignore[misc]
        span = torch.arange(length, device=dev)
        positions = torch.stack([c.length + span for c in caches])  # each row's own positions
        self_cond = mask = None
        if any(row.scaled is not None for row in rows):
            self_cond = _stacked(rows, length, vocab, dev)
            mask = torch.tensor([r.scaled is not None for r in rows], device=dev)
        if self._compiled is None:
            shared = self._shared_keys([c.key for c in caches], positions, encoder=False)
            raw = self.model.decode(canvas, positions, cache, self_cond, mask, shared=shared)
        else:
            raw = self._compiled_decode(canvas, positions, cache, self_cond, mask)

        greedy = [b for b, p in enumerate(params) if p.temperature == 0]
        sampled = [b for b, p in enumerate(params) if p.temperature > 0]
        parts = [
            (index, decide(requests, rows, raw, canvas, index))
            for index, decide in ((sampled, self._sample), (greedy, self._refine))
            if index
        ]
        # Back in batch order (one part: already in it, nothing copied).
        step = parts[0][1] if len(parts) == 1 else self._merge(len(rows), parts)

        # Per row: the stop rule's threshold, whether its steps run out now, whether it samples.
        knobs = torch.tensor(
            [
                [p.confidence_threshold for p in params],
                [row.remaining == 1 for row in rows],
                [p.temperature > 0 for p in params],
            ],
            dtype=torch.float64,
            device=dev,
        )
        fired = []
        for b, row in enumerate(rows):
            fired_b, _, _, history = us.stable_and_confident(
                step.argmax[b : b + 1],
                step.entropy[b : b + 1],
                row.history[:, None],  # type: ignore[index]
                knobs[0, b : b + 1],
            )
            row.history = history[:, 0]
            fired.append(fired_b)
        fired_t, last, hot = torch.cat(fired), knobs[1] > 0, knobs[2] > 0
        final = fired_t | last
        # A canvas ends on its argmax (generate()); a greedy canvas that ran out of steps ends
        # as it stands, every position committed (the pipeline's block refinement).
        take_argmax = fired_t | (last & hot)
        shown = torch.where(take_argmax[:, None], step.argmax, step.canvas)  # [B, L]
        changed = shown != canvas
        # One transfer for everything the host needs from this step.
        # NaN or infinite logits make a NaN entropy (a broken checkpoint, an overflow).
        broken = step.entropy.isnan().any(-1)
        fields = (shown, canvas, changed, step.kept, step.fresh, step.entropy)
        flags = (final[:, None], broken[:, None])
        host = torch.stack([t.double().expand_as(canvas) for t in (*fields, *flags)]).tolist()
        finals, failed = ([bool(f[0]) for f in t] for t in host[-2:])
        # Structured output: each constrained row's best tokens per position, read back once.
        ruled = [b for b, r in enumerate(requests) if r.constraint is not None]
        best = dict(zip(ruled, candidates(step.self_cond[ruled]).tolist())) if ruled else {}
        results: list[RowStep | RowError] = []
        for b, (request, row) in enumerate(zip(requests, rows)):
            if failed[b]:
                results.append(NON_FINITE_LOGITS)
                continue
            now, before, moved, kept, fresh, ent = (t[b] for t in host[: len(fields)])
            base = request.current_block[0]
            limit = request.params.max_tokens  # positions past it are decoded but never shown
            next_canvas = step.canvas[b]
            grammar_extras = {}
            if request.constraint is not None:
                prefix = grammar_prefix(
                    request.constraint,
                    row.fixed,
                    now,
                    kept,
                    best[b],
                    step.self_cond[b],
                    limit - base,
                    finals[b],
                )
                if prefix is None:
                    results.append(CONSTRAINT_UNSATISFIABLE)
                    continue
                n = len(prefix.fixed)
                now = [*prefix.fixed, *now[n:]]
                moved = [a != z for a, z in zip(now, before)]
                kept = [1.0] * n + kept[n:]
                finals[b] = finals[b] or prefix.done
                row.fixed = prefix.fixed
                next_canvas = write_prefix(next_canvas, prefix.fixed)
                step.kept[b, :n] = True
                grammar_extras = {"grammar_rejected": prefix.rejected, "grammar_prefix": n}
            changes = [
                Change(
                    base + i,
                    int(now[i]),
                    int(before[i]),
                    FINAL if finals[b] else ACCEPT if fresh[i] else RENOISE,
                    ent[i],
                )
                for i in range(length)
                if moved[i] and base + i < limit
            ]
            accepted = int(sum(kept))
            row.canvas, row.scaled = next_canvas, step.self_cond[b]
            row.committed = step.kept[b]
            row.remaining -= 1
            if finals[b]:
                # The next canvas starts where this one ends: its tokens are encoded first.
                row.pending = torch.tensor(now, dtype=canvas.dtype, device=dev)
                row.canvas, row.scaled, row.fixed = None, None, []
            extras = {
                "accepted": accepted,
                "renoised": length - accepted,
                "canvas_completed": finals[b],
                # Accepted this step, whether or not its token changed.
                "kept": [base + i for i in range(length) if kept[i] and base + i < limit],
                **grammar_extras,
            }
            results.append(
                RowStep(
                    [],
                    DECODE,
                    length + encoded[b],
                    changes,
                    block_final=finals[b],
                    block_open=True,
                    shown=[int(t) for t in now],
                    forwards={DECODE: 1, ENCODE: 1} if encoded[b] else None,
                    extras=extras,
                )
            )
        return results

    def _merge(self, n: int, parts: list[tuple[list[int], _Decision]]) -> _Decision:
        """The parts' decisions, rows `index` each, back in batch order: [n, L] (and [n, L, V]
        for the self-conditioning logits)."""
        placed = [(torch.tensor(index, device=self.device), part) for index, part in parts]
        merged = {}
        for name in _Decision.__dataclass_fields__:
            first = getattr(parts[0][1], name)
            out = first.new_empty((n, *first.shape[1:]))
            for where, part in placed:
                out[where] = getattr(part, name)
            merged[name] = out
        return _Decision(**merged)

    def _sample(
        self,
        requests: list[Request],
        rows: list[_CanvasRow],
        raw: Tensor,
        canvas: Tensor,
        index: list[int],
    ) -> _Decision:
        """Entropy bound (generate()): sample a candidate per position at this step's
        temperature, `temperature` times the schedule from t_max down towards t_min; keep the
        lowest-entropy candidates within the budget, re-noise the rest."""
        dev, cfg = self.device, self.model.cfg
        params = [requests[b].params for b in index]
        f64 = torch.float64
        schedule = us.temperature_schedule(
            torch.tensor([rows[b].remaining for b in index], device=dev),
            torch.tensor([p.steps or 1 for p in params], device=dev),
            torch.tensor([p.t_min for p in params], dtype=f64, device=dev),
            torch.tensor([p.t_max for p in params], dtype=f64, device=dev),
        )
        # Times 1.0 (the default) is exact: the schedule as upstream computes it.
        temperature = schedule * torch.tensor([p.temperature for p in params], device=dev)
        # The rows' logits are this step's to overwrite: the greedy part reads other rows.
        cold = any(map(_maybe_cold, params))
        scaled = scale_logits(_rows(raw, index), temperature, cold, consume=True)
        generators = [rows[b].generator for b in index]
        drawn = us.sampled_positions(scaled, generators)
        noise = us.draw_uniform(generators, cfg.canvas_length, cfg.vocab_size, dev)
        bound = torch.tensor([p.entropy_bound for p in params], device=dev)
        step = us.entropy_bound_step(drawn.entropy, drawn.drawn, noise, bound)
        return _Decision(
            drawn.argmax, drawn.entropy, step.accepted, step.accepted, step.canvas, scaled
        )

    def _refine(
        self,
        requests: list[Request],
        rows: list[_CanvasRow],
        raw: Tensor,
        canvas: Tensor,
        index: list[int],
    ) -> _Decision:
        """Greedy block refinement (temperature 0, the diffusers pipeline's): commit the argmax
        of the most confident positions on a cumulative schedule, plus every one above
        `threshold` (0.95 when unset); commits are sticky, the rest re-noised."""
        dev, cfg = self.device, self.model.cfg
        params = [requests[b].params for b in index]
        noise = us.draw_uniform(
            [rows[b].generator for b in index], cfg.canvas_length, cfg.vocab_size, dev
        )
        steps = torch.tensor([p.steps or 1 for p in params], device=dev)
        done = torch.tensor([rows[b].remaining for b in index], device=dev)
        threshold = torch.tensor(
            [REFINE_THRESHOLD if p.threshold is None else p.threshold for p in params],
            device=dev,
        )
        logits = _rows(raw, index)
        greedy = us.greedy_positions(logits)
        step = us.block_refinement_step(
            greedy.confidence,  # type: ignore[arg-type]
            greedy.drawn,
            _rows(canvas, index),
            torch.stack([rows[b].committed for b in index]),  # type: ignore[misc]
            noise,
            steps - done,
            steps,
            threshold,
        )
        return _Decision(
            greedy.argmax, greedy.entropy, step.committed, step.commits, step.canvas, logits
        )

    def _encode_pending(self, row: _CanvasRow, steps: int, stability: int) -> int:
        """Write what the row's cache lacks, then start a fresh canvas of noise; returns the
        tokens encoded (0 when the row is mid-canvas)."""
        if row.pending is None:
            return 0
        ids = row.pending[None]
        start = row.cache.length
        if ids.shape[1]:  # nothing left when the prefix cache held the whole prompt
            positions = torch.arange(start, start + ids.shape[1], device=self.device)[None]
            slots = self._slots([row.cache], ids.shape[1])
            first = torch.tensor([row.cache.start], device=self.device)
            shared = self._shared_keys([row.cache.key], positions, encoder=True)
            self.model.encode_slots(ids, positions, slots, first, shared)
            row.cache.advance(ids.shape[1])
        cfg = self.model.cfg
        row.canvas = us.draw_uniform(
            [row.generator], cfg.canvas_length, cfg.vocab_size, self.device
        )[0]
        row.scaled, row.remaining = None, steps
        row.committed = torch.zeros(cfg.canvas_length, dtype=torch.bool, device=self.device)
        row.history = us.initial_history(stability, 1, cfg.canvas_length, self.device)[:, 0]
        row.pending = None
        return ids.shape[1]


def _maybe_cold(params: SamplingParams) -> bool:
    """Whether a step's temperature may be at or below COLD_TEMPERATURE once computed in
    float32 (`us.temperature_schedule` times `temperature`), decided on the host: the schedule
    is at least min(t_min, t_max / steps), less float32's rounding (cancellation included), so
    a row this passes is never cold; one it flags may not be (then only costs the limit)."""
    t_min, t_max, steps = params.t_min, params.t_max, params.steps or 1
    floor = min(t_min, t_max / steps) - 1e-6 * max(t_min, t_max)
    return params.temperature * floor <= 10 * COLD_TEMPERATURE


def _stacked(rows: list[_CanvasRow], length: int, vocab: int, device: torch.device) -> Tensor:
    """The rows' self-conditioning logits [B, L, V] (zeros for a row without). A view when
    they lie in order in one tensor, as the last step left them when the batch is the same
    rows: a copy would cost a vocabulary-sized allocation a step."""
    parts = [row.scaled for row in rows]
    first = parts[0]
    if first is not None:
        size, storage = first.numel(), first.untyped_storage().data_ptr()
        if all(
            part is not None
            and part.is_contiguous()
            and part.untyped_storage().data_ptr() == storage
            and part.storage_offset() == first.storage_offset() + b * size
            for b, part in enumerate(parts)
        ):
            return first.as_strided((len(parts), *first.shape), (size, *first.stride()))
    zeros = torch.zeros(length, vocab, device=device)
    return torch.stack([zeros if part is None else part for part in parts])


def _rows(x: Tensor, index: list[int]) -> Tensor:
    """x[index] for ascending row indices, without a copy when they are every row."""
    return x if len(index) == len(x) else x[index]


def slot_bytes(model: DiffusionGemma, positions: int) -> int:
    """The bytes of a row's slots that hold `positions`: in every layer (one `SlotStores` per
    layer kind), their capacity class and the sink column."""
    widths = sum(layer.self_attn.n_kv * layer.self_attn.head_dim for layer in model.layers)
    return 2 * (capacity_class(positions) + 1) * widths * model.embed_tokens.weight.itemsize
