"""The shipped chain-arith tokenizer and models, and the benchmark run end to end on them (a few problems)."""

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
LLADA = CARDS / "tiny-llada-chain-arith"
DREAM = CARDS / "tiny-dream-chain-arith"
PROBLEMS = list(dev_split(8))
# Correct answers out of the first 8 dev problems (CPU, float32); one below what the shipped weights solve, as
# margin for other CPUs' rounding.
MIN_SOLVED_AR = 6  # greedy; solves 7
MIN_SOLVED = {  # (vanilla at gen 128, block 32, early stop; the shipped generation_config at gen 256)
    "llada": (7, 7),  # solves 8 and 8
    "dream": (7, 6),  # solves 8 and 7
}


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


def test_ar_model_solves_problems(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(AR)
    assert isinstance(model, Qwen2ForCausalLM)
    result = benchmark.solve(model, tokenizer, PROBLEMS, 64, 8, autoregressive=True)
    assert solved(result.completions) >= MIN_SOLVED_AR, result.completions
    # one forward per generated token (KV cache), until every row has emitted EOS
    assert result.calls[0]["nfe"] == max(result.calls[0]["tokens"])


@pytest.mark.slow
@pytest.mark.parametrize("family, folder, cls", [("llada", LLADA, dlm_generation.LLaDAModelLM),
                                                 ("dream", DREAM, dlm_generation.DreamModel)])
def test_diffusion_model_solves_problems(tokenizer, family, folder, cls):
    assert isinstance(AutoModel.from_pretrained(folder), cls)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, cls)
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer.get_vocab()
    shipped = model.generation_config
    # the shipped configuration is the card's (train_chain_arith.RECOMMENDED): gen 256, the lossless early stop
    assert (shipped.max_new_tokens, shipped.eos_early_stop) == (256, True)
    expected = {"llada": (0.7, 0.05), "dream": (0.8, 0.03)}[family]  # threshold, position decay (issue 25)
    assert (shipped.block_length, shipped.cache_implementation, shipped.suffix_window) == (32, "dual", 32)
    assert (shipped.threshold, shipped.position_decay) == expected
    # vanilla on a 128-token canvas (every answer fits in 64): half the cost of 256, the same decoding of the answer
    vanilla = benchmark.solve(model, tokenizer, PROBLEMS, 128, 8, {**benchmark.BASE_CONFIG, "steps": 128,
                                                                   "block_length": 32, "eos_early_stop": True})
    fast = benchmark.solve(model, tokenizer, PROBLEMS, 256, 8, {})  # the shipped generation_config.json
    min_vanilla, min_fast = MIN_SOLVED[family]
    assert solved(vanilla.completions) >= min_vanilla, vanilla.completions
    assert solved(fast.completions) >= min_fast, fast.completions
    # early stop ends the call once every row's answer is settled, long before the canvas end
    assert fast.calls[0]["nfe"] <= 256 / 2 and vanilla.calls[0]["nfe"] < 128


