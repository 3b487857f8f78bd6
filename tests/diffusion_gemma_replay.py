"""Test helper: DiffusionGemma's generate() loop and the diffusers pipeline loop, driven by
the native model and the pure functions of `marble.model.uniform_sampling`.

A stand-in for the scheduler integration (which comes later), written to replay the goldens:
random draws come from a `Draws` source (recorded tensors, or torch calls on one generator in
upstream's order), and every decision is kept in a trace for comparison.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from marble.families.diffusion_gemma.model import DiffusionGemma
from marble.model import uniform_sampling as us


class RecordedDraws:
    """Replays a golden case's draws in call order: per canvas the initial canvas, per step
    the candidate sample, then the renoise draw."""

    def __init__(self, case: dict) -> None:
        self.queue: deque[Tensor] = deque()
        for canvas in case["canvases"]:
            self.queue.append(torch.tensor(canvas["initial_canvas"]))
            for step in canvas["steps"]:
                self.queue.append(torch.tensor(step["denoiser_sample"]))
                self.queue.append(torch.tensor(step["renoise_draw"]))

    def _pop(self, shape: tuple[int, int]) -> Tensor:
        value = self.queue.popleft()
        assert tuple(value.shape) == shape, (tuple(value.shape), shape)
        return value

    def uniform(self, batch: int, length: int, vocab: int) -> Tensor:
        return self._pop((batch, length))

    def candidates(self, probs: Tensor) -> Tensor:
        return self._pop(tuple(probs.shape[:2]))


class SeededDraws:
    """The same torch calls upstream makes, on one CPU generator."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def uniform(self, batch: int, length: int, vocab: int) -> Tensor:
        return torch.randint(0, vocab, (batch, length), generator=self.gen)

    def candidates(self, probs: Tensor) -> Tensor:
        b, length, v = probs.shape
        return torch.multinomial(probs.view(-1, v), 1, generator=self.gen).view(b, length)


@dataclass
class StepTrace:
    temperature: float
    decoder_input: Tensor
    positions: Tensor
    argmax: Tensor  # this step's argmax
    argmax_in: Tensor  # what the stop rule saw (frozen rows: their previous argmax)
    accepted: Tensor
    canvas: Tensor  # next canvas (frozen rows: their previous canvas)
    stable: Tensor
    confident: Tensor
    fired: Tensor
    frozen: Tensor


@dataclass
class CanvasTrace:
    encoded_ids: Tensor
    encoded_positions: Tensor
    initial: Tensor
    steps: list[StepTrace] = field(default_factory=list)
    appended_argmax: Tensor | None = None
    appended: Tensor | None = None
    finished: Tensor | None = None


@dataclass
class GenerateTrace:
    canvases: list[CanvasTrace]
    final_ids: Tensor
    encoder_forwards: int
    decoder_forwards: int
    counted: Tensor  # [B] decoder steps of rows neither frozen nor finished
    tokens_per_forward: Tensor


def generate(
    model: DiffusionGemma,
    prompt: Tensor,
    attention_mask: Tensor | None,
    params: dict,
    draws: RecordedDraws | SeededDraws,
) -> GenerateTrace:
    """prompt [B, P] (left padded when attention_mask [B, P] is given) -> the run's trace."""
    b = prompt.shape[0]
    length, vocab = model.cfg.canvas_length, model.cfg.vocab_size
    steps = params["max_denoising_steps"]
    t_min = torch.full((b,), params["t_min"], dtype=torch.float64)
    t_max = torch.full((b,), params["t_max"], dtype=torch.float64)
    bound = torch.full((b,), params["entropy_bound"])
    conf = torch.full((b,), params["confidence_threshold"])
    eos = torch.tensor(params["eos_token_id"])
    pad = params["pad_token_id"]
    cache = model.new_cache(b)
    finished = torch.zeros(b, dtype=torch.bool)
    counted = torch.zeros(b, dtype=torch.long)
    pieces, canvases = [prompt], []
    encoder_forwards = decoder_forwards = 0
    to_encode, valid = prompt, attention_mask
    for _ in range(math.ceil(params["max_new_tokens"] / length)):
        start = cache.length
        positions = torch.arange(start, start + to_encode.shape[1]).expand(b, -1)
        model.encode(to_encode, positions, cache, None if valid is None else valid.bool())
        encoder_forwards += 1
        trace = CanvasTrace(to_encode, positions[0], draws.uniform(b, length, vocab))
        canvas = argmax = trace.initial
        sc: Tensor | None = None
        history = us.initial_history(params["stability_threshold"], b, length, prompt.device)
        frozen = torch.zeros(b, dtype=torch.bool)
        positions = torch.arange(cache.length, cache.length + length).expand(b, -1)
        for remaining in range(steps, 0, -1):
            raw = model.decode(canvas, positions, cache, sc)
            decoder_forwards += 1
            counted += (~(frozen | finished)).long()
            temp = us.temperature_schedule(
                torch.full((b,), remaining), torch.full((b,), steps), t_min, t_max
            )
            scaled = raw / temp[:, None, None]
            candidates = draws.candidates(scaled.softmax(-1))
            token_entropy = us.entropy(scaled)
            noise = draws.uniform(b, length, vocab)
            step = us.entropy_bound_step(token_entropy, candidates, noise, bound)
            step_argmax = scaled.argmax(-1)
            argmax_in = us.hold_rows(frozen, argmax, step_argmax)
            next_canvas = us.hold_rows(frozen, canvas, step.canvas)
            if sc is not None:
                scaled = us.hold_rows(frozen, sc, scaled)
            fired, stable, confident, history = us.stable_and_confident(
                argmax_in, token_entropy, history, conf
            )
            frozen = frozen | fired
            trace.steps.append(
                StepTrace(
                    temperature=float(temp[0]),
                    decoder_input=canvas,
                    positions=positions[0],
                    argmax=step_argmax,
                    argmax_in=argmax_in,
                    accepted=step.accepted,
                    canvas=next_canvas,
                    stable=stable,
                    confident=confident,
                    fired=fired,
                    frozen=frozen.clone(),
                )
            )
            sc, canvas, argmax = scaled, next_canvas, argmax_in
            if bool(frozen.all()):
                break
        appended, finished = us.finalize_canvas(argmax, finished, eos, pad)
        trace.appended_argmax, trace.appended, trace.finished = argmax, appended, finished
        canvases.append(trace)
        pieces.append(appended)
        to_encode, valid = appended, None
        if bool(finished.all()):
            break
    generated = torch.cat(pieces[1:], dim=1)
    return GenerateTrace(
        canvases,
        torch.cat(pieces, dim=1),
        encoder_forwards,
        decoder_forwards,
        counted,
        us.tokens_per_forward(generated, counted, pad),
    )


