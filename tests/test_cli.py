"""`dlm-generate`: prompts from flags, files, stdin and chat; config fields as flags; JSON output; clear errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dlm_generation import cli
from dlm_generation.configuration_diffusion import LIBRARY_DEFAULTS
from dlm_generation.tasks.chain_arith import dev_split, is_correct

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
LLADA = str(CARDS / "tiny-llada-chain-arith")
DREAM = str(CARDS / "tiny-dream-chain-arith")
AR = str(CARDS / "tiny-ar-chain-arith")
PROBLEMS = dev_split()[:3]


def run_json(capsys, *argv) -> dict:
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_config_field_is_a_flag_with_help():
    parser = cli.build_parser()
    flags = {action.dest: action for action in parser._actions}
    for name in LIBRARY_DEFAULTS:
        if name in cli.CLI_OWNED:
            continue
        assert name in flags, name
        assert flags[name].help and flags[name].help != "see DiffusionGenerationConfig", name
    assert "Fast-dLLM parallel decoding" in flags["threshold"].help  # from the config's docstring


def test_prompts_and_flags_reach_diffusion_generate(capsys):
    report = run_json(capsys, LLADA, *[a for p in PROBLEMS for a in ("--prompt", p.question)], "--eos-early-stop",
                      "--block-length", "32", "--max-new-tokens", "64")
    assert report["config"] == {"eos_early_stop": True, "block_length": 32, "max_new_tokens": 64}
    completions = [r["completions"][0] for r in report["results"]]
    assert [r["prompt"] for r in report["results"]] == [p.question for p in PROBLEMS]
    assert sum(is_correct(c, p) for c, p in zip(completions, PROBLEMS)) >= 2
    stats = report["stats"]
    assert stats["nfe"] >= 1 and stats["tokens"] > 0 and stats["tokens_per_forward"] > 0 and stats["seconds"] > 0


def test_text_output_has_one_line_per_completion_and_a_stats_line(capsys):
    assert cli.main([LLADA, "--prompt", PROBLEMS[0].question, "--threshold", "0.9", "--alg", "low_confidence",
                     "--cache-implementation", "dual", "--max-new-tokens", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "####" in lines[0]
    assert lines[1].startswith("[NFE ") and "tokens/forward" in lines[1] and "tokens/s" in lines[1]


def test_prompts_from_a_file_and_from_stdin(capsys, tmp_path, monkeypatch):
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(p.question for p in PROBLEMS[:2]) + "\n\n")
    from_file = run_json(capsys, LLADA, "--prompts-file", str(questions), "--max-new-tokens", "64", "--batch-size",
                         "1")
    monkeypatch.setattr("sys.stdin", io.StringIO(questions.read_text()))
    from_stdin = run_json(capsys, LLADA, "--prompts-file", "-", "--max-new-tokens", "64")
    assert [r["prompt"] for r in from_file["results"]] == [p.question for p in PROBLEMS[:2]]
    # batch 1 and batch 2 decode the same text (each row equals its solo run)
    assert from_file["results"] == from_stdin["results"]


def test_chat_session_reads_turns_until_an_empty_line(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROBLEMS[0].question}\n{PROBLEMS[1].question}\n\n"))
    assert cli.main([LLADA, "--chat", "--max-new-tokens", "64", "--eos-early-stop"]) == 0
    captured = capsys.readouterr()
    replies = captured.out.strip().splitlines()
    assert len(replies) == 2 and all("####" in r for r in replies)
    assert captured.err.count("[NFE ") == 2


def test_guided_generation_from_the_command_line(capsys):
    report = run_json(capsys, DREAM, "--prompt", PROBLEMS[0].question, "--assistant-model", AR, "--block-length",
                      "null", "--guidance", '{"strategy": "speculative"}')
    assert report["config"] == {"block_length": None, "guidance": {"strategy": "speculative"}}
    assert report["stats"]["guide_forwards"] >= 1
    assert is_correct(report["results"][0]["completions"][0], PROBLEMS[0])


@pytest.mark.parametrize("argv, message", [
    ([LLADA], r"no prompt: pass --prompt TEXT, --prompts-file FILE \(or - for stdin\), or --chat"),
    ([LLADA, "--prompt", "x", "--threshold", "2"], r"threshold must be in \(0, 1\], got 2"),
    ([LLADA, "--prompt", "x", "--cache-implementation", "fast"], r"cache_implementation='fast' is not a diffusion cache"),
    ([LLADA, "--prompt", "x", "--block-length", "7"], r"max_new_tokens \(256\) must be a multiple of block_length"),
    ([LLADA, "--prompts-file", "/nonexistent/q.txt"], r"cannot read --prompts-file /nonexistent/q.txt"),
    ([LLADA, "--chat", "--prompt", "x"], r"--chat reads its prompts interactively"),
    ([LLADA, "--prompt", "x", "--batch-size", "0"], r"--batch-size must be at least 1, got 0"),
    ([AR, "--prompt", "x"], r"holds a Qwen2ForCausalLM, not a diffusion model .* pass an autoregressive model as "
                            r"--assistant-model"),
    (["/nonexistent/model", "--prompt", "x"], r"no model folder at /nonexistent/model"),
    ([LLADA, "--prompt", "x", "--block-length", "0"], r"block_length must be a positive integer that divides "
                                                      r"max_new_tokens \(e.g. 32\), or None"),
    ([LLADA, "--prompt", "x", "--cache-config", "{window_left: 64}"],
     r"argument --cache-config: '\{window_left: 64\}' is not valid JSON \(Expecting property name enclosed in "
     r"double quotes at character 1\): .* e.g. --cache-config '\{\"window_left\": 64\}'"),
    ([LLADA, "--prompt", "x", "--guidance", "{'strategy': 'speculative'}"],
     r"--guidance '\{\"strategy\": \"speculative\"\}'"),
    ([LLADA, "--prompt", "x", "--cache-config", "big"], r"'big' is not valid JSON .* cache_config takes a JSON object"),
    ([LLADA, "--prompt", "x", "--stop-strings", "[a, b]"],
     r"'\[a, b\]' is not valid JSON .* pass it as a JSON string: --stop-strings '\"\[a, b\]\"'"),
    ([LLADA, "--prompt", "x", "--dtype", "float8"], r"dtype 'float8' is not one of float32, bfloat16, float16"),
    ([LLADA, "--prompt", "x", "--peft", "/nonexistent/adapter"],
     r"cannot load the adapter --peft '/nonexistent/adapter': no PEFT adapter folder at /nonexistent/adapter"),
    ([LLADA, "--prompt", "x", "--threads", "many"], r"argument --threads: invalid int value: 'many'"),
    (["--prompt", "x"], r"the following arguments are required: model"),
    ([LLADA, "--prompt", "x", "--num-workers", "2"], r"--num-workers needs --ray"),
    ([LLADA, "--prompt", "x", "--address", "auto"], r"--address needs --ray"),
    ([LLADA, "--prompt", "x", "--ray", "--num-workers", "0"], r"--num-workers must be at least 1, got 0"),
    ([LLADA, "--chat", "--ray"], r"--chat does not run with --ray; drop one of them"),
    ([LLADA, "--prompt", "x", "--ray", "--trace"], r"--trace does not run with --ray; drop one of them"),
    (["/nonexistent/model", "--prompt", "x", "--ray"], r"no model folder at /nonexistent/model"),
    ([LLADA, "--prompt", "x", "--ray", "--dtype", "float8"], r"dtype 'float8' is not one of float32"),
])
def test_bad_input_exits_with_one_clear_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    import re

    captured = capsys.readouterr()
    error = captured.err.splitlines()[-1]  # what comes before it, if anything, is transformers' loading bar
    assert error.startswith("dlm-generate: error: ") and captured.err.count("error") == 1, captured.err
    assert "usage:" not in captured.err and "Traceback" not in captured.err
    assert re.search(message, error), (message, error)
    assert captured.out == ""


def test_a_list_flag_keeps_a_plain_string_and_valid_json(capsys):
    parse = cli.field_type("stop_strings")
    assert parse("[END]") == "[END]" and parse('["a", "b"]') == ["a", "b"] and parse('"[a, b]"') == "[a, b]"
    assert cli.field_type("cache_config")('{"window_left": 64}') == {"window_left": 64}
    assert cli.parse_value("{window_left: 64}") == "{window_left: 64}"  # without a field name: the text itself


@pytest.mark.slow
def test_a_mistyped_model_path_answers_at_once_naming_the_folder():
    """The issue's example: `model_cards/tiny-llada` is a valid-looking Hub id, but `model_cards/` is a folder here,
    so it is a local path; the installed command answers with one line instead of retrying the network."""
    command = shutil.which("dlm-generate")
    assert command, "dlm-generate is not on PATH: pip install -e . installs it"
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run([command, "model_cards/tiny-llada", "--prompt", "Start with 12. Add 30."],
                            capture_output=True, text=True, timeout=300, cwd=CARDS.parent,
                            env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stdout == ""
    # Exactly this line: no Hub request was made (each would print its retries), no usage block.
    assert result.stderr.splitlines() == [
        f"dlm-generate: error: no model folder at {CARDS / 'tiny-llada'} (did you mean model_cards/tiny-llada-chain-"
        "arith or model_cards/tiny-random-llada?); pass an existing folder or a Hub id (owner/name)"]


def test_the_check_itself_takes_no_time(capsys, monkeypatch):
    """Past Python's start and the imports (seconds), the command answers in well under a second (the network's
    retries took 50 s)."""
    monkeypatch.chdir(CARDS.parent)
    began = time.perf_counter()
    with pytest.raises(SystemExit):
        cli.main(["model_cards/tiny-llada", "--prompt", "x"])
    assert time.perf_counter() - began < 5
    assert "no model folder at" in capsys.readouterr().err


@pytest.mark.slow
def test_the_installed_command_prints_help():
    command = shutil.which("dlm-generate")
    assert command, "dlm-generate is not on PATH: pip install -e . installs it"
    result = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120, check=True)
    assert "--cache-implementation" in result.stdout and "--assistant-model" in result.stdout


def test_trace_shows_when_each_token_was_committed(capsys):
    assert cli.main([DREAM, "--prompt", PROBLEMS[0].question, "--threshold", "0.9", "--alg", "maskgit_plus",
                     "--max-new-tokens", "64", "--block-length", "32", "--cache-implementation", "null",
                     "--trace"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    completion, tokens, steps, stats = lines  # stdout is not a terminal: step numbers under the tokens
    assert "####" in completion and stats.startswith("[NFE ")
    nfe = int(stats.split()[1].rstrip(","))
    numbers = [int(s) for s in steps.split()]
    assert len(numbers) == len(tokens.split()) and max(numbers) <= nfe and min(numbers) >= 1
    report = run_json(capsys, DREAM, "--prompt", PROBLEMS[0].question, "--max-new-tokens", "64", "--trace")
    result = report["results"][0]
    assert len(result["commit_steps"]) == 1 and max(result["commit_steps"][0]) <= report["stats"]["nfe"]
    assert "traces" not in result
