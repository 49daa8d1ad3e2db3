"""LoRA adapters (PEFT) on the diffusion models: trained with the project's loss, generating through
`diffusion_generate`, merged = unmerged, disabled = base, saved and reloaded, and through `dlm-generate --peft`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401
from dlm_generation import cli
from dlm_generation.tasks.chain_arith import dev_split, train_problems
from dlm_generation.training import masked_diffusion_loss

pytestmark = pytest.mark.slow  # every test here uses the module fixture that trains an adapter

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
LLADA = CARDS / "tiny-llada-chain-arith"
PROBLEMS = dev_split()[:4]
SETTINGS = dict(max_new_tokens=64, steps=64, block_length=32, eos_early_stop=True, threshold=None,
                cache_implementation=None)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(LLADA, padding_side="left")


@pytest.fixture(scope="module")
def inputs(tokenizer):
    return tokenizer([p.prompt for p in PROBLEMS], return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """A rank-4 LoRA on the attention projections, trained for a few steps with a large learning rate (so that it
    changes the model measurably), saved to a folder."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(LLADA),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "attn_out"],
                                      lora_dropout=0.0, init_lora_weights=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(4):
        problems = train_problems(step * 8, (step + 1) * 8)
        prompts = tokenizer([p.prompt for p in problems]).input_ids
        completions = [c + [tokenizer.eos_token_id] for c in
                       tokenizer([p.completion for p in problems], add_special_tokens=False).input_ids]
        loss = masked_diffusion_loss(model, prompts, completions, tokenizer, canvas=64, seed=step, block_prob=0.75)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    folder = tmp_path_factory.mktemp("lora")
    model.eval().save_pretrained(folder)
    return model, folder, losses


def test_the_loss_trains_only_the_adapter(trained):
    model, folder, losses = trained
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {name for name, p in model.named_parameters() if p.requires_grad} == \
        {name for name, _ in model.named_parameters() if "lora_" in name}
    assert (folder / "adapter_model.safetensors").exists() and (folder / "adapter_config.json").exists()


def test_adapter_generates_and_changes_the_model(trained, inputs):
    model, _, _ = trained
    base = AutoModelForCausalLM.from_pretrained(LLADA).eval()
    out = model.diffusion_generate(**inputs, **SETTINGS, return_dict_in_generate=True)
    assert out.sequences.shape == (len(PROBLEMS), inputs.input_ids.shape[1] + 64) and out.nfe >= 1
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, base(**inputs).logits, atol=1e-3)


def test_disabled_adapter_gives_the_base_models_tokens(trained, inputs):
    model, _, _ = trained
    base = AutoModelForCausalLM.from_pretrained(LLADA).eval()
    with model.disable_adapter():
        disabled = model.diffusion_generate(**inputs, **SETTINGS)
    assert torch.equal(disabled, base.diffusion_generate(**inputs, **SETTINGS))


def test_merged_and_reloaded_adapters_give_the_same_tokens(trained, inputs):
    model, folder, _ = trained
    unmerged = model.diffusion_generate(**inputs, **SETTINGS)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(LLADA), folder).eval()
    assert torch.equal(reloaded.diffusion_generate(**inputs, **SETTINGS), unmerged)
    merged = reloaded.merge_and_unload()
    assert torch.equal(merged.diffusion_generate(**inputs, **SETTINGS), unmerged)


def test_cli_applies_the_adapter(trained, inputs, tokenizer, capsys):
    model, folder, _ = trained
    argv = [str(LLADA), "--raw", "--prompt", PROBLEMS[0].prompt, "--max-new-tokens", "64", "--steps", "64",
            "--block-length", "32", "--eos-early-stop", "--threshold", "null", "--cache-implementation", "null",
            "--json"]
    assert cli.main([*argv, "--peft", str(folder)]) == 0
    with_adapter = json.loads(capsys.readouterr().out)["results"][0]["completions"][0]
    single = tokenizer([PROBLEMS[0].prompt], return_tensors="pt")
    expected = model.diffusion_generate(**single, **SETTINGS)[0, single.input_ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    expected = expected[: expected.index(eos) + 1] if eos in expected else expected
    assert with_adapter == tokenizer.decode(expected, skip_special_tokens=True)


def test_cli_reports_a_missing_adapter(capsys):
    with pytest.raises(SystemExit):
        cli.main([str(LLADA), "--prompt", "x", "--peft", "/nonexistent/adapter"])
    assert "cannot load the adapter --peft '/nonexistent/adapter'" in capsys.readouterr().err


def test_the_lora_example_runs(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_lora", CARDS.parent / "examples" / "finetune_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main([str(LLADA), str(tmp_path / "adapter"), "--steps", "2", "--batch-size", "4", "--eval-problems", "2"])
    printed = capsys.readouterr().out
    assert "base model: dev accuracy" in printed and "with the adapter: dev accuracy" in printed
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_lm_eval_model_args_apply_the_adapter(trained, inputs):
    from dlm_generation.eval import DiffusionLM

    model, folder, _ = trained
    lm = DiffusionLM(pretrained=str(LLADA), peft=str(folder), device="cpu", **SETTINGS)
    with torch.no_grad():
        assert torch.equal(lm.model(**inputs).logits, model(**inputs).logits)
