"""The SDAR model family: released configs load unchanged, Qwen3's parameter names, block-causal logits, decoding
defaults, batches and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dlm_generation import SDARConfig, SDARForCausalLM

FIXTURES = Path(__file__).parent / "fixtures" / "block_diffusion"
GOLDEN = Path(__file__).parent / "fixtures" / "golden_sdar" / "tiny-sdar"
RELEASED = {  # written out by hand, so that a config class that rewrites a field is caught
    "JetLM--SDAR-4B-Chat": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "JetLM--SDAR-8B-Chat": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "JetLM--SDAR-1.7B-Chat": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                  tie_word_embeddings=True),
}
QWEN3_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "tie_word_embeddings")
MASK, STOPS, PAD = 500, [501, 502], 503


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_the_released_config_loads_unchanged(name, tmp_path):
    raw = json.loads((FIXTURES / name / "config.json").read_text())
    config = AutoConfig.from_pretrained(FIXTURES / name)
    assert isinstance(config, SDARConfig) and config.model_type == raw["model_type"] == "sdar"
    assert config.block_size == raw["block_size"] == 4 and config.mask_token_id == raw["mask_token_id"] == 151669
    for field, value in RELEASED[name].items():
        assert getattr(config, field) == value, field
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["block_size"] == 4 and saved["auto_map"]["AutoModelForCausalLM"] == "modeling_sdar.SDARForCausalLM"
    assert saved["released_attn_implementation"] == raw["attn_implementation"] == "flex_attention"
    assert saved["fuse_cross_entropy"] is True  # the training switches round-trip


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_parameter_names_are_qwen3s(name):
    config = SDARConfig.from_pretrained(FIXTURES / name)
    qwen = Qwen3Config(**{k: getattr(config, k) for k in QWEN3_FIELDS})
    with torch.device("meta"):
        ours, theirs = SDARForCausalLM(config), Qwen3ForCausalLM(qwen)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("name", ["JetLM--SDAR-4B-Chat", "JetLM--SDAR-8B-Chat"])
def test_parameter_names_equal_the_released_weight_map(name):
    released = json.loads((FIXTURES / name / "model.safetensors.index.json").read_text())["weight_map"]
    with torch.device("meta"):
        ours = SDARForCausalLM(SDARConfig.from_pretrained(FIXTURES / name))
    assert sorted(ours.state_dict()) == sorted(released)


def tiny_pair(block_size: int) -> tuple[SDARForCausalLM, Qwen3ForCausalLM]:
    torch.manual_seed(0)
    dims = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
                rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    qwen = Qwen3ForCausalLM(Qwen3Config(**dims)).eval()
    with torch.no_grad():  # q/k norm weights away from 1, so that a missing norm would show
        for name, parameter in qwen.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    ours = SDARForCausalLM(SDARConfig(block_size=block_size, mask_token_id=3, **dims)).eval()
    ours.load_state_dict(qwen.state_dict())
    return ours, qwen


def test_blocks_of_one_position_are_qwen3():
    """With block_size 1 the block-causal mask is the causal mask: the logits are Qwen3's, padding included."""
    ours, qwen = tiny_pair(1)
    ids = torch.randint(4, 64, (2, 9))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :3] = 0
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
        later, inside = ids.clone(), ids.clone()
        later[0, 9] = (ids[0, 9] + 1) % 64
        inside[0, 6] = (ids[0, 6] + 1) % 64
        after_later, after_inside = ours(input_ids=later).logits, ours(input_ids=inside).logits
    torch.testing.assert_close(after_later[:, :8], base[:, :8])
    assert not torch.allclose(after_inside[:, 4:6], base[:, 4:6])
    torch.testing.assert_close(after_inside[:, :4], base[:, :4])


@pytest.fixture(scope="module")
def golden_model():
    return SDARForCausalLM.from_pretrained(GOLDEN).eval()


SETTINGS = dict(mask_token_id=MASK, eos_token_id=STOPS, pad_token_id=PAD, max_new_tokens=24)


@pytest.mark.parametrize("extra", [{}, {"threshold": 0.5}, {"block_length": 8, "steps": 12, "threshold": 0.6}],
                         ids=["static", "dynamic", "block8-dynamic"])
def test_left_padded_batch_rows_equal_solo_calls(golden_model, extra):
    prompts = [[7, 8, 9], list(range(20, 33)), list(range(40, 48)), [5] * 22]
    solo = [golden_model.diffusion_generate(torch.tensor([p]), **SETTINGS, **extra)[0, len(p):].tolist()
            for p in prompts]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = golden_model.diffusion_generate(ids, attention_mask=mask, **SETTINGS, **extra)
    assert [row[width:] for row in batch.tolist()] == solo


