"""The shipped chain-arith tokenizer and AR model, and the benchmark run end to end (a few problems).

The trained diffusion models (tiny-llada/dream-chain-arith) are still training; until they ship, the benchmark runs
on a small LLaDA model built here with random weights on the chain-arith tokenizer (a real model folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2ForCausalLM,
)

import dlm_generation
from dlm_generation import benchmark
from dlm_generation.tasks import dev_split, is_correct

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
TOKENIZER = CARDS / "tiny-chain-arith-tokenizer"
AR = CARDS / "tiny-ar-chain-arith"
PROBLEMS = list(dev_split(8))
# Correct answers out of the first 8 dev problems with greedy decoding (the shipped weights solve 7 on CPU in
# float32; one is left as margin for other CPUs' rounding).
MIN_SOLVED_AR = 6


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def test_tokenizer(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id] == [
        0, 1, 2, 3]
    problem = PROBLEMS[0]
    ids = tokenizer(problem.prompt + problem.completion).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == problem.prompt + problem.completion
    for number in ("103", "4", "76"):
        tokens = tokenizer.tokenize(f" {number}")
        assert tokens[1:] == list(number)  # every digit its own token
    chat = tokenizer.apply_chat_template([{"role": "user", "content": problem.question}], add_generation_prompt=True)
    assert chat["input_ids"] == tokenizer(problem.prompt).input_ids
    assert AutoTokenizer.from_pretrained(AR).get_vocab() == tokenizer.get_vocab()


def solved(completions, problems=PROBLEMS) -> int:
    return sum(is_correct(c, p) for c, p in zip(completions, problems))


@pytest.fixture(scope="module")
def random_llada(tmp_path_factory, tokenizer):
    """A 2-layer LLaDA with random weights on the chain-arith tokenizer, saved as a complete model folder."""
    folder = tmp_path_factory.mktemp("random-llada-chain-arith")
    torch.manual_seed(0)
    config = dlm_generation.LLaDAConfig(
        d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128, vocab_size=320, embedding_size=320,
        max_sequence_length=512, mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    dlm_generation.LLaDAModelLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_ar_model_solves_problems(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(AR)
    assert isinstance(model, Qwen2ForCausalLM)
    result = benchmark.solve(model, tokenizer, PROBLEMS, 64, 8, autoregressive=True)
    assert solved(result.completions) >= MIN_SOLVED_AR, result.completions
    # one forward per generated token (KV cache), until every row has emitted EOS
    assert result.calls[0]["nfe"] == max(result.calls[0]["tokens"])


def test_benchmark_end_to_end(random_llada, tmp_path, capsys):
    json_path, png_path = tmp_path / "report.json", tmp_path / "plot.png"
    code = benchmark.main([
        str(random_llada), "--ar-model", str(AR), "--problems", "4", "--gen-lengths", "64",
        "--batch-sizes", "4", "--repeats", "1", "--configs", "vanilla", "threshold-0.9+eos",
        "fast:alg=low_confidence,threshold=0.001,eos_early_stop=true", "--json", str(json_path), "--plot", str(png_path),
    ])
    assert code == 0
    table = capsys.readouterr().out
    for name in ("vanilla", "threshold-0.9+eos", "fast", "ar-kv-cache", "speedup", "overhead"):
        assert name in table
    report = json.loads(json_path.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) == {"vanilla", "threshold-0.9+eos", "fast", "ar-kv-cache"}
    assert rows["vanilla"]["speedup"] == 1.0 and rows["vanilla"]["nfe"] == 64
    assert rows["fast"]["settings"]["threshold"] == 0.001
    assert rows["fast"]["nfe"] == 2  # every position passes a 0.001 threshold: one forward per block
    assert rows["ar-kv-cache"]["accuracy"] >= 0.75  # the trained AR model solves 3 of the first 4 dev problems
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and row["problems"] == 4 and row["tokens_per_second"] > 0
        assert 0 <= row["loop_overhead"] < 1
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--configs", "vanilla", "nonsense"], "unknown decoding configuration 'nonsense'"),
        (["--configs", "threshold-0.9"], "must include 'vanilla'"),
        (["--gen-lengths", "48"], "multiple of --block-length 32"),
        (["--configs", "vanilla", "x:threshold"], "expected key=value"),
        (["--dtype", "float33"], "not a torch dtype"),
        (["--repeats", "0"], "--repeats must be positive"),
        (["--configs", "vanilla", "x:max_new_tokens=8"], "the benchmark sets these itself"),
        (["--configs", "vanilla", "vanilla:threshold=0.5"], "reuses the built-in name"),
        (["--configs", "vanilla", "bad:alg=entropy,threshold=0.9"], "configuration 'bad'"),
        (["--configs", "vanilla", "bad:no_such_field=1"], "configuration 'bad'"),
    ],
)
def test_benchmark_rejects_bad_input(random_llada, args, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.main([str(random_llada), "--problems", "2", "--repeats", "1", *args])
    assert message in capsys.readouterr().err


def test_benchmark_rejects_missing_folder_and_ar_as_main_model(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["model_cards/does-not-exist"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main([str(AR), "--problems", "1"])
    assert "not a diffusion model" in capsys.readouterr().err


def test_generated_lengths_count_through_first_eos():
    completions = torch.tensor([[5, 6, 2, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert benchmark.generated_lengths(completions, 2).tolist() == [3, 4, 1]


def test_benchmark_rejects_ar_model_on_another_tokenizer(capsys):
    with pytest.raises(SystemExit):
        benchmark.main([str(CARDS / "tiny-random-llada"), "--ar-model", str(AR), "--problems", "1"])
    assert "different tokenizer" in capsys.readouterr().err
