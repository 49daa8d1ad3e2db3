"""lm-eval integration: the `dlm` model type (generate_until, Monte Carlo loglikelihood), the packaged
chain_arith task scored as the project's scorer, and the `dlm-eval` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlm_generation import eval as dlm_eval
from dlm_generation.benchmark import solve
from dlm_generation.tasks.chain_arith import accuracy as chain_arith_accuracy
from dlm_generation.tasks.chain_arith import dev_split

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
LLADA = str(CARDS / "tiny-llada-chain-arith")
DREAM = str(CARDS / "tiny-dream-chain-arith")


@pytest.fixture(scope="module")
def llada_lm():
    return dlm_eval.DiffusionLM(pretrained=LLADA, device="cpu", batch_size=4, mc_num=16)


@pytest.mark.slow
def test_chain_arith_task_reproduces_the_benchmark_accuracy():
    """dlm-eval's chain_arith on the first problems equals the benchmark's scorer on the same decoding."""
    limit = 4
    results = simple_evaluate(model="dlm", model_args={"pretrained": DREAM, "device": "cpu", "batch_size": 4},
                              tasks=["chain_arith"], limit=limit,
                              task_manager=TaskManager(include_path=str(dlm_eval.TASKS_PATH)))
    accuracy = results["results"]["chain_arith"]["acc,none"]
    model = AutoModelForCausalLM.from_pretrained(DREAM)
    tokenizer = AutoTokenizer.from_pretrained(DREAM, padding_side="left")
    shipped = {k: v for k, v in model.generation_config.to_diff_dict().items()
               if k in ("alg", "schedule", "steps", "block_length", "eos_early_stop", "temperature", "threshold",
                        "cache_implementation")}
    expected = solve(model, tokenizer, list(dev_split(limit)), 256, 4, shipped)
    assert accuracy == chain_arith_accuracy(expected.completions, list(dev_split(limit)))


def test_generate_until_honours_until_and_gen_kwargs(llada_lm):
    problem = dev_split(1)[0]
    request = Instance("generate_until", {}, (problem.prompt, {"until": [" ="], "max_gen_toks": 64}), 0)
    text = llada_lm.generate_until([request], disable_tqdm=True)[0]
    assert " =" not in text and text.strip()  # cut before the first " ="
    assert llada_lm.speed()["nfe"] >= 1 and llada_lm.speed()["tokens_per_forward"] > 0


def test_loglikelihood_prefers_the_right_result_and_is_deterministic(llada_lm):
    problem = dev_split(1)[0]
    first = problem.completion.split(".")[0]  # " a op b = c"
    head, result = first.rsplit(" ", 1)
    wrong = f"{head} {int(result) + 7}"
    requests = [Instance("loglikelihood", {}, (problem.prompt, continuation), i)
                for i, continuation in enumerate([first, wrong])]
    (right_ll, right_greedy), (wrong_ll, wrong_greedy) = llada_lm.loglikelihood(requests, disable_tqdm=True)
    assert right_ll > wrong_ll and not wrong_greedy
    again = llada_lm.loglikelihood(requests[:1], disable_tqdm=True)[0]
    assert again == (right_ll, right_greedy)  # seeded by the request: no dependence on batching or order


def test_bad_model_args_and_rolling_loglikelihood_are_refused(llada_lm):
    with pytest.raises(ValueError, match=r"unknown model_args \['treshold'\] for the dlm model"):
        dlm_eval.DiffusionLM(pretrained=LLADA, device="cpu", treshold=0.9)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 3"):
        dlm_eval.DiffusionLM(pretrained=LLADA, device="cpu", threshold=3)
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling .* is not supported by the dlm model"):
        llada_lm.loglikelihood_rolling([])


def test_model_args_get_the_command_lines_checks():
    """`pretrained=` goes through the shared loader (a mistyped folder answers at once, naming it), and a dict field
    that is not JSON says so instead of reaching the config as a string."""
    with pytest.raises(ValueError, match=r"no model folder at .*tiny-llada \(did you mean .*tiny-llada-chain-arith"):
        dlm_eval.DiffusionLM(pretrained=str(CARDS / "tiny-llada"), device="cpu")
    with pytest.raises(ValueError, match=r"'\{window_left: 64\}' is not valid JSON .* e\.g\. "
                                         r"cache_config=\{\"window_left\": 64\}"):
        dlm_eval.DiffusionLM(pretrained=LLADA, device="cpu", cache_implementation="freecache",
                             cache_config="{window_left: 64}")
    with pytest.raises(ValueError, match="holds a Qwen2ForCausalLM, not a diffusion model"):
        dlm_eval.DiffusionLM(pretrained=str(CARDS / "tiny-ar-chain-arith"), device="cpu")


@pytest.mark.slow
def test_dlm_eval_command_finds_the_packaged_task(tmp_path, capsys):
    dlm_eval.main(["run", "--model", "dlm", "--model_args", f"pretrained={LLADA},threshold=0.9,alg=low_confidence",
                   "--tasks", "chain_arith", "--limit", "2", "--device", "cpu", "--batch_size", "2",
                   "--output_path", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "chain_arith" in printed and "dlm speed:" in printed
    speed = json.loads(printed.split("dlm speed:")[-1].strip().splitlines()[0])
    assert speed["nfe"] >= 1 and speed["tokens_per_forward"] > 1  # threshold 0.9 commits several per forward
    saved = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert saved["config"]["dlm_speed"]["nfe"] == speed["nfe"]  # the speed is saved next to the metrics
    assert saved["config"]["dlm_config"] == {"threshold": 0.9, "alg": "low_confidence"}


def test_chat_template_is_applied(llada_lm):
    problem = dev_split(1)[0]
    context = llada_lm.apply_chat_template([{"role": "user", "content": problem.question}])
    assert context.startswith(llada_lm.tokenizer.bos_token) and problem.question in context
    encoded = llada_lm.tok_encode(context)
    assert encoded.count(llada_lm.tokenizer.bos_token_id) == 1  # the template's BOS, not a second one
    request = Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 64}), 0)
    text = llada_lm.generate_until([request], disable_tqdm=True)[0]
    assert "####" in text
    llada_lm.chat_applied = False


def _results(folder: Path) -> tuple[float, list[str]]:
    results = json.loads(next(folder.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for path in folder.rglob("samples_chain_arith_*.jsonl")
               for line in path.read_text().splitlines()]
    responses = [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    return results["results"]["chain_arith"]["acc,none"], responses


@pytest.mark.slow
def test_two_processes_give_the_scores_of_one(tmp_path, free_port):
    """Data parallel with torchrun (gloo on CPU): the requests are sharded over 2 ranks and gathered; scores and
    completions equal a single process's."""
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    args = ["run", "--model", "dlm", "--model_args", f"pretrained={LLADA},threshold=0.9,alg=low_confidence",
            "--tasks", "chain_arith", "--limit", "4", "--device", "cpu", "--batch_size", "2", "--log_samples"]
    # A fresh free port each run: torchrun's fixed default (29500) collides with any other process group on the
    # machine (a parallel test run, a previous run's rank still exiting).
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                          str(free_port()), "-m", "dlm_generation.eval", *args, "--output_path", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-4000:]
    dlm_eval.main([*args, "--output_path", str(tmp_path / "one")])
    assert _results(tmp_path / "two") == _results(tmp_path / "one")
