"""Checkpoint loading: configs we refuse, precise tensor errors, sharded files, tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from marble.families.masked.config import ModelConfig, preset
from marble.families.masked.loader import load_model
from marble.families.masked.model import Denoiser
from marble.model.loader import CheckpointError, UnsupportedModelError
from marble.model.tokenizer import ChatTemplateError, TextTokenizer


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_moe_config_is_refused_by_name(llada_dir: Path):
    raw = json.loads((llada_dir / "config.json").read_text())
    raw.update(num_experts=64, architectures=["LLaDAMoEModelLM"])
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        ModelConfig.from_json_dict(raw)
    with pytest.raises(UnsupportedModelError, match="model_type"):
        ModelConfig.from_json_dict({"model_type": "gpt2"})


def test_reads_llada_and_dream_configs(llada_dir: Path, dream_dir: Path):
    llada = ModelConfig.from_file(llada_dir / "config.json")
    dream = ModelConfig.from_file(dream_dir / "config.json")
    assert (llada.arch, llada.n_kv_heads, llada.shift_logits, llada.mask_token_id) == (
        "llada",
        4,
        False,
        336,
    )
    assert (dream.arch, dream.n_kv_heads, dream.qkv_bias, dream.shift_logits) == (
        "dream",
        2,
        True,
        True,
    )


def test_missing_extra_and_misshaped_tensors_are_named(llada_dir: Path, tmp_path: Path):
    ckpt = copy_checkpoint(llada_dir, tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors.pop("model.transformer.ln_f.weight")
    tensors["model.transformer.extra.weight"] = torch.zeros(2)
    tensors["model.transformer.wte.weight"] = torch.zeros(10, 64)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, progress=False)
    message = str(err.value)
    assert "missing tensors: ['norm.weight']" in message
    assert "model.transformer.extra.weight" in message
    assert "model.transformer.wte.weight: (10, 64) != (384, 64)" in message


def test_sharded_checkpoint_loads_like_single_file(dream_dir: Path, tmp_path: Path):
    ckpt = copy_checkpoint(dream_dir, tmp_path / "sharded")
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(ckpt / file))
        weight_map.update({n: file for n in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = load_model(ckpt, progress=False)
    single = load_model(dream_dir, progress=False)
    ids = torch.tensor([[1, 2, 3, 343, 343]])
    with torch.no_grad():
        assert torch.equal(sharded(ids), single(ids))


def test_dtype_and_no_weights_error(llada_dir: Path, tmp_path: Path):
    model = load_model(llada_dir, dtype=torch.bfloat16, progress=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 336]])).dtype == torch.bfloat16
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((llada_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(empty, progress=False)


def test_marble_config_roundtrip(tmp_path: Path):
    cfg = preset("tiny", mask_token_id=5)
    assert ModelConfig.from_json_dict(cfg.to_json_dict()) == cfg
    model = Denoiser(cfg)
    model.init_weights()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json_dict()))
    loaded = load_model(tmp_path, progress=False)
    ids = torch.tensor([[1, 2, 5]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids), model(ids))


def test_dream_tokenizer_from_vocab_and_merges(dream_dir: Path, tmp_path: Path):
    ckpt = copy_checkpoint(dream_dir, tmp_path / "dream")
    (ckpt / "tokenizer.json").unlink()
    rebuilt, original = TextTokenizer(ckpt), TextTokenizer(dream_dir)
    text = "Hello wörld!\n  def f(x): return x+1 <|im_end|>"
    assert rebuilt.encode(text) == original.encode(text)
    assert rebuilt.special == original.special


def test_chat_template_and_special_ids(llada_dir: Path, dream_dir: Path, tmp_path: Path):
    llada, dream = TextTokenizer(llada_dir), TextTokenizer(dream_dir)
    assert (llada.special.mask, llada.special.eos, llada.special.eot) == (336, 321, 348)
    assert (dream.special.mask, dream.special.eos, dream.special.eot) == (343, 320, 322)
    prompt = dream.render_chat([{"role": "user", "content": "Hi!"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "You are a helpful assistant." in prompt
    ckpt = copy_checkpoint(llada_dir, tmp_path / "plain")
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatTemplateError):
        TextTokenizer(ckpt).render_chat([{"role": "user", "content": "Hi"}])


def test_loading_keeps_one_copy_of_the_weights(tmp_path: Path):
    """Peak memory while loading (and touching every weight) stays near 1x the file size."""
    import subprocess
    import sys

    cfg = preset(
        "small",
        vocab_size=8192,
        d_model=512,
        n_layers=4,
        n_heads=8,
        n_kv_heads=8,
        mlp_hidden=1536,
        mask_token_id=5,
    )
    model = Denoiser(cfg)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json_dict()))
    size_mb = (tmp_path / "model.safetensors").stat().st_size / 2**20
    script = (
        "import resource, torch\n"
        "from marble.families.masked.loader import load_model\n"
        "torch.ones(1)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"m = load_model({str(tmp_path)!r}, progress=False)\n"
        "print(sum(float(p.float().sum()) for p in m.parameters()))\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    delta_mb = float(out.stdout.split()[-1])
    assert delta_mb < 1.5 * size_mb, (
        f"loading {size_mb:.0f} MB raised peak RSS by {delta_mb:.0f} MB"
    )