@pytest.mark.slow
def test_calibration_counts_every_committed_token(tokenizer, llada_chain_arith):
    """The reliability report covers each committed token up to the first EOS once, and a completion that equals
    the reference contributes only correct tokens."""
    model = llada_chain_arith
    settings = {**benchmark.BASE_CONFIG, "steps": 64, "block_length": 32, "alg": "low_confidence", "threshold": 0.9}
    report = benchmark.calibration(model, tokenizer, PROBLEMS, 64, 8, settings)
    result = benchmark.solve(model, tokenizer, PROBLEMS, 64, 8, settings)
    tokens = sum(result.calls[0]["tokens"])
    assert report["tokens"] == sum(b["count"] for b in report["bins"]) == tokens
    correct = sum(b["count"] * b["accuracy"] for b in report["bins"] if b["count"])
    assert round(correct) == round(report["token_accuracy"] * tokens)
    exact = sum(len(tokenizer(p.completion, add_special_tokens=False).input_ids) + 1
                for c, p in zip(result.completions, PROBLEMS) if c == p.completion)
    assert exact > 0 and correct >= exact
    assert all(b["low"] <= b["mean_confidence"] <= b["high"] for b in report["bins"] if b["count"])
    assert 0.0 <= report["ece"] <= 1.0


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path, capsys):
    json_path, png_path = tmp_path / "report.json", tmp_path / "plot.png"
    code = benchmark.main([
        str(LLADA), "--block-length", "8", "--ar-model", str(AR), "--problems", "4", "--gen-lengths", "64",
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
    # every position passes a 0.001 threshold: one forward per block of 8, none after every row's EOS
    assert rows["fast"]["nfe"] <= 8
    assert rows["ar-kv-cache"]["accuracy"] >= 0.75  # the trained AR model solves 3 of the first 4 dev problems
    assert rows["vanilla"]["accuracy"] >= 0.5  # the trained LLaDA solves 3 of them
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and row["problems"] == 4 and row["tokens_per_second"] > 0
        assert 0 <= row["loop_overhead"] < 1
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_measures_speedups_against_the_chosen_baseline(tmp_path, capsys):
    json_path = tmp_path / "report.json"
    assert benchmark.main([str(LLADA), "--block-length", "8", "--problems", "2", "--gen-lengths", "32",
                           "--batch-sizes", "2", "--repeats", "1", "--configs", "vanilla+eos", "threshold-0.9+eos",
                           "--baseline", "vanilla+eos", "--json", str(json_path)]) == 0
    assert "speedup vs vanilla+eos" in capsys.readouterr().out
    report = json.loads(json_path.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert report["baseline"] == "vanilla+eos" and rows["vanilla+eos"]["speedup"] == 1.0
    assert rows["threshold-0.9+eos"]["speedup"] == rows["vanilla+eos"]["seconds"] / rows["threshold-0.9+eos"]["seconds"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--configs", "vanilla", "nonsense"], "unknown decoding configuration 'nonsense'"),
        (["--configs", "threshold-0.9"], "must include 'vanilla'"),
        (["--configs", "vanilla", "threshold-0.9", "--baseline", "vanilla+eos"], "must include 'vanilla+eos'"),
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
def test_benchmark_rejects_bad_input(args, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.main([str(LLADA), "--problems", "2", "--repeats", "1", *args])
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


def test_cost_scaling_table():
    def row(config, gen, seconds, tokens=100.0):
        return benchmark.Row(config=config, settings={}, gen_length=gen, batch_size=1, problems=4, accuracy=1.0,
                             nfe=1.0, tokens_per_forward=1.0, tokens_per_second=tokens / seconds, seconds=seconds)

    rows = [row("vanilla", 256, 1.0), row("dual", 256, 0.5), row("vanilla", 1024, 4.0), row("dual", 1024, 0.6)]
    table = benchmark.format_scaling(rows)
    lines = table.splitlines()
    assert "ms/tok @256" in lines[0] and "ms/tok @1024" in lines[0] and "1024 / 256" in lines[0]
    assert lines[2].split("|")[1:-1] == [" vanilla (batch 1) ", " 10.0        ", " 40.0         ", " 4.00x      "]
    assert "1.20x" in lines[3]
    assert benchmark.format_scaling(rows[:2]) is None  # one length: nothing to scale


# A sample of the policies, caches and guidance in the fast tier; every configuration in the slow tier.
FAST_NAMED = {"threshold-0.9+eos", "factor-1.0+eos", "dual+threshold-0.9+eos", "dllm+threshold-0.9+eos",
              "d2cache+threshold-0.9+eos", "guided"}


@pytest.mark.parametrize("name", [name if name in FAST_NAMED else pytest.param(name, marks=pytest.mark.slow)
                                  for name in benchmark.NAMED_CONFIGS])
def test_every_named_configuration_decodes(tokenizer, name, llada_chain_arith, ar_chain_arith):
    """Each built-in benchmark configuration is valid and decodes a problem to the end (gen 64, block 32)."""
    model = llada_chain_arith  # shared (conftest): solve() passes its settings per call and changes nothing
    settings = {**benchmark.BASE_CONFIG, "steps": 64, "block_length": 32, **benchmark.NAMED_CONFIGS[name]}
    guide = ar_chain_arith if "guidance" in settings else None  # the --ar-model
    result = benchmark.solve(model, tokenizer, PROBLEMS[:2], 64, 2, settings, guide=guide)
    assert len(result.completions) == 2 and all(c.strip() for c in result.completions)
    assert all(call["nfe"] >= 1 and min(call["tokens"]) >= 1 for call in result.calls)


def test_commit_order_classes_and_report(capsys):
    """examples/commit_order_errors.py: frontier / parallel / ahead from commit steps, and a report on real decodes
    whose token counts cover every scored position."""
    import sys

    sys.path.insert(0, str(CARDS.parent / "examples"))
    import commit_order_errors as order

    steps = torch.tensor([[0, 1, 1, 3, 2, 4]])  # position 4 is committed before position 3, on its left
    assert order.commit_classes(steps).tolist() == [[0, 0, 1, 0, 2, 0]]
    order.main([str(DREAM), "--problems", "4", "--gen-length", "64", "--batch-size", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("/4 solved") and [line.split(" |")[0] for line in lines[3:]] == [
        "| frontier", "| parallel", "| ahead"]
    solved = int(lines[0].rsplit(" ", 2)[1].split("/")[0])
    assert 4 - solved == sum(int(line.split("|")[5]) for line in lines[3:])  # each wrong answer counted once


def test_benchmark_rows_do_not_inherit_the_shipped_configuration():
    """Only `model-default` reads the model's generation_config.json: every field the shipped configurations set
    that changes decoding is reset by the benchmark's base settings."""
    import json

    from transformers import AutoModelForCausalLM

    from dlm_generation.configuration_diffusion import DIFFUSION_DEFAULTS

    # the benchmark sets these per row; eps only shapes the "eps" schedule, and the base schedule is linear
    fixed = {"block_length", "steps", "max_new_tokens", "mask_token_id", "eps"}
    for folder in (LLADA, DREAM):
        shipped = json.loads((folder / "generation_config.json").read_text())
        decoding = {k for k in shipped if k in DIFFUSION_DEFAULTS or k in ("cache_implementation", "cache_config")}
        assert decoding - fixed <= set(benchmark.BASE_CONFIG), folder
    model = AutoModelForCausalLM.from_pretrained(LLADA)
    resolved = model._prepare_generation_config(None, dict(benchmark.BASE_CONFIG))
    assert resolved.position_decay is None and resolved.suffix_window is None and resolved.threshold is None
    assert resolved.cache_implementation is None
