"""The shipped block-diffusion model (model_cards/tiny-fastdllm-v2-chain-arith) through every user-facing path:
its generation_config.json, dlm-generate, dlm-eval, the demo, the benchmark and a left-padded batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import dlm_generation  # noqa: F401
from dlm_generation import FastDLLMV2Model, cli
from dlm_generation.tasks.chain_arith import dev_split, is_correct

CARD = Path(__file__).resolve().parents[1] / "model_cards" / "tiny-fastdllm-v2-chain-arith"
PROBLEMS = dev_split(4)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(CARD).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CARD, padding_side="left")


def direct(model, tokenizer, prompt: str, **settings) -> tuple[str, int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.diffusion_generate(ids, return_dict_in_generate=True, **settings)
    return tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip(), out.nfe


def test_the_card_loads_as_fast_dllm_v2_with_its_shipped_configuration(model):
    assert isinstance(model, FastDLLMV2Model) and model.config.bd_size == 32
    shipped = json.loads((CARD / "generation_config.json").read_text())
    config = model._prepare_generation_config(None, {})
    assert config.cache_implementation == "block" and config.block_length == 32
    assert config.threshold == shipped.get("threshold") and config.sub_block_length == shipped.get("sub_block_length")
    for name in ("README.md", "accuracy.json", "benchmark.json", "training_log.json", "calibration.png",
                 "learning_curve.png"):
        assert (CARD / name).is_file(), name


def test_it_solves_dev_problems(model, tokenizer):
    answers = [direct(model, tokenizer, p.prompt)[0] for p in PROBLEMS]
    assert sum(is_correct(a, p) for a, p in zip(answers, PROBLEMS)) >= 2


def test_a_left_padded_batch_equals_solo_calls(model, tokenizer):
    prompts = [p.prompt for p in PROBLEMS]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.diffusion_generate(**batch, max_new_tokens=64)
    texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    assert [t.strip() for t in texts] == [direct(model, tokenizer, p, max_new_tokens=64)[0] for p in prompts]


def test_dlm_generate(capsys, model, tokenizer):
    # the command applies the tokenizer's chat template, which turns the question into the task prompt
    assert cli.main([str(CARD), "--prompt", PROBLEMS[0].question, "--max-new-tokens", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    text, nfe = direct(model, tokenizer, PROBLEMS[0].prompt, max_new_tokens=64)
    assert report["results"][0]["completions"][0].strip() == text and report["stats"]["nfe"] == nfe


def test_pipeline(model, tokenizer):
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator(PROBLEMS[1].prompt, max_new_tokens=64, return_full_text=False)[0]["generated_text"]
    assert text.strip() == direct(model, tokenizer, PROBLEMS[1].prompt, max_new_tokens=64)[0]


def test_one_token_per_step_is_threshold_off(model, tokenizer):
    assert model.diffusion_threshold_off == 1.0
    one, nfe_one = direct(model, tokenizer, PROBLEMS[0].prompt, threshold=model.diffusion_threshold_off,
                          eos_early_stop=True)
    fast, nfe_fast = direct(model, tokenizer, PROBLEMS[0].prompt, threshold=0.9, eos_early_stop=True)
    assert nfe_fast < nfe_one  # threshold decoding commits several tokens per forward


@pytest.mark.slow
def test_the_demo_streams_to_the_direct_answer():
    from dlm_generation.demo import Settings, decode_stream, load_session

    session = load_session(str(CARD), None, "cpu", None)
    settings = Settings(max_new_tokens=64, threshold=0.9)
    *_, (main_html, vanilla_html, stats, answer) = decode_stream(session, PROBLEMS[0].question, settings,
                                                                  compare=True, replay_ms=0)
    inputs = session.encode(PROBLEMS[0].question)
    out = session.model.diffusion_generate(**inputs, return_dict_in_generate=True,
                                           **settings.overrides(session.model_alg, False, 1.0))
    assert answer == session.summary({"output": out, "label": "", "seconds": 1.0},
                                     inputs["input_ids"].shape[1])["text"]
    assert "| vanilla |" in stats and 'data-state="done"' in vanilla_html


@pytest.mark.slow
def test_dlm_eval_runs_the_packaged_task(tmp_path, capsys):
    from dlm_generation import eval as dlm_eval

    dlm_eval.main(["run", "--model", "dlm", "--model_args", f"pretrained={CARD}", "--tasks", "chain_arith",
                   "--limit", "2", "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path)])
    printed = capsys.readouterr().out
    speed = json.loads(printed.split("dlm speed:")[-1].strip().splitlines()[0])
    assert speed["nfe"] >= 1 and speed["tokens_per_forward"] > 1
