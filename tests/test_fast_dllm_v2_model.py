"""The Fast-dLLM v2 model family: released configs load unchanged, Qwen2's parameter names, block-causal logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dlm_generation.configuration_fast_dllm_v2 import FastDLLMV2Config
from dlm_generation.modeling_fast_dllm_v2 import FastDLLMV2Model, block_causal_mask

FIXTURES = Path(__file__).parent / "fixtures" / "block_diffusion"
RELEASED = {  # written out by hand, so that a config class that rewrites a field is caught
    "Efficient-Large-Model--Fast_dLLM_v2_7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                                   tie_word_embeddings=False),
    "Efficient-Large-Model--Fast_dLLM_v2_1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                                     num_attention_heads=12, num_key_value_heads=2,
                                                     vocab_size=151936, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_the_released_config_loads_unchanged(name, tmp_path):
    raw = json.loads((FIXTURES / name / "config.json").read_text())
    config = FastDLLMV2Config.from_pretrained(FIXTURES / name)
    assert config.model_type == raw["model_type"] == "Fast_dLLM_Qwen"
    assert config.bd_size == raw["bd_size"] == 32
    assert config.mask_token_id == 151665 and config.eos_token_id == 151645  # the reference's hard-coded mask
    for field, value in RELEASED[name].items():
        assert getattr(config, field) == value, field
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["bd_size"] == 32 and saved["auto_map"]["AutoConfig"] == "configuration_fast_dllm_v2.FastDLLMV2Config"
    assert saved.get("conplemenrary_mask") == raw.get("conplemenrary_mask")  # kept (the reference never reads it)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_parameter_names_are_qwen2s(name):
    config = FastDLLMV2Config.from_pretrained(FIXTURES / name)
    qwen = Qwen2Config(**{k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                         "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                         "tie_word_embeddings")})
    with torch.device("meta"):
        ours, theirs = FastDLLMV2Model(config), Qwen2ForCausalLM(qwen)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_parameter_names_equal_the_released_7b_weight_map():
    name = "Efficient-Large-Model--Fast_dLLM_v2_7B"
    released = json.loads((FIXTURES / name / "model.safetensors.index.json").read_text())["weight_map"]
    with torch.device("meta"):
        ours = FastDLLMV2Model(FastDLLMV2Config.from_pretrained(FIXTURES / name))
    assert sorted(ours.state_dict()) == sorted(released)


def tiny_pair(bd_size: int) -> tuple[FastDLLMV2Model, Qwen2ForCausalLM]:
    torch.manual_seed(0)
    dims = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rope_theta=10000.0,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    qwen = Qwen2ForCausalLM(Qwen2Config(**dims)).eval()
    ours = FastDLLMV2Model(FastDLLMV2Config(bd_size=bd_size, mask_token_id=3, **dims)).eval()
    ours.load_state_dict(qwen.state_dict())
    return ours, qwen


def test_blocks_of_one_position_are_the_ar_model():
    """With bd_size 1 the block-causal mask is the causal mask: the logits are Qwen2's, padding included."""
    ours, qwen = tiny_pair(1)
    ids = torch.randint(4, 64, (2, 9))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :3] = 0  # a left-padded row
    positions = (padding.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = qwen(input_ids=ids, attention_mask=padding, position_ids=positions).logits
        got = ours(input_ids=ids, attention_mask=padding).logits
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], rtol=1e-5, atol=1e-5)


def test_attention_is_bidirectional_inside_a_block_and_causal_across_blocks():
    ours, _ = tiny_pair(4)
    ids = torch.randint(4, 64, (1, 12))
    with torch.no_grad():
        base = ours(input_ids=ids).logits
        later = ids.clone()
        later[0, 9] = (ids[0, 9] + 1) % 64  # block 2
        inside = ids.clone()
        inside[0, 6] = (ids[0, 6] + 1) % 64  # block 1
        after_later, after_inside = ours(input_ids=later).logits, ours(input_ids=inside).logits
    torch.testing.assert_close(after_later[:, :8], base[:, :8])  # blocks 0-1 never see block 2
    assert not torch.allclose(after_inside[:, 4:6], base[:, 4:6])  # block 1 sees its later positions
    torch.testing.assert_close(after_inside[:, :4], base[:, :4])


