"""The default model's training recipe on a slice of the stdlib: seconds on CPU, no network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from marble.families.masked.config import preset
from marble.families.masked.loader import load_model
from marble.families.masked.model import Denoiser
from marble.training.corpus import (
    EOS_TOKEN,
    MASK_TOKEN,
    is_heldout,
    package_sources,
    read_sources,
    split_files,
    stdlib_files,
    train_tokenizer,
)
from marble.training.evaluate import training_summary
from marble.training.objective import features, noise, stratified_t
from marble.training.train import Batches, TrainConfig, export, train, training_seconds


def tiny(run_dir, **overrides) -> TrainConfig:
    fields = dict(
        run_dir=str(run_dir),
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=2,
        mlp_hidden=128,
        seq_len=64,
        batch_size=8,
        tokens=8 * 64 * 30,
        warmup_steps=3,
        eval_every=10,
        eval_windows=8,
        threads=1,
        compile=False,
        max_files=8,
    )
    return TrainConfig(**(fields | overrides))


def test_corpus_excludes_tests_and_splits_deterministically():
    files = stdlib_files()
    assert files and not any("/test/" in f or f.startswith("test/") for f in files)
    assert not any("site-packages" in f or "idle_test" in f for f in files)
    train_files, held = split_files()
    assert held and set(held) == {f for f in files if is_heldout(f)}
    assert not set(train_files) & set(held)


def test_tokenizer_round_trips_and_has_specials():
    texts = read_sources(split_files()[0][:5])
    tok = train_tokenizer(texts, 400)
    assert tok.token_to_id(EOS_TOKEN) is not None and tok.token_to_id(MASK_TOKEN) is not None
    sample = "def f(x):\n    return x  # ünïcode\t\n\n"
    assert tok.decode(tok.encode(sample).ids) == sample


def test_features_match_forward():
    model = Denoiser(preset("tiny"))
    model.init_weights()
    ids = torch.randint(0, 384, (2, 10))
    torch.testing.assert_close(model.lm_head(features(model, ids)), model(ids))


def test_noise_keeps_prefix_and_mask_rate():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(2, 100, (64, 128))
    t = stratified_t(64, 1e-3, gen)
    assert t.min() > 0 and t.max() <= 1
    prefix = torch.full((64,), 16)
    canvas, masked, eligible = noise(x0, t, prefix, mask_id=1, generator=gen)
    assert torch.equal(canvas[:, :16], x0[:, :16]) and not masked[:, :16].any()
    assert torch.equal(canvas[masked], torch.ones(int(masked.sum()), dtype=torch.long))
    assert abs(masked.float().mean().item() - 0.5 * 112 / 128) < 0.05


def test_trains_exports_and_loads(tmp_path):
    state = train(tiny(tmp_path / "run"))
    bounds = [h["heldout_bound"] for h in state["history"]]
    assert all(torch.isfinite(torch.tensor(bounds))) and bounds[-1] < bounds[0]
    out = export(tmp_path / "run", tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "marble" and cfg["torch_dtype"] == "bfloat16"
    assert None not in (cfg["mask_token_id"], cfg["eos_token_id"], cfg["pad_token_id"])
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["mask_token"] == MASK_TOKEN and tok_cfg["bos_token"] is None
    assert "chat_template" not in tok_cfg  # trained on code only: chat is a documented 400
    defaults = json.loads((out / "marble_defaults.json").read_text())
    assert set(defaults) == {"temperature", "remasking", "threshold", "block_length", "steps"}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    model = load_model(out, progress=False)
    logits = model(torch.tensor([[cfg["mask_token_id"]] * 5]))
    assert logits.shape == (1, 5, cfg["vocab_size"]) and torch.isfinite(logits).all()


@pytest.mark.parametrize("split", [2])
def test_resume_continues_the_same_run(tmp_path, split):
    straight = train(tiny(tmp_path / "a", tokens=8 * 64 * 4, eval_every=100))
    first = train(tiny(tmp_path / "b", tokens=8 * 64 * 4, eval_every=100), stop_after=split)
    assert first["step"] == split
    saved = torch.load(tmp_path / "b" / "state.pt", weights_only=False)
    resumed = train(tiny(tmp_path / "b", tokens=8 * 64 * 4, eval_every=100), resume=saved)
    assert resumed["step"] == straight["step"] == 4
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value)


def test_extra_pool_rows_follow_the_weights():
    stdlib, extra = [np.full(300, 7, dtype=np.int32)], [np.full(300, 9, dtype=np.int32)]
    tc = tiny("unused", batch_size=400, prefix_share=0.0, end_share=0.0)
    x0, _ = Batches([stdlib, extra], [0.25, 0.75], tc, eos_id=0).next()
    share_extra = (x0[:, 0] == 9).float().mean().item()
    assert set(x0[:, 0].tolist()) == {7, 9} and abs(share_extra - 0.75) < 0.08


def test_package_sources_read_installed_dependencies():
    texts = package_sources(["jinja2"])
    assert texts and any("class Environment" in t for t in texts)
    with pytest.raises(FileNotFoundError, match="no_such_package"):
        package_sources(["no_such_package"])


def test_init_from_starts_a_second_stage_from_the_first(tmp_path):
    first = train(tiny(tmp_path / "a"))
    second_tc = tiny(tmp_path / "b", init_from=str(tmp_path / "a"), extra_packages="jinja2")
    at_start = train(second_tc, stop_after=0)
    for name, value in first["model"].items():
        torch.testing.assert_close(at_start["model"][name], value)
    assert (tmp_path / "b" / "tokenizer.json").read_text() == (
        tmp_path / "a" / "tokenizer.json"
    ).read_text()
    saved = torch.load(tmp_path / "b" / "state.pt", weights_only=False)
    done = train(second_tc, resume=saved)
    assert done["step"] == second_tc.steps and done["init_from"]["tokens_seen"] == 8 * 64 * 30
    out = export(tmp_path / "b", tmp_path / "ckpt")
    lineage = json.loads((out / "marble_training.json").read_text())["init_from"]
    assert lineage["run_dir"] == str(tmp_path / "a")
    assert lineage["train_seconds"] >= 0 and lineage["tokens_seen"] == 8 * 64 * 30
    assert lineage["train_config"]["extra_packages"] == ""
    assert (
        json.loads((out / "marble_training.json").read_text())["train_config"]["extra_packages"]
        == "jinja2"
    )


def test_init_from_refuses_another_architecture(tmp_path):
    train(tiny(tmp_path / "a", tokens=8 * 64 * 2))
    with pytest.raises(SystemExit, match="model config differs"):
        train(tiny(tmp_path / "b", init_from=str(tmp_path / "a"), d_model=32), stop_after=0)


def test_training_seconds_skip_the_gaps_between_restarts(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "2026-01-01 10:00:00,000 INFO config {}\n"
        "2026-01-01 10:00:30,000 INFO step 25 tokens 1\n"
        "2026-01-01 10:01:00,500 INFO saved step 50 (stopped)\n"
        "2026-01-01 12:00:00,000 INFO resumed at step 50 (2 tokens)\n"
        "2026-01-01 12:00:00,000 INFO config {}\n"
        "2026-01-01 12:00:20,000 INFO step 75 tokens 3\n"
    )
    assert training_seconds(log) == 80.5
    assert training_seconds(tmp_path / "missing.log") == 0.0


def test_training_summary_adds_up_the_stages():
    first = {"tokens_seen": 24_000_000, "train_seconds": 3600, "init_from": None}
    second = {"tokens_seen": 12_000_000, "train_seconds": 1800, "init_from": first}
    assert training_summary(second) == (
        "36.0M tokens in 1.50 h of training time (stages: 24.0M tokens, 1.00 h; "
        "12.0M tokens, 0.50 h)"
    )
    assert training_summary(first) == "24.0M tokens in 1.00 h of training time"


def test_rows_are_eos_padded_windows_of_one_file():
    files = [np.array([10 + i] * (40 + 30 * i) + [0], dtype=np.int32) for i in range(6)]
    for end_share in (0.0, 1.0):
        tc = tiny("unused", batch_size=300, end_share=end_share)
        x0, prefix = Batches([files], [1.0], tc, eos_id=0).next()
        assert x0.shape == (300, 64) and ((prefix >= 0) & (prefix < 64)).all()
        for row in x0.tolist():
            body = row[: row.index(0)] if 0 in row else row
            assert len(set(body)) <= 1  # one file's tokens (none if it starts on EOS), then EOS
            assert set(row[len(body) :]) <= {0}
        if end_share == 1.0:
            assert (x0 == 0).any(dim=1).all()  # every row holds its file's end


def test_budget_sets_tokens_from_measured_speed(tmp_path):
    tc = tiny(tmp_path / "run", tokens=8 * 64 * 100_000, budget_s=3.0, eval_every=10_000)
    state = train(tc)
    assert 60 <= state["step"] < 100_000
    assert state["train_config"]["tokens"] == state["step"] * 8 * 64
    assert "budget 3 s:" in (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(SystemExit, match="budget"):
        train(tiny(tmp_path / "short", tokens=8 * 64 * 50, budget_s=3.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_cuda_and_exports_for_cpu(tmp_path):
    state = train(tiny(tmp_path / "run", device="cuda"))
    assert state["history"][-1]["heldout_bound"] < state["history"][0]["heldout_bound"]
    model = load_model(export(tmp_path / "run", tmp_path / "ckpt"), progress=False)
    assert torch.isfinite(model(torch.tensor([[1, 1, 1]]))).all()
