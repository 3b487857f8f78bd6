"""Parity with the upstream reference implementations (../shared/reference/golden).

Logits within 1e-4 on every golden input; temperature-0 traces identical canvas by canvas,
commit counts and NFE equal, for every golden sampler setting we implement. Models, golden
tensors and engines on `--device` (conftest).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from marble.families.masked.loader import load_model
from marble.scheduler.engine import Engine
from marble.scheduler.sampling_params import SamplingParams
from tests.golden_cases import (
    assert_trace,
    dream_params,
    golden_tensors,
    llada_cases,
    llada_params,
    prompt_rows,
)

TOLERANCE = 1e-4


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_logits_match_reference(
    name: str, golden_dir: Path, llada_dir: Path, dream_dir: Path, device: torch.device
):
    model = load_model(llada_dir if name == "llada" else dream_dir, device, progress=False)
    golden = golden_tensors(golden_dir / name / "golden_logits.safetensors", device)
    with torch.no_grad():
        for key in ("a", "c"):
            raw = model(golden[f"{key}.input_ids"], align=False)
            assert (raw - golden[f"{key}.logits"]).abs().max() <= TOLERANCE
        # Padded batch: LLaDA's key-padding semantics (positions 0..L-1, pads included);
        # Dream's sampler call (cumsum positions). Only real positions compare: Marble zeroes
        # padded positions' inputs so no pad value can reach a real one, which changes only
        # the padded positions' own (unused) outputs.
        mask = golden["b.attention_mask"]
        real = mask.bool()
        if name == "llada":
            out = model(golden["b.input_ids"], attention_mask=mask, align=False)
            assert (out - golden["b.logits_key_padding"])[real].abs().max() <= TOLERANCE
        else:
            out = model(golden["b.input_ids"], mask, golden["b.position_ids"], align=False)
            assert (out - golden["b.logits"])[real].abs().max() <= TOLERANCE
        alone = model(golden["b_row0_unpadded.input_ids"], align=False)
        assert (alone - golden["b_row0_unpadded.logits"]).abs().max() <= TOLERANCE


def test_dream_alignment_shifts_right(dream_dir: Path, golden_dir: Path, device: torch.device):
    model = load_model(dream_dir, device, progress=False)
    golden = golden_tensors(golden_dir / "dream" / "golden_logits.safetensors", device)
    ids = golden["a.input_ids"]
    with torch.no_grad():
        raw = model(ids, align=False)
        aligned = model(ids)
        gathered = model(ids, gather=torch.tensor([[0, 5, 23]], device=device))
    assert torch.equal(aligned[:, 1:], raw[:, :-1]) and torch.equal(aligned[:, 0], raw[:, 0])
    assert torch.allclose(gathered, aligned[:, [0, 5, 23]], atol=1e-5)


def _run(engine: Engine, case: dict, params: SamplingParams):
    """Run every row of a case in one batch; returns per-row (canvases, commits per step)."""
    requests = [engine.add(engine.make_request(r, params)) for r in prompt_rows(case)]
    history = {r.request_id: ([], []) for r in requests}
    while engine.has_unfinished():
        for out in engine.step():
            history[out.request_id][0].append(out.tokens)
            history[out.request_id][1].append(len(out.committed))
    return [history[r.request_id] for r in requests]


@pytest.mark.parametrize("index", range(15))
def test_llada_generation_traces(
    index: int, golden_dir: Path, llada_dir: Path, device: torch.device
):
    case = llada_cases(golden_dir, "llada")[index]
    if case["model_variant"] == "original" and case["attention_mask"] is not None:
        pytest.skip(
            "the original file ignores the padding mask; we implement key padding "
            "(the key_padding variant of this case is checked exactly)"
        )
    engine = Engine.from_pretrained(llada_dir, str(device), progress=False)
    seeded = case["torch_manual_seed"] is not None
    # Seeded runs draw from per-request generators, not torch's global one: only the
    # structure (commits per step, NFE) can match.
    params = llada_params(case).replace(seed=case["torch_manual_seed"])
    assert_trace(case, _run(engine, case, params), exact_canvas=not seeded)


@pytest.mark.parametrize("index", range(8))
def test_dream_generation_traces(
    index: int, golden_dir: Path, dream_dir: Path, device: torch.device
):
    case = llada_cases(golden_dir, "dream")[index]
    alg = case["params"]["alg"]
    if alg == "origin":
        pytest.skip("Dream's stochastic 'origin' reveal is not implemented")
    if alg == "confidence_threshold":
        pytest.skip(
            "Fast-dLLM's Dream copy uses its own threshold loop; Marble applies the "
            "Fast-dLLM LLaDA threshold rule to every model (checked on LLaDA)"
        )
    engine = Engine.from_pretrained(dream_dir, str(device), progress=False)
    assert_trace(case, _run(engine, case, dream_params(case)), exact_canvas=True)


def test_chat_prompts_tokenise_like_reference(golden_dir: Path, llada_dir: Path, dream_dir: Path):
    from marble.model.tokenizer import TextTokenizer

    for name, folder in (("llada", llada_dir), ("dream", dream_dir)):
        tok = TextTokenizer(folder)
        for case in llada_cases(golden_dir, name):
            masks = case["attention_mask"]
            for b, message in enumerate(case["chat_messages"]):
                prompt = tok.render_chat([{"role": "user", "content": message}])
                assert prompt == case["chat_prompts"][b]
                ids = case["prompt_ids"][b]
                real = ids if masks is None else [t for t, m in zip(ids, masks[b]) if m]
                assert tok.encode(prompt) == real


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_agrees_on_argmax(
    dtype: torch.dtype, golden_dir: Path, llada_dir: Path, device: torch.device
):
    """16-bit weights are not held to float32 tolerances, only to nearly the same choices.

    16-bit kernels differ by CPU (AMX / AVX512-BF16 or not) and thread count, and this random
    model's logits (|x| up to 29) amplify rounding: on 100 positions bfloat16 took float32's
    top-1 at 90 and float16 at 97, every other pick being float32's 2nd-4th choice (measured on
    CPUs with and without bfloat16 kernels, 1 and 2 threads). Counts, with margin below that.
    """
    model = load_model(llada_dir, device, dtype=dtype, progress=False)
    golden = golden_tensors(golden_dir / "llada" / "golden_logits.safetensors", device)
    with torch.no_grad():
        out = model(golden["c.input_ids"]).float()
    reference = golden["c.logits"]
    picked = reference.gather(-1, out.argmax(-1, keepdim=True))
    rank = (reference > picked).sum(-1)  # 0 = float32's own top choice
    assert int((rank == 0).sum()) >= 80
    assert int(rank.max()) < 8
    engine = Engine(model, Engine.from_pretrained(llada_dir, progress=False).tokenizer)
    final = list(engine.generate("Hello", SamplingParams(max_tokens=16, ignore_eos=True)))[-1]
    assert final.finished and final.num_masked == 0
