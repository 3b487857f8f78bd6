"""Loading DiffusionGemma checkpoints: real keys and tensor names, sharded files, and clear
errors for what is missing, unexpected or unsupported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from marble.families.diffusion_gemma.config import (
    DiffusionGemmaConfig,
    DiffusionGemmaGenerationConfig,
)
from marble.families.diffusion_gemma.family import DiffusionGemmaFamily
from marble.families.diffusion_gemma.loader import load_diffusion_gemma
from marble.model.loader import CheckpointError, UnsupportedModelError

MODEL_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "diffusiongemma-tiny"
if not MODEL_DIR.exists():
    pytest.skip(f"reference data {MODEL_DIR} is absent", allow_module_level=True)


def _copy_without_weights(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(MODEL_DIR / name, folder / name)
    return folder


def test_config_reads_the_real_keys():
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    assert DiffusionGemmaFamily.detects(raw)
    cfg = DiffusionGemmaConfig.from_json_dict(raw)
    assert cfg.layer_types.count("full_attention") == 2 and cfg.num_layers == 6
    assert (cfg.global_head_dim, cfg.num_global_key_value_heads) == (32, 1)
    assert (cfg.sliding_window, cfg.canvas_length, cfg.final_logit_softcapping) == (24, 16, 30.0)
    assert cfg.full_partial_rotary_factor == 0.25
    gen = DiffusionGemmaGenerationConfig.from_folder(MODEL_DIR)
    assert (gen.max_denoising_steps, gen.t_min, gen.t_max, gen.entropy_bound) == (8, 0.4, 0.8, 0.1)


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_activation": "silu"},
        {"attention_k_eq_v": False},
        {"per_layer_config": [{}]},
        {"layer_types": ["sliding_attention", "chunked_attention"] * 3},
        {"tie_word_embeddings": False},
    ],
)
def test_config_refuses_what_it_cannot_run(change: dict):
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    raw["text_config"].update(change)
    with pytest.raises(UnsupportedModelError):
        DiffusionGemmaConfig.from_json_dict(raw)


def test_generation_config_validates():
    raw = json.loads((MODEL_DIR / "generation_config.json").read_text())
    with pytest.raises(ValueError, match="t_min"):
        DiffusionGemmaGenerationConfig.from_json_dict({**raw, "t_min": 0.9})
    with pytest.raises(UnsupportedModelError, match="sampler_config"):
        DiffusionGemmaGenerationConfig.from_json_dict({**raw, "sampler_config": {"_cls_name": "X"}})


def test_sharded_checkpoint_loads_identically(tmp_path: Path):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    names = sorted(tensors)
    folder = _copy_without_weights(tmp_path)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded, single = load_diffusion_gemma(folder), load_diffusion_gemma(MODEL_DIR)
    for (name, a), (_, b) in zip(
        sharded.state_dict().items(), single.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert float(single.layers[0].layer_scalar) != float(single.layers[0].encoder_layer_scalar)


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    del tensors["model.encoder.language_model.layers.3.layer_scalar"]
    tensors["model.decoder.layers.0.self_attn.v_norm.weight"] = torch.ones(16)
    folder = _copy_without_weights(tmp_path)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_diffusion_gemma(folder)
    assert "layers.3.encoder_layer_scalar" in str(err.value)
    assert "model.decoder.layers.0.self_attn.v_norm.weight" in str(err.value)


def test_mis_shaped_tensor_is_named(tmp_path: Path):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    tensors["model.decoder.layers.2.self_attn.q_norm.weight"] = torch.ones(16)
    folder = _copy_without_weights(tmp_path)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_norm.weight: \(16,\) != \(32,\)"):
        load_diffusion_gemma(folder)
