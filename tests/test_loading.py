"""The shared model loader (`dlm_generation.loading`), the public `generated_lengths`, and a core package that does
not import the toy task, the benchmark or the training code."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dlm_generation
from dlm_generation import generated_lengths
from dlm_generation.loading import check_model_source, load_models, resolve_device, resolve_dtype

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
REPOSITORY = CARDS.parent


@pytest.fixture
def in_repository(monkeypatch):
    """Run from the repository root, where `model_cards/...` is a relative path (as a user types it)."""
    monkeypatch.chdir(REPOSITORY)


def test_a_missing_folder_is_named_with_close_siblings_at_once(in_repository):
    began = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        check_model_source("model_cards/tiny-llada")
    assert time.perf_counter() - began < 1.0  # no network retries
    message = str(caught.value)
    assert f"no model folder at {CARDS / 'tiny-llada'}" in message
    assert "did you mean model_cards/tiny-llada-chain-arith or model_cards/tiny-random-llada?" in message


@pytest.mark.parametrize("source, expected", [
    ("./nowhere", "no model folder at"),
    ("/nonexistent/model", "/ is the deepest folder of it that exists"),
    ("model_cards/a/b", "model_cards is the deepest folder of it that exists"),
    ("pyproject.toml", "is a file, not a model folder"),
    ("model_cards/tiny-chain-arith-tokenizer", "holds no config.json"),
    ("bad id!", "is neither a local folder nor a valid Hub id"),
    ("owner/name--x", "is neither a local folder nor a valid Hub id"),
])
def test_sources_that_cannot_be_a_model_are_refused(in_repository, source, expected):
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        check_model_source(source)


def test_folders_and_hub_ids_pass_as_given(in_repository):
    assert check_model_source("model_cards/tiny-llada-chain-arith") == "model_cards/tiny-llada-chain-arith"
    assert check_model_source(str(CARDS / "tiny-random-dream")) == str(CARDS / "tiny-random-dream")
    assert check_model_source("GSAI-ML/LLaDA-8B-Instruct") == "GSAI-ML/LLaDA-8B-Instruct"  # checked by the Hub


def test_an_offline_hub_id_missing_from_the_cache_is_refused(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1 but the Hub id is not in the local Hugging Face cache"):
        check_model_source("someone/not-downloaded")


def test_dtype_and_device_are_checked_before_loading():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(None) is None and resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="dtype 'float8' is not one of float32, bfloat16, float16"):
        resolve_dtype("float8")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA, which is not available here: pass cpu"):
            resolve_device("cuda")


def test_load_models_gives_a_left_padding_tokenizer_and_eval_models():
    model, tokenizer, guide = load_models(str(CARDS / "tiny-dream-chain-arith"),
                                          assistant_model=str(CARDS / "tiny-ar-chain-arith"))
    assert tokenizer.padding_side == "left" and not model.training and not guide.training
    assert isinstance(model, dlm_generation.DreamModel)
    assert not isinstance(guide, dlm_generation.DiffusionGenerationMixin)


def test_load_models_names_the_option_of_a_bad_guide_or_adapter():
    with pytest.raises(ValueError, match=r"cannot load the guide --assistant-model '/nonexistent/ar': no assistant "
                                         r"model folder at /nonexistent/ar"):
        load_models(str(CARDS / "tiny-random-llada"), assistant_model="/nonexistent/ar",
                    option_names={"assistant_model": "--assistant-model"})
    with pytest.raises(ValueError, match=r"cannot load the adapter peft '/nonexistent/lora': no PEFT adapter folder"):
        load_models(str(CARDS / "tiny-random-llada"), peft="/nonexistent/lora")
    with pytest.raises(ValueError, match="holds a Qwen2ForCausalLM, not a diffusion model"):
        load_models(str(CARDS / "tiny-ar-chain-arith"))


def test_generated_lengths_count_through_the_first_stop_token():
    rows = torch.tensor([[5, 6, 2, 2], [5, 6, 7, 8], [2, 0, 0, 0], [5, 9, 6, 3]])
    assert generated_lengths(rows, 2).tolist() == [3, 4, 1, 4]
    assert generated_lengths(rows, [9, 2]).tolist() == [3, 4, 1, 2]
    assert generated_lengths(rows, torch.tensor([3])).tolist() == [4, 4, 4, 4]
    assert generated_lengths(rows, None).tolist() == [4, 4, 4, 4]
    assert generated_lengths(rows, []).tolist() == [4, 4, 4, 4]
    assert generated_lengths(rows, 2).dtype == torch.long


def test_tokens_per_forward_uses_generated_lengths():
    model, tokenizer, _ = load_models(str(CARDS / "tiny-llada-chain-arith"))
    inputs = tokenizer.apply_chat_template([[{"role": "user", "content": q}] for q in
                                            ("Start with 12. Add 30.", "Start with 8. Add 75. Subtract 19.")],
                                           add_generation_prompt=True, padding=True, return_tensors="pt",
                                           return_dict=True)
    out = model.diffusion_generate(**inputs, max_new_tokens=32, block_length=32, return_dict_in_generate=True)
    lengths = generated_lengths(out.sequences[:, inputs["input_ids"].shape[1]:], tokenizer.eos_token_id)
    assert torch.equal(out.tokens_per_forward, lengths.float() / out.nfe)
    assert (lengths < 32).all()  # both rows stop before the canvas ends


@pytest.mark.slow
def test_the_core_package_does_not_import_the_toy_task():
    """The command line, the loader, the demo and lm-eval's model import neither the chain-arith task, nor the
    benchmark, nor the training code (a fresh interpreter: this test session has imported them all)."""
    code = ("import sys\n"
            "import dlm_generation, dlm_generation.cli, dlm_generation.loading, dlm_generation.visualize\n"
            "import dlm_generation.demo, dlm_generation.eval\n"
            "loaded = [m for m in sys.modules if m.startswith(('dlm_generation.tasks', 'dlm_generation.benchmark',"
            " 'dlm_generation.training'))]\n"
            "print(sorted(loaded))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.stdout.strip() == "[]", result.stdout
