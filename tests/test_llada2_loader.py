"""Loading LLaDA2.x checkpoints: the real config keys and tensor names, sharded files, clear
errors for what is missing, unexpected or unsupported, and the generation defaults."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from marble.families.llada2.config import (
    DEFAULT,
    PRESETS,
    LLaDA2Config,
    LLaDA2GenerationConfig,
)
from marble.families.llada2.family import LLaDA2Family
from marble.families.llada2.loader import load_llada2
from marble.model.loader import CheckpointError, UnsupportedModelError

MODEL_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llada2-tiny"
if not MODEL_DIR.exists():
    pytest.skip(f"reference data {MODEL_DIR} is absent", allow_module_level=True)
RAW = json.loads((MODEL_DIR / "config.json").read_text())


def _copy_without_weights(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(MODEL_DIR / name, folder / name)
    return folder


def test_config_reads_the_real_keys():
    assert LLaDA2Family.detects(RAW) and not LLaDA2Family.detects({"model_type": "llada"})
    cfg = LLaDA2Config.from_json_dict(RAW)
    assert (cfg.num_hidden_layers, cfg.head_dim, cfg.rotary_dim) == (3, 16, 8)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (8, 2, 4, 2)
    assert [cfg.is_moe(i) for i in range(3)] == [False, True, True]
    assert (cfg.routed_scaling_factor, cfg.rope_theta, cfg.pad_token_id) == (2.5, 600000.0, 448)


@pytest.mark.parametrize(
    "change",
    [
        {"model_type": "llada"},
        {"hidden_act": "gelu"},
        {"score_function": "softmax"},
        {"tie_word_embeddings": True},
        {"use_qkv_bias": True},
        {"use_qk_norm": False},
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
    ],
)
def test_config_refuses_what_it_cannot_run(change: dict):
    with pytest.raises(UnsupportedModelError):
        LLaDA2Config.from_json_dict({**RAW, **change})


def test_generation_defaults_are_data():
    gen = LLaDA2GenerationConfig.from_folder(MODEL_DIR)
    assert (gen.eos_token_id, gen.pad_token_id) == (448, 448)
    assert (DEFAULT.threshold, DEFAULT.editing_threshold, DEFAULT.max_post_steps) == (0.95, 0.9, 16)
    assert (DEFAULT.block_length, DEFAULT.num_to_transfer, DEFAULT.eos_early_stop) == (32, 1, False)
    quality, speed = PRESETS["quality"], PRESETS["speed"]
    assert (quality.threshold, quality.editing_threshold) == (0.7, 0.5)
    assert (speed.threshold, speed.editing_threshold) == (0.5, 0.0)
    with pytest.raises(ValueError, match="num_to_transfer"):
        replace(DEFAULT, num_to_transfer=0)


def test_sharded_checkpoint_loads_identically(tmp_path: Path):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    names = sorted(tensors)
    folder = _copy_without_weights(tmp_path)
    weight_map = {}
    for shard, part in (("a.safetensors", names[::2]), ("b.safetensors", names[1::2])):
        save_file({n: tensors[n] for n in part}, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded, single = load_llada2(folder), load_llada2(MODEL_DIR)
    for (name, a), (_, b) in zip(
        sharded.state_dict().items(), single.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert len(single.state_dict()) == len(tensors) == 82


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    del tensors["model.layers.2.mlp.gate.expert_bias"]
    tensors["model.layers.0.mlp.gate.weight"] = torch.zeros(8, 64)  # layer 0 is dense
    folder = _copy_without_weights(tmp_path)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_llada2(folder)
    assert "layers.2.mlp.gate.expert_bias" in str(err.value)
    assert "model.layers.0.mlp.gate.weight" in str(err.value)
