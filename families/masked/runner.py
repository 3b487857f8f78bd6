"""One denoising step for a batch: forward the rows that need it, commit tokens per row.

Owns the device-side state of each running request: its canvas, its random generator and, for
a cached request, the keys and values its block-start forward kept. Each step a row takes one
of three kinds of forward: `full` (every position: no cache, or a block start that rebuilds the
cache), `prefix_cached` (the current block onward against the kept prefix) or `dual_cached`
(the current block only, against everything kept). Full rows share left-padded forwards,
grouped by length so a short row does not pay for a long one; cached rows share one forward
over their query positions. Only the current block of each row goes through the LM head: its
masked positions, and in a row that verifies (WINO, `verify_threshold`) its filled ones too,
which the step may mask again.
One row's failure (non-finite logits, an exception) fails that row alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from marble.families.masked.compiled import CompiledCached
from marble.families.masked.model import CachedPart, Denoiser, KeyValues
from marble.model.compiled_forward import CompiledForward
from marble.model.kv_slots import HeldInStores, SlotStore, SlotStores
from marble.model.sampling import (
    Confidence,
    HostKnobs,
    argmax,
    dream_counts,
    dream_timesteps,
    filter_top_k_top_p,
    gumbel_argmax,
    llada_counts,
    llada_left,
    score_confidence,
    select_commits,
    verify_remask,
)
from marble.scheduler.constrained_rows import grammar_masks, grammar_run
from marble.scheduler.request import Request
from marble.scheduler.sampling_params import SamplingParams
from marble.scheduler.step_result import (
    CONSTRAINT_UNSATISFIABLE,
    DUAL_CACHED,
    FULL,
    NON_FINITE_LOGITS,
    PREFIX_CACHED,
    REMASK,
    Change,
    Commit,
    RowStep,
    StepResult,
    request_generator,
    run_isolated,
)

log = logging.getLogger(__name__)

_CONFIDENCE = {
    "low_confidence": Confidence.PROBABILITY,
    "random": Confidence.RANDOM,
    "margin": Confidence.MARGIN,
    "entropy": Confidence.ENTROPY,
}


# Full rows share a padded forward while its longest row is at most this much longer than
# the shortest; past that, a separate forward costs less than the padding.
PAD_RATIO = 1.5


@dataclass
class _Row:
    canvas: Tensor  # [L] prompt + generated region + suffix
    generator: torch.Generator
    first_allowed: Tensor | None = None  # [V] bool: token healing's first-token constraint
    # The block whose block-start forward's keys and values the row's slots hold (-1: none).
    cache_block: int = -1


@dataclass
class _Layout:
    """One step's batch: canvases, each row's current-block window [B, W], and the entries
    (eligible positions, then verified ones) that get logits, row-major."""

    ids: Tensor  # [B, L] canvases, left-padded
    pads: list[int]
    starts: list[int]  # each row's block start, in canvas positions
    sizes: list[int]  # each row's block length
    win_pos: Tensor  # [B, W] the window's positions in `ids`
    window_ids: Tensor  # [B, W]
    eligible: Tensor  # [B, W] bool: masked, in the block
    filled: Tensor  # [B, W] bool: filled and checked (rows that verify)
    kinds: list[str]  # each row's forward kind
    counts: list[int]  # eligible entries per row
    checks: list[int]  # checked entries per row
    firsts: list[int]  # each row's first eligible entry
    check_firsts: list[int]  # each row's first checked entry, counted from sum(counts)
    verifying: list[bool]
    cols: Tensor  # [B, E] window columns: eligible first, then checked
    counts_t: Tensor  # [B]
    b_e: Tensor  # [N] each entry's row
    w_e: Tensor  # [N] each entry's window column
    params: list[SamplingParams]


@dataclass
class _Decision:
    """Window-shaped [B, W]: each entry's confidence (-inf elsewhere), candidate and
    log-probability; which rows' logits were not finite."""

    conf: Tensor
    tokens: Tensor
    logprob: Tensor
    broken: Tensor  # [B] bool


def _constrained(requests: list[Request], lay: _Layout) -> list[int]:
    """The rows that decode under a structured-output constraint and have a masked position
    in their block."""
    return [b for b, r in enumerate(requests) if r.constraint is not None and lay.counts[b]]


def _unit_key(request_id: str, uncond: bool) -> str:
    """A forward unit's slot: the row's canvas, or CFG's unconditional copy of it."""
    return f"{request_id}\x00{int(uncond)}"