def test_dynamic_threshold_commits_at_least_the_schedules_count(golden_model):
    """Block 8 with 4 steps: every step commits at least two tokens, however low the confidence (the reference's
    low_confidence_dynamic); so 4 steps per block plus the forward that stores the block, whatever the threshold."""
    prompt = torch.tensor([list(range(10, 18))])  # one whole block: prefill, then aligned blocks of 8
    out = golden_model.diffusion_generate(prompt, block_length=8, steps=12, threshold=0.999999,
                                          return_dict_in_generate=True, output_commit_steps=True,
                                          **{**SETTINGS, "eos_token_id": None})
    assert out.nfe == 1 + 3 * 4 + 2  # prefill, 3 blocks of 4 steps, 2 stores between them
    counts = torch.bincount(out.commit_steps[0])
    assert sorted(set(counts[counts > 0].tolist())) == [2]


def test_a_stop_ends_decoding_when_its_block_is_complete(golden_model):
    out = golden_model.diffusion_generate(torch.tensor([[7, 8, 9]]), return_dict_in_generate=True,
                                          **{**SETTINGS, "max_new_tokens": 40})
    generated = out.sequences[0, 3:].tolist()
    first = next(i for i, t in enumerate(generated) if t in STOPS)
    assert set(generated[first + 1:]) <= {PAD}  # what follows the stop is padding
    assert out.nfe < 1 + 40  # not the whole canvas


def test_decoding_defaults_are_the_authors_evaluation(golden_model):
    config = golden_model._prepare_generation_config(None, {})
    assert (config.block_length, config.cache_implementation, config.threshold, config.eos_early_stop,
            config.sub_block_length) == (4, "block", None, True, None)


def test_bad_input_says_what_to_do(golden_model):
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        SDARConfig(block_size=0)
    with pytest.raises(ValueError, match="head_dim must be a positive even integer"):
        SDARConfig(head_dim=7)
    prompt = torch.ones(1, 4, dtype=torch.long)
    for settings, message in [
        (dict(cache_implementation="dual"), "exact block KV cache"),
        (dict(cfg_scale=1.0), "classifier-free guidance is not defined for SDAR"),
        (dict(sub_block_length=2), "sub-blocks are Fast-dLLM v2's"),
    ]:
        with pytest.raises(ValueError, match=message):
            golden_model.diffusion_generate(prompt, **{**SETTINGS, "max_new_tokens": 8, **settings})


def test_the_released_generation_config_gives_stop_ids_but_not_sampling(tmp_path):
    """The released generation_config.json holds Qwen3's sampling settings (not read by the authors' decoding) and
    the chat stop ids (read)."""
    for name in ("config.json", "model.safetensors"):
        shutil.copy(GOLDEN / name, tmp_path / name)
    shutil.copy(FIXTURES / "JetLM--SDAR-4B-Chat" / "generation_config.json", tmp_path)
    config = SDARForCausalLM.from_pretrained(tmp_path).generation_config
    assert (config.temperature, config.do_sample, config.top_k, config.top_p) == (0.0, None, None, None)
    assert config.eos_token_id == [151645, 151643] and config.pad_token_id == 151643


def test_auto_classes_and_pipeline(tmp_path):
    from transformers import pipeline, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = AutoModelForCausalLM.from_pretrained(GOLDEN)
    assert isinstance(model, SDARForCausalLM)
    vocab = {f"t{i}": i for i in range(512)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t4"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t503", eos_token="t501",
                                        mask_token="t500")
    prompt = " ".join(f"t{i}" for i in (7, 8, 9, 10, 11))
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator(prompt, max_new_tokens=16, mask_token_id=MASK, return_full_text=False)[0]["generated_text"]
    direct = model.diffusion_generate(torch.tensor([[7, 8, 9, 10, 11]]), max_new_tokens=16, mask_token_id=MASK)
    assert text == tokenizer.decode(direct[0, 5:], skip_special_tokens=True)


@pytest.mark.slow
def test_saved_model_runs_as_remote_code_without_the_package(tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    model = SDARForCausalLM.from_pretrained(GOLDEN).eval()
    model.generation_config.mask_token_id = MASK
    model.save_pretrained(tmp_path / "saved")
    assert {"modeling_sdar.py", "modeling_block_diffusion.py", "modeling_dream.py", "diffusion_kv_caches.py"} <= \
           {p.name for p in (tmp_path / "saved").iterdir()}
    prompt = list(range(10, 23))
    expected = model.diffusion_generate(torch.tensor([prompt]), max_new_tokens=16, threshold=0.5)[0].tolist()
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
        out = model.diffusion_generate(torch.tensor([json.loads(sys.argv[2])]), max_new_tokens=16, threshold=0.5)
        print(json.dumps(out[0].tolist()))
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", child, str(tmp_path / "saved"), json.dumps(prompt)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
