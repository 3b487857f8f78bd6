"""SDAR's checkpoint files: the loader reports every missing and unexpected tensor, reads a
sharded index and ties the head when asked; the configs refuse what the model cannot run and
bad values; the shared tokenizer reproduces upstream's prompt ids from the chat template."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from marble.families.sdar.config import (
    Remasking,
    SDARConfig,
    SDARDecodeSettings,
    SDARGenerationConfig,
)
from marble.families.sdar.loader import load_sdar
from marble.model.loader import CheckpointError, UnsupportedModelError
from marble.model.tokenizer import TextTokenizer

REFERENCE = Path(__file__).resolve().parents[4] / "shared" / "reference"
MODEL_DIR = REFERENCE / "sdar-tiny"
GOLDEN = REFERENCE / "golden" / "sdar" / "golden_generate.json"
if not MODEL_DIR.exists():
    pytest.skip(f"reference data {MODEL_DIR} is absent", allow_module_level=True)

RAW = json.loads((MODEL_DIR / "config.json").read_text())


def _copy(tmp_path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or RAW))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_loads_the_tiny_checkpoint_with_every_tensor():
    model = load_sdar(MODEL_DIR)
    stored = load_file(str(MODEL_DIR / "model.safetensors"))
    ours = dict(model.named_parameters())
    assert len(stored) == len(ours) == 36
    for name, tensor in stored.items():
        assert torch.equal(ours[name.removeprefix("model.")], tensor), name
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()


def test_missing_and_unexpected_tensors_are_all_named(tmp_path: Path):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    del tensors["model.layers.1.self_attn.q_norm.weight"], tensors["lm_head.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    tensors["model.rotary_emb.inv_freq"] = torch.zeros(8)
    with pytest.raises(CheckpointError) as err:
        load_sdar(_copy(tmp_path, tensors))
    message = str(err.value)
    for name in ("layers.1.self_attn.q_norm.weight", "lm_head.weight", "q_proj.bias", "inv_freq"):
        assert name in message


def test_mis_shaped_tensor_is_refused(tmp_path: Path):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(65)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_sdar(_copy(tmp_path, tensors))


def test_sharded_index_loads_the_same_weights(tmp_path: Path):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(MODEL_DIR / "config.json", folder)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:20],
        "model-00002-of-00002.safetensors": names[20:],
    }
    weight_map = {}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / shard))
        weight_map |= dict.fromkeys(part, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded, single = load_sdar(folder), load_sdar(MODEL_DIR)
    for (name, a), (_, b) in zip(sharded.named_parameters(), single.named_parameters()):
        assert torch.equal(a, b), name


def test_tied_head_is_the_embedding(tmp_path: Path):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    del tensors["lm_head.weight"]
    model = load_sdar(_copy(tmp_path, tensors, RAW | {"tie_word_embeddings": True}))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_config_reads_the_real_keys():
    cfg = SDARConfig.from_json_dict(RAW)
    assert (cfg.num_hidden_layers, cfg.head_dim, cfg.num_key_value_heads) == (3, 16, 2)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.block_size) == (479, 453, 4)
    assert cfg.rope_theta == 1e6 and not cfg.tie_word_embeddings


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"model_type": "qwen3"}, UnsupportedModelError),
        ({"hidden_act": "gelu"}, UnsupportedModelError),
        ({"attention_bias": True}, UnsupportedModelError),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, UnsupportedModelError),
        ({"use_sliding_window": True}, UnsupportedModelError),
        ({"num_experts": 128}, UnsupportedModelError),
        ({"num_key_value_heads": 3}, ValueError),
        ({"head_dim": 15}, ValueError),
        ({"vocab_size": 0}, ValueError),
        ({"num_hidden_layers": -1}, ValueError),
        ({"rms_norm_eps": 0}, ValueError),
        ({"rope_theta": math.inf}, ValueError),
        ({"mask_token_id": 512}, ValueError),
        ({"block_size": 0}, ValueError),
    ],
)
def test_config_refuses(change: dict, error: type[Exception]):
    with pytest.raises(error):
        SDARConfig.from_json_dict(RAW | change)


def test_config_needs_the_shape_keys():
    with pytest.raises(UnsupportedModelError, match="hidden_size"):
        SDARConfig.from_json_dict({k: v for k, v in RAW.items() if k != "hidden_size"})


def test_generation_config_gives_stop_ids_and_sampling_defaults():
    gen = SDARGenerationConfig.from_folder(MODEL_DIR)
    assert gen.stop_ids == (455, 453) and gen.pad_token_id == 453 and gen.do_sample
    assert (gen.temperature, gen.top_k, gen.top_p) == (0.6, 20, 0.95)
    fallback = SDARGenerationConfig.from_json_dict({}, RAW)
    assert fallback.stop_ids == (453,)
    with pytest.raises(ValueError):
        SDARGenerationConfig.from_json_dict({"eos_token_id": 1, "top_p": 0.0})


@pytest.mark.parametrize(
    "change",
    [
        {"block_length": 0},
        {"steps": 0},
        {"block_length": 2.5},
        {"confidence_threshold": 1.5},
        {"confidence_threshold": math.nan},
        {"temperature": -0.1},
        {"temperature": math.inf},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": math.nan},
        {"remasking": 7},
    ],
)
def test_decode_settings_refuse(change: dict):
    with pytest.raises(ValueError):
        replace(SDARDecodeSettings(), **change)


def test_remasking_names():
    assert Remasking.from_name("low_confidence_dynamic") is Remasking.DYNAMIC
    with pytest.raises(ValueError):
        Remasking.from_name("entropy_bounded")  # crashes upstream


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden runs absent")
def test_tokenizer_gives_upstream_prompt_ids():
    tok = TextTokenizer(MODEL_DIR)
    assert tok.special.mask == 479 and tok.special.stop_ids == {453, 455}
    for case in json.loads(GOLDEN.read_text())["cases"]:
        if case["chat_messages"]:
            kwargs = {} if case["enable_thinking"] is None else {"enable_thinking": False}
            text = tok.render_chat(case["chat_messages"], template_kwargs=kwargs)
            assert text == case["prompt_text"], case["name"]
        assert tok.encode(case["prompt_text"]) == case["prompt_ids"], case["name"]