def _row_of(unit_key: str) -> str:
    return unit_key.rsplit("\x00", 1)[0]


class ModelRunner(HeldInStores):
    def __init__(self, model: Denoiser, mask_id: int, pad_id: int, vocab_limit: int) -> None:
        self.model = model
        self.mask_id = mask_id
        self.pad_id = pad_id
        # Ids the tokenizer cannot decode (embedding rows past its length) and the mask
        # itself are never committed: a committed mask would never resolve.
        self.vocab_limit = vocab_limit
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.rows: dict[str, _Row] = {}
        # The LM head writes every step's logits here (grown to the largest step seen), so a
        # step allocates no vocabulary-sized tensor.
        self._scores: Tensor | None = None
        self._timesteps: dict[int, list[float]] = {}
        self._compiled: CompiledCached | None = None  # the cached forward, once compiled
        # A caching row's keys and values: one slot per forward unit (`_unit_key`), [Hkv, L, Dh]
        # per layer from its block-start forward, read in place by its cached steps; a store
        # per capacity class, each holding exactly its rows' slots (what admission reserved).
        cfg = model.cfg
        shape = (len(model.layers), cfg.n_kv_heads, cfg.head_dim)
        self.stores = SlotStores(*shape, self.device, self.dtype)

    def compile_forward(self, backend: str) -> CompiledForward:
        """Run every cached forward (prefix and dual) compiled from now on."""
        self._compiled = CompiledCached(self.model, backend)
        self.stores.round_slots()  # few storage shapes, each a compile
        return self._compiled.forward

    def add(self, request: Request) -> None:
        ids = request.prompt_ids + request.tokens + request.suffix_ids
        generator = request_generator(request, self.device)
        canvas = torch.tensor(ids, dtype=torch.long, device=self.device)
        allowed = None
        if request.heal_ids is not None:
            allowed = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool, device=self.device)
            allowed[request.heal_ids] = True
        self.rows[request.request_id] = _Row(canvas, generator, allowed)
        if request.params.cache != "none":
            for uncond in (False, True)[: 1 + (request.params.cfg_scale > 0)]:
                self.stores.add(_unit_key(request.request_id, uncond), len(canvas))

    def remove(self, request_id: str) -> None:
        self.rows.pop(request_id, None)
        for uncond in (False, True):
            self.stores.remove(_unit_key(request_id, uncond))

    def forward_kind(self, request: Request) -> str:
        """The forward `request` takes next: full unless it caches and its cache is this
        block's."""
        row = self.rows[request.request_id]
        mode = request.params.cache
        if mode == "none" or row.cache_block != request.block_index:
            return FULL
        return PREFIX_CACHED if mode == "prefix" else DUAL_CACHED

    def _dream_t(self, steps: int, index: int) -> float:
        if steps not in self._timesteps:
            self._timesteps[steps] = dream_timesteps(steps)
        return self._timesteps[steps][index]

    def run(self, requests: list[Request]) -> list[StepResult]:
        """Advance every request by one step: each row's commits in window order, or the error
        that failed it. A failed batch retries each row alone from its canvas and generator
        before the step (`run_isolated`). A cache stays: one rebuilt in the failed step came
        from the canvas as it was before it, and a cached forward rewrites its query slots
        before it reads them."""

        def save(request: Request) -> tuple[Tensor, Tensor]:
            row = self.rows[request.request_id]
            return row.canvas, row.generator.get_state()

        def restore(request: Request, state: tuple[Tensor, Tensor]) -> None:
            row = self.rows[request.request_id]
            row.canvas = state[0]
            row.generator.set_state(state[1])

        return run_isolated(requests, self._step, save, restore)

    @torch.inference_mode()
    def _step(self, requests: list[Request]) -> list[StepResult]:
        rows = [self.rows[r.request_id] for r in requests]
        lay = self._layout(requests, rows)
        logits, computed = self._logits(
            requests, rows, lay.kinds, lay.starts, lay.cols, lay.counts, lay.checks
        )
        d = self._decide(requests, rows, lay, logits)
        commit = select_commits(
            d.conf,
            lay.eligible,
            self._counts(requests, lay.counts_t),
            self._thresholds(lay.params, self.device),
        )
        commit &= ~d.broken[:, None]
        constrained = _constrained(requests, lay)
        if constrained:
            # The grammar decides after the host reads the proposals (`_results`); the first
            # masked position always commits, its token drawn under the grammar's mask.
            at = torch.tensor(constrained, device=self.device)
            commit[at, lay.cols[at, 0]] = True
        remask = torch.zeros_like(commit)
        if any(lay.verifying):
            remask = self._remask(requests, lay.filled, commit, d.logprob, d.broken)
        # Each window after the step, written back with one scatter: no read of which
        # positions changed. A padded column holds column 0's position, so it writes column
        # 0's value too.
        window = torch.where(commit, d.tokens, lay.window_ids).masked_fill(remask, self.mask_id)
        window = torch.where(lay.win_pos == lay.win_pos[:, :1], window[:, :1], window)
        ids = lay.ids.scatter_(1, lay.win_pos, window)
        for b, row in enumerate(rows):
            row.canvas = ids[b, lay.pads[b] :]

        # Everything the host needs from the step, in one transfer.
        broken = d.broken[:, None].expand_as(commit)
        fields = (commit, remask, d.tokens, d.conf, d.logprob, lay.window_ids, d.logprob.exp())
        host = torch.stack([t.double() for t in (*fields, broken)]).tolist()
        return self._results(requests, rows, lay, computed, host)

    def _results(
        self,
        requests: list[Request],
        rows: list[_Row],
        lay: _Layout,
        computed: list[int],
        host: list,
    ) -> list[StepResult]:
        """Each row's commits and remasks in window order, from the step's host copy."""
        committed, remasked, tokens, conf, logprob, before, prob, broken = host
        results: list[StepResult] = []
        for b, r in enumerate(requests):
            if broken[b][0]:
                results.append(NON_FINITE_LOGITS)
                continue
            base, size = r.current_block[0], lay.sizes[b]
            extras: dict[str, int] = {}
            if r.constraint is not None and lay.counts[b]:
                at = r.gen_start + base
                ruled = grammar_run(
                    r.constraint, committed[b][:size], tokens[b], rows[b].canvas, at, self.mask_id
                )
                if ruled is None:
                    results.append(CONSTRAINT_UNSATISFIABLE)
                    continue
                committed[b], rejected = ruled
                extras = {"grammar_rejected": rejected}
            commits = [
                Commit(base + w, int(tokens[b][w]), conf[b][w], logprob[b][w])
                for w in range(size)
                if committed[b][w]
            ]
            changes = [
                Change(base + w, self.mask_id, int(before[b][w]), REMASK, prob[b][w])
                for w in range(size)
                if remasked[b][w]
            ]
            # Verifying may mask the current block's commits again until it fills.
            results.append(
                RowStep(
                    commits,
                    lay.kinds[b],
                    computed[b],
                    changes,
                    block_open=lay.verifying[b],
                    extras=extras,
                )
            )
        return results

    def _layout(self, requests: list[Request], rows: list[_Row]) -> _Layout:
        """The batch's canvases (left-padded) and, per row, its current block as a window
        [B, W] and the entries that get logits."""
        dev = self.device
        # Lengths and paddings are host integers: slicing by them costs no device sync.
        pads = self._left_pads([len(r.canvas) for r in rows])
        ids = pad_sequence(
            [r.canvas for r in rows],
            batch_first=True,
            padding_value=self.pad_id,
            padding_side="left",
        )
        offsets = torch.tensor(pads, device=dev)  # [B] left padding per row

        # Current block of each row, as canvas positions [B, W] with a validity mask.
        starts = [r.gen_start + r.current_block[0] for r in requests]
        sizes = [r.current_block[1] - r.current_block[0] for r in requests]
        width = max(sizes)
        col = torch.arange(width, device=dev)
        valid = col[None, :] < torch.tensor(sizes, device=dev)[:, None]
        win_pos = offsets[:, None] + torch.tensor(starts, device=dev)[:, None] + col[None, :]
        win_pos = torch.where(
            valid, win_pos, offsets[:, None] + torch.tensor(starts, device=dev)[:, None]
        )
        window_ids = ids.gather(1, win_pos)
        eligible = valid & (window_ids == self.mask_id)

        # Only positions that can still be committed (masked, in the block) get logits: each
        # row's eligible window columns first, in order ([B, E]). A row that verifies also
        # scores its block's filled positions ("checks"), in the columns after those. How many
        # each row has is known on the host (its request's ids), so none of this waits on the
        # device.
        counts = [
            r.tokens[r.current_block[0] : r.current_block[1]].count(self.mask_id) for r in requests
        ]
        verifying = [r.params.verify_threshold is not None for r in requests]
        checks = [size - n if v else 0 for size, n, v in zip(sizes, counts, verifying)]
        # The window lies inside the generated region (blocks split max_tokens), so a filled
        # position here is never a prompt or suffix token.
        filled = valid & ~eligible & torch.tensor(verifying, device=dev)[:, None]
        group = (~eligible).to(torch.int8) + (~(eligible | filled)).to(torch.int8)  # 0, 1, 2
        cols = torch.argsort(group, dim=-1, stable=True)
        cols = cols[:, : max(1, max(n + c for n, c in zip(counts, checks)))]
        counts_t, checks_t = torch.tensor(counts, device=dev), torch.tensor(checks, device=dev)
        # Past a row's own entries, repeat its first column (a real position in its block).
        real = torch.arange(cols.shape[1], device=dev)[None, :] < (counts_t + checks_t)[:, None]
        cols = torch.where(real, cols, cols[:, :1])
        firsts = [0, *accumulate(counts)][:-1]  # row b's first entry
        b_e = torch.repeat_interleave(
            torch.arange(len(rows), device=dev), counts_t, output_size=sum(counts)
        )  # entries, row-major: row b's in window order
        j_e = torch.arange(sum(counts), device=dev) - torch.tensor(firsts, device=dev)[b_e]
        w_e = cols[b_e, j_e]
        check_firsts = [0, *accumulate(checks)][:-1]
        if any(verifying):
            # The checked entries follow every row's eligible ones: entries sum(counts) onward.
            b_c = torch.repeat_interleave(
                torch.arange(len(rows), device=dev), checks_t, output_size=sum(checks)
            )
            j_c = (
                torch.arange(sum(checks), device=dev) - torch.tensor(check_firsts, device=dev)[b_c]
            )
            b_e, w_e = torch.cat([b_e, b_c]), torch.cat([w_e, cols[b_c, counts_t[b_c] + j_c]])
        return _Layout(
            ids,
            pads,
            starts,
            sizes,
            win_pos,
            window_ids,
            eligible,
            filled,
            [self.forward_kind(r) for r in requests],
            counts,
            checks,
            firsts,
            check_firsts,
            verifying,
            cols,
            counts_t,
            b_e,
            w_e,
            [r.params for r in requests],
        )

    def _decide(
        self, requests: list[Request], rows: list[_Row], lay: _Layout, logits: Tensor
    ) -> _Decision:
        """Every entry's candidate token, confidence and log-probability under its row's
        sampler and remasking rule, back in window shape."""
        dev = self.device
        n = sum(lay.counts)
        b_e, w_e, params = lay.b_e, lay.w_e, lay.params
        logits[:, self.mask_id] = float("-inf")
        logits[:, self.vocab_limit :] = float("-inf")
        for b, (r, row) in enumerate(zip(requests, rows)):
            if row.first_allowed is None or r.current_block[0] != 0:
                continue
            # The first generated position is row b's first entry while masked, or its first
            # checked one once filled: it is checked under the constraint it was drawn under.
            if r.tokens[0] == self.mask_id:
                logits[lay.firsts[b]].masked_fill_(~row.first_allowed, float("-inf"))
            elif lay.verifying[b]:
                logits[n + lay.check_firsts[b]].masked_fill_(~row.first_allowed, float("-inf"))
        constrained = _constrained(requests, lay)
        if constrained:
            # A constrained row's first masked position (its first entry: every earlier one is
            # committed) takes only what its grammar allows next: the token sure to commit.
            lefts = [
                len(requests[b].tokens) - requests[b].tokens.index(self.mask_id)
                for b in constrained
            ]
            allowed = grammar_masks(
                [requests[b].constraint for b in constrained], lefts, logits.shape[-1], dev
            )
            at = torch.tensor([lay.firsts[b] for b in constrained], device=dev)
            logits[at] = logits[at].masked_fill(~allowed, float("-inf"))
        per_entry = logits[:, None]  # [N, 1, V]: the samplers' [B, W, V] with one column each
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            top_k = torch.tensor([p.top_k for p in params], device=dev)[b_e]
            top_p = torch.tensor([p.top_p for p in params], device=dev)[b_e]
            scored = [p for p, n, c in zip(params, lay.counts, lay.checks) if n + c]
            knobs = HostKnobs.of(scored)
            k_width = knobs.top_k_width(logits.shape[-1])
            per_entry = filter_top_k_top_p(per_entry, top_k, top_p, k_width, knobs.nucleus)

        x0 = argmax(per_entry)  # [N, 1]
        # Each row draws its whole block's noise from its own generator, so its stream (and
        # its tokens) do not depend on which other requests share the batch or what is masked.
        sampled = [b for b, p in enumerate(params) if p.temperature > 0]
        if sampled:
            vocab = logits.shape[-1]
            draws = []
            for b in sampled:
                noise = torch.rand(
                    (lay.sizes[b], vocab),
                    generator=rows[b].generator,
                    dtype=torch.float64,
                    device=dev,
                )
                draws.append(noise[lay.cols[b, : lay.counts[b]]])
            entries = torch.cat(
                [
                    torch.arange(lay.firsts[b], lay.firsts[b] + lay.counts[b], device=dev)
                    for b in sampled
                ]
            )
            temps = torch.tensor(
                [params[b].temperature for b in sampled for _ in range(lay.counts[b])], device=dev
            )
            x0[entries] = gumbel_argmax(per_entry[entries], temps, torch.cat(draws)[:, None])
        kind = torch.tensor([_CONFIDENCE[p.remasking] for p in params], device=dev)[b_e]
        width = max(lay.sizes)
        random_conf = None
        if any(p.remasking == "random" for p in params):
            draw = torch.zeros((len(rows), width), device=dev)
            for b, p in enumerate(params):
                if p.remasking == "random":
                    draw[b, : lay.sizes[b]] = torch.rand(
                        lay.sizes[b], generator=rows[b].generator, device=dev
                    )
            random_conf = draw[b_e, w_e][:, None]
        if any(lay.verifying):
            # A checked entry's candidate is the token it holds: the scoring below then gives
            # that token's log-probability under this step's forward.
            x0[n:, 0] = lay.window_ids[b_e[n:], w_e[n:]]
        kinds = {_CONFIDENCE[p.remasking] for p in params}
        entropy_rows = None
        if Confidence.ENTROPY in kinds:
            # Entries row-major: row b's counted ones from firsts[b], its checked from n on.
            at = [
                e
                for b, p in enumerate(params)
                if _CONFIDENCE[p.remasking] == Confidence.ENTROPY
                for e in (
                    *range(lay.firsts[b], lay.firsts[b] + lay.counts[b]),
                    *range(n + lay.check_firsts[b], n + lay.check_firsts[b] + lay.checks[b]),
                )
            ]
            entropy_rows = torch.tensor(at, dtype=torch.long, device=dev)
        conf_e, logprob_e = score_confidence(per_entry, x0, kind, random_conf, kinds, entropy_rows)
        # Back to window shape [B, W] (small): what the commit rules read.
        conf = torch.full((len(rows), width), float("-inf"), device=dev)
        conf[b_e, w_e] = conf_e[:, 0]
        tokens = torch.zeros((len(rows), width), dtype=torch.long, device=dev)
        tokens[b_e, w_e] = x0[:, 0]
        logprob = torch.zeros((len(rows), width), device=dev)
        logprob[b_e, w_e] = logprob_e[:, 0]
        # NaN or infinite logits (a broken checkpoint, an overflow) turn the row's log-softmax
        # into NaN: that row commits nothing and fails; the others are unaffected.
        broken = (torch.isnan(logprob) | torch.isnan(conf)).any(-1)
        return _Decision(conf, tokens, logprob, broken)

    def _remask(
        self,
        requests: list[Request],
        filled: Tensor,
        commit: Tensor,
        logprob: Tensor,
        broken: Tensor,
    ) -> Tensor:
        """WINO's verify over the filled positions [B, W] of the rows that verify -> the ones
        to mask again [B, W]: each whose token fell below the row's verify_threshold (lowest
        first). At most one fewer than the row's commits this step, so every step fills at
        least one more position and a block ends within its length of steps; a count-rule row
        remasks nothing at its block's last planned step, so its block ends on plan (remasked
        positions join the next step's count, `_counts`)."""
        dev = commit.device
        limit = commit.sum(-1) - 1
        last = [
            r.params.threshold is None and r.step_in_block + 1 >= r.block_steps[r.block_index]
            for r in requests
        ]
        limit = limit.masked_fill(torch.tensor(last, device=dev), 0)
        thresholds = [
            float("nan") if r.params.verify_threshold is None else r.params.verify_threshold
            for r in requests
        ]
        remask = verify_remask(logprob.exp(), filled, torch.tensor(thresholds, device=dev), limit)
        return remask & ~broken[:, None]

    def _logits(
        self,
        requests: list[Request],
        rows: list[_Row],
        kinds: list[str],
        starts: list[int],
        cols: Tensor,
        counts: list[int],
        checks: list[int],
    ) -> tuple[Tensor, list[int]]:
        """Float32 logits [N + C, V] at the window columns `cols` [B, E]: each row's first
        `counts[b]` entries (row-major, from 0), then each row's next `checks[b]` (row-major,
        from N = sum(counts)), classifier-free guided where asked; and the canvas positions
        each row's forward computed. Every forward returns hidden states and one LM-head
        matmul scores the counted entries; the checked ones take a second, so the first keeps
        its size and its logits are bit for bit those of a step without them (a CPU matmul's
        kernel, and so its rounding, depends on its row count). One vocabulary-sized buffer
        per step."""
        units = [(b, False) for b in range(len(requests))]
        units += [(b, True) for b, r in enumerate(requests) if r.params.cfg_scale > 0]
        hidden: dict[tuple[int, bool], Tensor] = {}
        computed = [0] * len(requests)
        full = [u for u in units if kinds[u[0]] == FULL]
        cached = [u for u in units if kinds[u[0]] != FULL]
        for group in self._length_groups(requests, rows, full):
            for unit, h, n in zip(group, *self._full(requests, rows, group, starts, cols)):
                hidden[unit] = h
                computed[unit[0]] += n
        if cached:
            for unit, h, n in zip(
                cached, *self._cached(requests, rows, cached, kinds, starts, cols)
            ):
                hidden[unit] = h
                computed[unit[0]] += n
        guided = [b for b, r in enumerate(requests) if r.params.cfg_scale > 0]
        order = [(b, False) for b in range(len(requests))] + [(b, True) for b in guided]
        parts = [torch.cat([hidden[u][: counts[u[0]]] for u in order])]
        if any(checks):
            parts.append(
                torch.cat([hidden[u][counts[u[0]] : counts[u[0]] + checks[u[0]]] for u in order])
            )
        scores = self._score_buffer(sum(len(part) for part in parts))
        for part, at in zip(parts, accumulate([0, *map(len, parts)])):
            self.model.project(part, out=scores[at : at + len(part)])
        logits = scores.float()
        n, c = sum(counts), sum(checks)
        self._guide(requests, guided, logits, counts)
        if c:
            self._guide(requests, guided, logits[len(parts[0]) :], checks)
            if guided:  # the checked entries' guided rows, moved up to follow the counted ones
                logits[n : n + c] = logits[len(parts[0]) : len(parts[0]) + c].clone()
        return logits[: n + c], computed

    @staticmethod
    def _guide(
        requests: list[Request], guided: list[int], logits: Tensor, sizes: list[int]
    ) -> None:
        """Classifier-free guidance, in place, over logits [N + U, V] that hold each row's
        `sizes[b]` conditional rows (row-major), then each guided row's unconditional ones."""
        firsts = [0, *accumulate(sizes)]
        offset = firsts[-1]
        for b in guided:
            size, first = sizes[b], firsts[b]
            cond, uncond = logits[first : first + size], logits[offset : offset + size]
            scale = requests[b].params.cfg_scale
            cond.sub_(uncond).mul_(scale + 1).add_(uncond)
            offset += size

    def _score_buffer(self, n: int) -> Tensor:
        """[n, V] rows of the step's logits buffer, in the model's dtype."""
        if self._scores is None or len(self._scores) < n:
            shape = (n, self.model.cfg.vocab_size)
            self._scores = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self._scores[:n]

    @staticmethod
    def _left_pads(lengths: list[int]) -> list[int]:
        longest = max(lengths)
        return [longest - n for n in lengths]

    def _unit_ids(self, request: Request, row: _Row, uncond: bool) -> Tensor:
        """The canvas a forward unit reads: CFG's unconditional copy masks every prompt and
        suffix token (as LLaDA does)."""
        if not uncond:
            return row.canvas
        ids = row.canvas.clone()
        ids[: request.gen_start] = self.mask_id
        ids[request.gen_start + request.params.max_tokens :] = self.mask_id
        return ids

    @staticmethod
    def _length_groups(
        requests: list[Request], rows: list[_Row], units: list[tuple[int, bool]]
    ) -> list[list[tuple[int, bool]]]:
        """Full-forward units in groups of similar canvas length (longest first)."""
        ordered = sorted(units, key=lambda u: -len(rows[u[0]].canvas))
        groups: list[list[tuple[int, bool]]] = []
        for unit in ordered:
            length = len(rows[unit[0]].canvas)
            if groups and len(rows[groups[-1][0][0]].canvas) <= PAD_RATIO * length:
                groups[-1].append(unit)
            else:
                groups.append([unit])
        return groups

    def _full(
        self,
        requests: list[Request],
        rows: list[_Row],
        units: list[tuple[int, bool]],
        starts: list[int],
        cols: Tensor,
    ) -> tuple[list[Tensor], list[int]]:
        """One left-padded forward over every position of `units` (hidden states at each
        row's `cols`); a caching row keeps its keys and values as its cache for the block."""
        dev = self.device
        seqs = [self._unit_ids(requests[b], rows[b], uncond) for b, uncond in units]
        pads = self._left_pads([len(x) for x in seqs])
        ids = pad_sequence(seqs, batch_first=True, padding_value=self.pad_id, padding_side="left")
        offsets = torch.tensor(pads, device=dev)
        arange = torch.arange(ids.shape[1], device=dev)
        attention = arange[None, :] >= offsets[:, None]
        positions = (arange[None, :] - offsets[:, None]).clamp_min(0)
        gather = torch.stack([pads[i] + starts[b] + cols[b] for i, (b, _) in enumerate(units)])
        caching = [requests[b].params.cache != "none" for b, _ in units]
        keep: list[KeyValues] | None = [] if any(caching) else None
        mask = None if not any(pads) else attention
        hidden = self.model(ids, mask, positions, gather=gather, keep=keep, project=False)
        if keep is not None:
            for i, (b, uncond) in enumerate(units):
                if not caching[i]:
                    continue
                off = pads[i]
                parts = [k[i, :, off:] for k, _ in keep] + [v[i, :, off:] for _, v in keep]
                self.stores.write(_unit_key(requests[b].request_id, uncond), 0, parts)
                rows[b].cache_block = requests[b].block_index
        return list(hidden.unbind(0)), [len(x) for x in seqs]

    def _cached(
        self,
        requests: list[Request],
        rows: list[_Row],
        units: list[tuple[int, bool]],
        kinds: list[str],
        starts: list[int],
        cols: Tensor,
    ) -> tuple[list[Tensor], list[int]]:
        """The hidden states of `units` at their window columns `cols` from one forward over
        their query positions against the keys and values their slots hold, each store's rows
        a part (`_part`): the current block onward (prefix) or the block alone (dual). For a
        model whose logits are shifted (Dream scores position p with the output at p - 1), the
        queries start one earlier."""
        shift = 1 if self.model.cfg.shift_logits else 0
        spans = []
        for b, _ in units:
            r = requests[b]
            q0 = starts[b] - shift
            q1 = (
                len(rows[b].canvas)
                if kinds[b] == PREFIX_CACHED
                else r.gen_start + r.current_block[1]
            )
            spans.append((q0, q1))
        by_store: dict[int, tuple[SlotStore, list[int]]] = {}
        for i, (b, uncond) in enumerate(units):
            store = self.stores.store(_unit_key(requests[b].request_id, uncond))
            by_store.setdefault(store.capacity, (store, []))[1].append(i)
        q_len = max(q1 - q0 for q0, q1 in spans)
        parts, pads, at = [], [], [0] * len(units)
        for store, index in by_store.values():
            keys = [_unit_key(requests[units[i][0]].request_id, units[i][1]) for i in index]
            start = parts[-1].rows.stop if parts else 0
            full = all(spans[i][1] - spans[i][0] == q_len for i in index)
            part, pad, held = self._part(store, keys, start, full)
            for i, key in zip(index, keys):
                at[i] = start + held.index(key)
            parts.append(part)
            pads.append(pad)
        dev = self.device
        total = parts[-1].rows.stop
        ids = torch.full((total, q_len), self.pad_id, dtype=torch.long, device=dev)
        positions = torch.zeros((total, q_len), dtype=torch.long, device=dev)
        slots = torch.zeros((total, q_len), dtype=torch.long, device=dev)
        for part, pad in zip(parts, pads):
            slots[part.rows] = pad
        gather = torch.zeros((total, cols.shape[1]), dtype=torch.long, device=dev)
        for i, ((b, uncond), (q0, q1)) in enumerate(zip(units, spans)):
            canvas = self._unit_ids(requests[b], rows[b], uncond)
            span = torch.arange(q0, q1, device=dev)
            ids[at[i], : q1 - q0] = canvas[q0:q1]
            positions[at[i], : q1 - q0] = span
            slots[at[i], : q1 - q0] = span
            # Window column c is query row c: the queries start at the block (one earlier,
            # shifted).
            gather[at[i]] = cols[b]
        if self._compiled is None:
            hidden = self.model.forward_cached(ids, positions, parts, slots, gather, project=False)
        else:  # one compiled forward per store: each sees one part's shapes
            hidden = torch.cat(
                [
                    self._compiled(ids[p.rows], positions[p.rows], p, slots[p.rows], gather[p.rows])
                    for p in parts
                ]
            )
        return [hidden[a] for a in at], [q1 - q0 for q0, q1 in spans]

    def _part(
        self, store: SlotStore, keys: list[str], start: int, full: bool
    ) -> tuple[CachedPart, int, list[str]]:
        """A cached forward's rows from `start` on for the units `keys` of `store` (`full`:
        their queries fill the forward's width), and the units its rows hold in order: the
        fewest consecutive slots holding them (compiled: every slot of the store and all its
        columns, so the forward sees the storage's own shapes), read and written in place
        (every query slot is rewritten before it is read, at every cached step), so nothing
        kept is copied. A slot in that span without a unit this step (its row takes a full
        forward, is not stepping, or is spare) rides along as padding; padding queries write
        only the column returned, which no row reads."""
        if self._compiled is not None:
            first, count = 0, store.slots
            held = store.order + [""] * (store.slots - len(store.order))
        else:
            first, count = store.span(keys)
            held = store.order[first : first + count]
        # A spare slot reads every (finite) key of its own: no row is all masked.
        lengths = [len(self.rows[_row_of(k)].canvas) if k else store.capacity for k in held]
        if self._compiled is not None:
            columns = store.capacity + 1  # the whole storage, the sink column last
        elif count == 1 and full:
            columns = lengths[0]  # no padding: exactly its keys
        else:
            columns = max(lengths) + 1  # the last column is past every row's keys
        key_mask = None
        if columns > max(lengths):
            key_mask = (
                torch.arange(columns, device=self.device)[None, :]
                < torch.tensor(lengths, device=self.device)[:, None]
            )
        layers = store.view(first, count, columns)
        return CachedPart(slice(start, start + count), layers, key_mask), columns - 1, held

    def _counts(self, requests: list[Request], masked_now: Tensor) -> Tensor:
        """Tokens each count-rule row commits this step [B] (ignored for threshold rows), from
        the masks left in each row's block [B]."""
        dev = masked_now.device
        steps = [1 if r.block_steps is None else r.block_steps[r.block_index] for r in requests]
        step = [r.step_in_block for r in requests]
        plan = (
            torch.tensor([r.masks_at_block_start for r in requests], device=dev),
            torch.tensor(steps, device=dev),
            torch.tensor(step, device=dev),
        )
        llada = llada_counts(*plan)
        verifying = [r.params.verify_threshold is not None for r in requests]
        if any(verifying):
            # A verifying row's remasks join its next step's count: it commits what its plan
            # leaves masked after this step (without remasks, exactly `llada_counts`).
            catch_up = masked_now - llada_left(*plan)
            llada = torch.where(torch.tensor(verifying, device=dev), catch_up, llada)
        dream_rows = [r.params.schedule == "dream" for r in requests]
        if not any(dream_rows):
            return llada
        t_now = [self._dream_t(s, min(i, s)) for s, i in zip(steps, step)]
        t_next = [self._dream_t(s, min(i + 1, s)) for s, i in zip(steps, step)]
        dream = dream_counts(
            masked_now,
            torch.tensor(t_now, dtype=torch.float32, device=dev),
            torch.tensor(t_next, dtype=torch.float32, device=dev),
            torch.tensor([i >= s - 1 for s, i in zip(steps, step)], device=dev),
        )
        return torch.where(torch.tensor(dream_rows, device=dev), dream, llada)

    @staticmethod
    def _thresholds(params: list[SamplingParams], device: torch.device) -> Tensor:
        """[B] thresholds, NaN where the row follows a count schedule."""
        values = [float("nan") if p.threshold is None else p.threshold for p in params]
        return torch.tensor(values, device=device)
