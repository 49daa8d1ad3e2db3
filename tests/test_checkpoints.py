"""The library's model classes match the real released checkpoints, and the tiny models load through the Auto API.

The real checkpoints (GSAI-ML/LLaDA-8B-Base, LLaDA-8B-Instruct, LLaDA-1.5, Dream-org/Dream-v0-Base-7B,
Dream-v0-Instruct-7B) are represented by their `config.json`, `generation_config.json` and
`model.safetensors.index.json` under tests/fixtures/checkpoints. The models are built on the meta device, so no
weights are allocated: the parameter names must equal the index's `weight_map` keys exactly, and the parameter count
times 2 (the real weights are bf16) must equal the index's `metadata.total_size`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import dlm_generation
from dlm_generation import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINTS = FIXTURES / "checkpoints"
GOLDEN = FIXTURES / "golden"

LLADA_CHECKPOINTS = ["GSAI-ML--LLaDA-8B-Base", "GSAI-ML--LLaDA-8B-Instruct", "GSAI-ML--LLaDA-1.5"]
DREAM_CHECKPOINTS = ["Dream-org--Dream-v0-Base-7B", "Dream-org--Dream-v0-Instruct-7B"]
ALL_CHECKPOINTS = LLADA_CHECKPOINTS + DREAM_CHECKPOINTS

# Values of the released configs, written out by hand (not read from the fixture) so that a config class that
# silently rewrites a field is caught. Aliases (hidden_size for d_model, ...) are checked through attribute_map.
LLADA_FIELDS = {
    "model_type": "llada",
    "d_model": 4096,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "vocab_size": 126464,
    "embedding_size": 126464,
    "max_sequence_length": 4096,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "mask_token_id": 126336,
    "eos_token_id": 126081,
    "pad_token_id": 126081,
    "weight_tying": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "rope": True,
    "alibi": False,
    "use_cache": False,
    "precision": "amp_bf16",
    "init_device": "meta",
    # attribute_map aliases
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "intermediate_size": 12288,
    "max_position_embeddings": 4096,
}
DREAM_FIELDS = {
    "model_type": "Dream",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "mask_token_id": 151666,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "use_mrope": False,
    "hidden_act": "silu",
    "use_cache": True,
}

# Keys of the original config.json whose value legitimately changes on load/save under transformers 5.
VOLATILE_KEYS = {"transformers_version", "torch_dtype", "dtype", "_name_or_path"}

LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}
DREAM_AUTO_MAP = {
    "AutoConfig": "configuration_dream.DreamConfig",
    "AutoModel": "modeling_dream.DreamModel",
    "AutoModelForCausalLM": "modeling_dream.DreamModel",
}


def _family(name: str) -> str:
    return "llada" if name in LLADA_CHECKPOINTS else "dream"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.fixture(params=ALL_CHECKPOINTS)
def checkpoint(request) -> Path:
    return CHECKPOINTS / request.param


# ---------------------------------------------------------------------------------------------------------------
# Real checkpoints: configs
# ---------------------------------------------------------------------------------------------------------------


def test_fixture_set_is_complete():
    assert sorted(p.name for p in CHECKPOINTS.iterdir() if p.is_dir()) == sorted(ALL_CHECKPOINTS)
    for name in ALL_CHECKPOINTS:
        for file in ("config.json", "generation_config.json", "model.safetensors.index.json"):
            assert (CHECKPOINTS / name / file).is_file(), (name, file)


def test_autoconfig_loads_real_config_unchanged(checkpoint):
    config = AutoConfig.from_pretrained(checkpoint)
    family = _family(checkpoint.name)
    expected_class, expected_fields = (
        (LLaDAConfig, LLADA_FIELDS) if family == "llada" else (DreamConfig, DREAM_FIELDS)
    )
    assert type(config) is expected_class
    for field, value in expected_fields.items():
        assert getattr(config, field) == value, field
        assert type(getattr(config, field)) is type(value), field

    # Every key of the original file keeps its value (the config classes promise to accept the files unchanged).
    original = _read_json(checkpoint / "config.json")
    as_dict = config.to_dict()
    for key, value in original.items():
        if key in VOLATILE_KEYS or key in {"auto_map", "rope_scaling"}:
            continue
        assert key in as_dict, key
        assert as_dict[key] == value, key

    # The original auto_map (AutoConfig + AutoModel, and for LLaDA AutoModelForCausalLM) is kept and completed.
    assert original["auto_map"].items() <= config.auto_map.items()
    assert config.auto_map == (LLADA_AUTO_MAP if family == "llada" else DREAM_AUTO_MAP)


@pytest.mark.parametrize("name", DREAM_CHECKPOINTS)
def test_dream_rope_scaling_null_means_plain_rope(name):
    # The released Dream configs carry "rope_scaling": null. transformers 5 moved RoPE settings to
    # `rope_parameters`; DreamConfig stores no rope_parameters when rope_scaling is null. The semantics to keep:
    # no scaled RoPE on load, and none after a save/load round trip.
    config = AutoConfig.from_pretrained(CHECKPOINTS / name)
    assert _read_json(CHECKPOINTS / name / "config.json")["rope_scaling"] is None
    assert getattr(config, "rope_parameters", None) is None
    assert config.to_dict().get("rope_scaling") is None
    assert config.to_dict().get("rope_parameters") is None


def test_dream_config_rope_scaling_attribute_is_none():
    config = AutoConfig.from_pretrained(CHECKPOINTS / DREAM_CHECKPOINTS[0])
    assert config.rope_scaling is None


# ---------------------------------------------------------------------------------------------------------------
# Real checkpoints: parameter names and shapes on the meta device
# ---------------------------------------------------------------------------------------------------------------


def test_meta_model_state_dict_keys_match_weight_map(checkpoint):
    config = AutoConfig.from_pretrained(checkpoint)
    model = _meta_model(config)
    assert type(model) is (LLaDAModelLM if _family(checkpoint.name) == "llada" else DreamModel)
    weight_map = _read_json(checkpoint / "model.safetensors.index.json")["weight_map"]
    state_keys = set(model.state_dict())
    assert state_keys - set(weight_map) == set(), "parameters the checkpoint does not have"
    assert set(weight_map) - state_keys == set(), "checkpoint tensors the model does not have"
    assert len(state_keys) == len(weight_map)
    # Nothing is materialised: every tensor lives on the meta device.
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}


def test_meta_model_parameter_count_matches_total_size(checkpoint):
    config = AutoConfig.from_pretrained(checkpoint)
    model = _meta_model(config)
    total_size = _read_json(checkpoint / "model.safetensors.index.json")["metadata"]["total_size"]
    numel = sum(p.numel() for p in model.parameters())
    assert numel * 2 == total_size  # released weights are bf16
    # Also through the state dict (catches a tied / shared tensor that parameters() would count once).
    assert sum(t.numel() for t in model.state_dict().values()) * 2 == total_size
    assert model.num_parameters() * 2 == total_size


@pytest.mark.parametrize("name", LLADA_CHECKPOINTS)
def test_llada_explicit_shapes(name):
    config = AutoConfig.from_pretrained(CHECKPOINTS / name)
    model = _meta_model(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, mlp, vocab = 4096, 12288, 126464
    assert shapes["model.transformer.wte.weight"] == (vocab, d)  # rows = embedding_size
    assert shapes["model.transformer.ff_out.weight"] == (vocab, d)
    assert shapes["model.transformer.ln_f.weight"] == (d,)
    n_blocks = len({k.split(".")[3] for k in shapes if k.startswith("model.transformer.blocks.")})
    assert n_blocks == 32
    for i in (0, 31):
        prefix = f"model.transformer.blocks.{i}."
        assert shapes[prefix + "q_proj.weight"] == (d, d)
        assert shapes[prefix + "k_proj.weight"] == (d, d)  # n_kv_heads = n_heads = 32
        assert shapes[prefix + "v_proj.weight"] == (d, d)
        assert shapes[prefix + "attn_out.weight"] == (d, d)
        assert shapes[prefix + "ff_proj.weight"] == (mlp, d)
        assert shapes[prefix + "up_proj.weight"] == (mlp, d)
        assert shapes[prefix + "ff_out.weight"] == (d, mlp)
        assert shapes[prefix + "attn_norm.weight"] == (d,)
        assert shapes[prefix + "ff_norm.weight"] == (d,)
    assert not any(k.endswith(".bias") for k in shapes)  # include_bias / include_qkv_bias are false
    assert model.get_input_embeddings().weight.shape == (vocab, d)
    assert model.get_output_embeddings().weight.shape == (vocab, d)


@pytest.mark.parametrize("name", DREAM_CHECKPOINTS)
def test_dream_explicit_shapes(name):
    config = AutoConfig.from_pretrained(CHECKPOINTS / name)
    model = _meta_model(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hidden, inter, vocab = 3584, 18944, 152064
    head_dim = hidden // 28
    assert head_dim == 128
    kv_width = 4 * head_dim  # GQA: 4 kv heads of dim 128
    assert kv_width == 512
    assert shapes["model.embed_tokens.weight"] == (vocab, hidden)
    assert shapes["lm_head.weight"] == (vocab, hidden)
    assert shapes["model.norm.weight"] == (hidden,)
    n_layers = len({k.split(".")[2] for k in shapes if k.startswith("model.layers.")})
    assert n_layers == 28
    for i in (0, 27):
        prefix = f"model.layers.{i}."
        assert shapes[prefix + "self_attn.q_proj.weight"] == (hidden, hidden)
        assert shapes[prefix + "self_attn.q_proj.bias"] == (hidden,)
        assert shapes[prefix + "self_attn.k_proj.weight"] == (512, 3584)
        assert shapes[prefix + "self_attn.k_proj.bias"] == (kv_width,)
        assert shapes[prefix + "self_attn.v_proj.weight"] == (kv_width, hidden)
        assert shapes[prefix + "self_attn.v_proj.bias"] == (kv_width,)
        assert shapes[prefix + "self_attn.o_proj.weight"] == (hidden, hidden)
        assert prefix + "self_attn.o_proj.bias" not in shapes
        assert shapes[prefix + "mlp.gate_proj.weight"] == (inter, hidden)
        assert shapes[prefix + "mlp.up_proj.weight"] == (inter, hidden)
        assert shapes[prefix + "mlp.down_proj.weight"] == (hidden, inter)
        assert shapes[prefix + "input_layernorm.weight"] == (hidden,)
        assert shapes[prefix + "post_attention_layernorm.weight"] == (hidden,)
    # tie_word_embeddings is false: the head is a separate tensor even though the class declares a tie.
    assert model.lm_head.weight is not model.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------------------------
# Real checkpoints: config save/load round trip
# ---------------------------------------------------------------------------------------------------------------


def test_config_save_pretrained_round_trip_keeps_every_key(checkpoint, tmp_path):
    family = _family(checkpoint.name)
    original = _read_json(checkpoint / "config.json")
    config = AutoConfig.from_pretrained(checkpoint)
    config.save_pretrained(tmp_path)
    saved = _read_json(tmp_path / "config.json")
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert type(reloaded) is type(config)
    reloaded_dict = reloaded.to_dict()

    for key, value in original.items():
        if key in VOLATILE_KEYS:
            continue
        if key == "auto_map":
            # The original entries are kept; AutoModelForCausalLM is added for Dream (LLaDA already had it).
            expected = LLADA_AUTO_MAP if family == "llada" else DREAM_AUTO_MAP
            assert value.items() <= saved["auto_map"].items()
            assert saved["auto_map"] == expected
            assert reloaded.auto_map == expected
            continue
        if key == "rope_scaling":
            # null: transformers 5 drops the legacy key on save rather than writing null; it must not turn into
            # a non-null RoPE setting under either name.
            assert value is None
            assert saved.get("rope_scaling") is None
            assert saved.get("rope_parameters") is None
            assert getattr(reloaded, "rope_parameters", None) is None
            continue
        assert key in saved, f"{key} lost on save"
        assert saved[key] == value, key
        assert reloaded_dict[key] == value, key
        assert getattr(reloaded, key) == value, key

    # The dtype of the released weights survives under its transformers-5 name.
    if "torch_dtype" in original:
        assert saved["dtype"] == original["torch_dtype"]
        assert reloaded.dtype == getattr(torch, original["torch_dtype"])
    # The reloaded config is the same config (up to its source path).
    first = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    second = {k: v for k, v in reloaded_dict.items() if k != "_name_or_path"}
    assert first == second


# ---------------------------------------------------------------------------------------------------------------
# Tiny golden models through the Auto API (no trust_remote_code)
# ---------------------------------------------------------------------------------------------------------------

TINY = {
    "tiny-llada": (LLaDAConfig, LLaDAModelLM),
    "tiny-dream": (DreamConfig, DreamModel),
}
PROMPT = torch.tensor([[495, 65, 138, 430, 447, 294, 491, 416, 151, 336]])


@pytest.fixture(scope="module")
def golden_state_dicts():
    return {name: load_file(GOLDEN / name / "model.safetensors") for name in TINY}


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_autoconfig_gives_library_class(name):
    config = AutoConfig.from_pretrained(GOLDEN / name)
    assert type(config) is TINY[name][0]
    assert type(config).__module__.startswith("dlm_generation.")
    assert config.mask_token_id == 500
    assert config.eos_token_id == 501
    assert config.vocab_size == 512


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM], ids=["AutoModel", "AutoModelForCausalLM"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_from_pretrained_without_trust_remote_code(name, auto_class, golden_state_dicts):
    # The golden config.json carries an auto_map, but the registered model types take precedence: no remote code.
    model, info = auto_class.from_pretrained(GOLDEN / name, output_loading_info=True)
    assert type(model) is TINY[name][1]
    assert type(model).__module__.startswith("dlm_generation.")
    assert type(model.config) is TINY[name][0]
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    assert not info["error_msgs"]
    assert not model.training
    expected = golden_state_dicts[name]
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.generation_config.mask_token_id == 500


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_device_map_auto_on_cpu(name, golden_state_dicts):
    reference = AutoModelForCausalLM.from_pretrained(GOLDEN / name)
    model = AutoModelForCausalLM.from_pretrained(GOLDEN / name, device_map="auto")
    assert type(model) is TINY[name][1]
    devices = {t.device.type for t in model.state_dict().values()}
    if torch.cuda.is_available():
        assert "meta" not in devices
    else:
        assert devices == {"cpu"}
    hf_map = getattr(model, "hf_device_map", None)
    if hf_map is not None:  # transformers 5 only sets it when the model is dispatched over several devices
        assert "disk" not in hf_map.values()
    expected = golden_state_dicts[name]
    state = model.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(state[key].cpu(), tensor), key
    with torch.no_grad():
        logits = model(PROMPT.to(model.device)).logits
        ref_logits = reference(PROMPT).logits
    assert logits.shape == (1, PROMPT.shape[1], 512)
    torch.testing.assert_close(logits.cpu(), ref_logits)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_from_pretrained_bfloat16(name):
    model = AutoModelForCausalLM.from_pretrained(GOLDEN / name, dtype=torch.bfloat16)
    assert type(model) is TINY[name][1]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.dtype == torch.bfloat16
    assert model.config.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(PROMPT).logits
    assert logits.dtype == torch.bfloat16
    assert bool(torch.isfinite(logits).all())
    extra = {"block_length": 8} if name == "tiny-llada" else {"alg": "entropy"}
    out = model.diffusion_generate(
        PROMPT, max_new_tokens=8, steps=8, return_dict_in_generate=True, **extra
    )
    assert out.sequences.shape == (1, PROMPT.shape[1] + 8)
    assert torch.equal(out.sequences[:, : PROMPT.shape[1]], PROMPT)
    assert not bool((out.sequences == 500).any())


def test_package_registers_auto_classes():
    # Importing the package registered both model types (import at module top); the mappings resolve to the
    # library classes for both Auto classes.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert CONFIG_MAPPING["llada"] is LLaDAConfig
    assert CONFIG_MAPPING["Dream"] is DreamConfig
    for config_class, model_class in ((LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModel)):
        assert AutoModel._model_mapping[config_class] is model_class
        assert AutoModelForCausalLM._model_mapping[config_class] is model_class
    assert dlm_generation.LLaDAModelLM is LLaDAModelLM