def test_a_left_padded_row_has_the_blocks_it_has_alone():
    ours, _ = tiny_pair(4)
    ids = torch.randint(4, 64, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        alone, in_batch = ours(input_ids=ids).logits, ours(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(in_batch[:, 3:], alone, rtol=1e-5, atol=1e-5)


def test_the_mask_function():
    positions = torch.arange(6)[None]
    mask = block_causal_mask(positions, 2)[0, 0]
    assert mask.int().tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                                   [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="bd_size must be a positive integer"):
        FastDLLMV2Config(bd_size=0)
    ours, _ = tiny_pair(4)
    prompt = torch.ones(1, 4, dtype=torch.long)
    for settings, message in [
        (dict(cache_implementation="dual"), "exact block KV cache"),
        (dict(cfg_scale=1.0), "classifier-free guidance"),
        (dict(sub_block_length=3), "sub_block_length \\(3\\) must divide block_length \\(4\\)"),
        (dict(sub_block_length=0), "sub_block_length must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            ours.diffusion_generate(prompt, max_new_tokens=8, **settings)


def test_full_attention_models_refuse_block_diffusion_settings(llada_chain_arith):
    prompt = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="exact KV cache of block-diffusion models"):
        llada_chain_arith.diffusion_generate(prompt, max_new_tokens=8, block_length=8, cache_implementation="block")
    with pytest.raises(ValueError, match="sub_block_length=4 applies to block-diffusion models"):
        llada_chain_arith.diffusion_generate(prompt, max_new_tokens=8, block_length=8, sub_block_length=4)


def test_decoding_defaults_are_the_references():
    ours, _ = tiny_pair(32)
    config = ours._prepare_generation_config(None, {})
    assert (config.block_length, config.sub_block_length, config.cache_implementation, config.threshold,
            config.eos_early_stop) == (32, 8, "block", 0.9, True)
    assert tiny_pair(4)[0]._prepare_generation_config(None, {}).sub_block_length is None


def test_the_released_generation_config_does_not_turn_decoding_into_sampling(tmp_path):
    """The released checkpoints ship Qwen2.5's sampling generation_config.json (repetition_penalty, temperature 0.7),
    which the reference's generate ignores: loading one decodes greedily, as the reference does."""
    import shutil

    golden = Path(__file__).parent / "fixtures" / "golden_block_diffusion" / "tiny-fast-dllm-v2"
    for name in ("config.json", "model.safetensors"):
        shutil.copy(golden / name, tmp_path / name)
    shutil.copy(FIXTURES / "Efficient-Large-Model--Fast_dLLM_v2_7B" / "generation_config.json", tmp_path)
    released = FastDLLMV2Model.from_pretrained(tmp_path).eval()
    plain = FastDLLMV2Model.from_pretrained(golden).eval()
    config = released.generation_config
    assert (config.temperature, config.do_sample, config.top_k, config.top_p) == (0.0, None, None, None)
    assert config.bos_token_id == 151643 and config.eos_token_id == 501  # the model config's stop id
    prompt = torch.tensor([list(range(10, 43))])
    settings = dict(max_new_tokens=32, mask_token_id=500, eos_token_id=501)
    ours, theirs = (m.diffusion_generate(prompt, **settings)[0].tolist() for m in (released, plain))
    assert 501 in ours and ours[: ours.index(501) + 1] == theirs[: theirs.index(501) + 1]
    assert set(ours[ours.index(501) + 1:]) == {151643}  # after the stop: the released pad id


@pytest.mark.slow
def test_saved_model_runs_as_remote_code_without_the_package(tmp_path):
    """save_pretrained writes the family's code; a process that cannot import dlm_generation loads it with
    trust_remote_code and decodes the same tokens (block cache, aligned blocks, sub-blocks)."""
    import subprocess
    import sys
    import textwrap

    golden = Path(__file__).parent / "fixtures" / "golden_block_diffusion" / "tiny-fast-dllm-v2"
    model = FastDLLMV2Model.from_pretrained(golden).eval()
    model.generation_config.mask_token_id = 500
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_fast_dllm_v2.FastDLLMV2Model"
    assert {"modeling_fast_dllm_v2.py", "modeling_dream.py", "diffusion_kv_caches.py"} <= \
           {p.name for p in (tmp_path / "saved").iterdir()}
    prompt = list(range(10, 43))
    expected = model.diffusion_generate(torch.tensor([prompt]), max_new_tokens=32)[0].tolist()
    child = textwrap.dedent("""
        import json, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "dlm_generation" or name.startswith("dlm_generation."):
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        out = model.diffusion_generate(torch.tensor([json.loads(sys.argv[2])]), max_new_tokens=32)
        print(json.dumps(out[0].tolist()))
    """)
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", child, str(tmp_path / "saved"), json.dumps(prompt)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