@dataclass
class PipelineStep:
    decoder_input: Tensor
    argmax: Tensor
    committed_this_step: Tensor
    canvas: Tensor
    mean_entropy: float


@dataclass
class PipelineCanvas:
    initial: Tensor
    steps: list[PipelineStep] = field(default_factory=list)
    appended: Tensor | None = None
    stop_fired: bool = False


def pipeline(
    model: DiffusionGemma, prompt: Tensor, case: dict
) -> tuple[list[PipelineCanvas], Tensor, int, int]:
    """diffusers' DiffusionGemmaPipeline loop (B = 1) for a golden `diffusers_cases` entry ->
    (canvases, final ids [1, P + n], encoder forwards, decoder forwards)."""
    call = case["pipeline_call"]
    gen = torch.Generator().manual_seed(case["generator_seed"])
    length, vocab = model.cfg.canvas_length, model.cfg.vocab_size
    steps = call["num_inference_steps"]
    block = case["scheduler"] == "BlockRefinementScheduler"
    sched = case["scheduler_config"]
    one = torch.ones(1, dtype=torch.long)
    conf = torch.tensor([call["confidence_threshold"]])
    eos = case["eos_token_id_used"]
    cache = model.new_cache(1)
    pieces, canvases, to_encode = [prompt], [], prompt
    encoder_forwards = decoder_forwards = 0
    for _ in range(math.ceil(call["gen_length"] / length)):
        start = cache.length
        model.encode(to_encode, torch.arange(start, start + to_encode.shape[1])[None], cache)
        encoder_forwards += 1
        canvas = torch.randint(0, vocab, (1, length), generator=gen)
        trace = PipelineCanvas(canvas)
        positions = torch.arange(cache.length, cache.length + length)[None]
        sc: Tensor | None = None
        committed = torch.zeros(1, length, dtype=torch.bool)
        history = us.initial_history(call["stability_threshold"], 1, length, prompt.device)
        for k in range(steps):
            raw = model.decode(canvas, positions, cache, sc)
            decoder_forwards += 1
            if block:
                noise = torch.randint(0, vocab, (1, length), generator=gen)
                threshold = torch.tensor([sched["threshold"]])
                greedy = us.greedy_positions(raw)
                bstep = us.block_refinement_step(
                    greedy.confidence,  # type: ignore[arg-type]
                    greedy.drawn,
                    canvas,
                    committed,
                    noise,
                    k * one,
                    steps * one,
                    threshold,
                )
                committed, pred = bstep.committed, raw
                trace_row = (bstep.commits, bstep.canvas)
            else:
                t = sched["t_min"] + (sched["t_max"] - sched["t_min"]) * ((steps - k) / steps)
                pred = raw / t
                probs = pred.softmax(-1)
                d = torch.multinomial(probs.view(-1, vocab), 1, generator=gen).view(1, length)
                noise = torch.randint(0, vocab, (1, length), generator=gen)
                estep = us.entropy_bound_step(
                    us.entropy(pred), d, noise, torch.tensor([sched["entropy_bound"]])
                )
                trace_row = (estep.accepted, estep.canvas)
            argmax, h = pred.argmax(-1), us.entropy(pred)
            fired, _, _, history = us.stable_and_confident(argmax, h, history, conf)
            trace.steps.append(PipelineStep(canvas, argmax, *trace_row, float(h.mean())))
            sc, canvas = pred, trace_row[1]
            if bool(fired.all()):
                trace.stop_fired, canvas = True, argmax
                break
        trace.appended = canvas
        canvases.append(trace)
        pieces.append(canvas)
        to_encode = canvas
        if call["eos_early_stop"] and bool((canvas == eos).any()):
            break
    return canvases, torch.cat(pieces, dim=1), encoder_forwards, decoder_forwards
