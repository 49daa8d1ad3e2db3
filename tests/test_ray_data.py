"""Offline generation on Ray Data: `ray_data.generate_dataset` and `dlm-generate --ray` give the single-process run's
rows, stats included, in input order.

Real Ray on this machine (2 CPUs, no dashboard), started once for the module. Decoding uses the shipped tiny LLaDA's
own generation_config (dual cache, threshold 0.9, block 8) with a 64-token canvas instead of 256: every dev answer
fits in 64 tokens, and it keeps the single-process reference (32 prompts, 4 batches in 5 uneven blocks) short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'dlm-generation[serve]'")

import ray  # noqa: E402
import torch  # noqa: E402

from dlm_generation import cli  # noqa: E402
from dlm_generation.loading import load_models  # noqa: E402
from dlm_generation.ray_data import _value_error, generate_dataset, totals  # noqa: E402
from dlm_generation.tasks.chain_arith import dev_split, is_correct  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-data")]

ROOT = Path(__file__).resolve().parents[1]
LLADA = str(ROOT / "model_cards" / "tiny-llada-chain-arith")
CONFIG = {"max_new_tokens": 64}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for the module: 2 CPUs (one per worker), no dashboard, a small object store."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024 ** 2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def single_process(prompts: list[str], batch_size: int = 8) -> list[dict]:
    """The rows `dlm-generate` decodes, batch by batch, in this process: completion, tokens, the batch's nfe."""
    model, tokenizer, guide = load_models(LLADA)
    use_template = cli.uses_chat_template(tokenizer)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            completions, stats = cli.generate_prompts(model, tokenizer, guide, prompts[start:start + batch_size],
                                                      CONFIG, use_template, "cpu")
            rows += [{"completion": text, "tokens": tokens, "nfe": stats["nfe"]}
                     for text, tokens in zip(completions, stats["lengths"])]
    return rows


def test_32_prompts_on_two_workers_equal_the_single_process_run_in_input_order(ray_cluster):
    problems = dev_split(32)
    prompts = [p.question for p in problems]
    expected = single_process(prompts)
    # A Dataset in 5 uneven blocks, with a column of its own that must come through.
    dataset = ray.data.from_items([{"question": p.question, "answer": p.answer} for p in problems],
                                  override_num_blocks=5)
    rows = generate_dataset(dataset, LLADA, num_workers=2, batch_size=8, prompt_column="question", **CONFIG).take_all()
    assert [row["index"] for row in rows] == list(range(32))
    assert [row["question"] for row in rows] == prompts
    assert [row["answer"] for row in rows] == [p.answer for p in problems]
    assert [row["batch"] for row in rows] == [i // 8 for i in range(32)]
    assert [{key: row[key] for key in ("completion", "tokens", "nfe")} for row in rows] == expected
    for row in rows:
        assert list(row["completions"]) == [row["completion"]]
        assert row["tokens_per_forward"] == pytest.approx(row["tokens"] / row["nfe"]) and row["seconds"] > 0
    correct = sum(is_correct(row["completion"], p) for row, p in zip(rows, problems))
    assert correct >= 24, correct  # the model works (and equals the single-process run, above)


def test_the_command_line_prints_what_the_single_process_run_prints(ray_cluster, tmp_path, capsys):
    """`dlm-generate --ray --num-workers 2 --json` (a separate process, joining the module's Ray with --address;
    `generate_dataset` on a list) prints the single-process run's document: every completion, the stats but for the
    timings."""
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(p.question for p in dev_split(12)) + "\n")
    argv = [LLADA, "--prompts-file", str(questions), "--max-new-tokens", "64", "--json"]
    assert cli.main(argv) == 0
    expected = json.loads(capsys.readouterr().out)
    result = subprocess.run([sys.executable, "-m", "dlm_generation.cli", *argv, "--ray", "--num-workers", "2",
                             "--address", ray_cluster], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout)
    for document in (got, expected):
        for timing in ("seconds", "tokens_per_second"):
            assert document["stats"].pop(timing) > 0
    assert len(got["results"]) == 12 and got == expected
    assert ray.is_initialized()  # the command left the module's Ray running


def test_totals_count_each_batch_once():
    rows = [{"batch": b, "tokens": 10, "nfe": 4 + b, "seconds": 0.5} for b in (0, 0, 1)]
    assert totals(rows) == {"nfe": 9, "tokens": 30, "seconds": 1.0, "guide_forwards": None}


def test_bad_inputs_raise_clear_errors(ray_cluster):
    with pytest.raises(ValueError, match=r"num_workers must be an integer of at least 1, got 0"):
        generate_dataset(["x"], LLADA, num_workers=0)
    with pytest.raises(ValueError, match=r"batch_size must be an integer of at least 1, got -1"):
        generate_dataset(["x"], LLADA, batch_size=-1)
    with pytest.raises(ValueError, match=r"no prompts to decode: the list is empty"):
        generate_dataset([], LLADA)
    with pytest.raises(ValueError, match=r"not a single string"):
        generate_dataset("Start with 1.", LLADA)
    with pytest.raises(ValueError, match=r"prompt 1 is int 7, not a string"):
        generate_dataset(["a", 7], LLADA)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 2"):
        generate_dataset(["x"], LLADA, threshold=2)
    with pytest.raises(ValueError, match=r"no model folder at .*tiny-llada-chain-arith-nope"):
        generate_dataset(["x"], LLADA + "-nope")
    dataset = ray.data.from_items([{"text": "Start with 1. Add 2."}, {"text": "Start with 3. Add 4."}])
    with pytest.raises(ValueError, match=r"the dataset has no prompt column 'prompt' \(its columns: text\); pass "
                                         r"prompt_column="):
        generate_dataset(dataset, LLADA)
    with pytest.raises(ValueError, match=r"no prompts to decode: the dataset is empty"):
        generate_dataset(dataset.limit(0), LLADA, prompt_column="text")
    with pytest.raises(ValueError, match=r"already has the column\(s\) index, which generate_dataset writes"):
        generate_dataset(dataset.add_column("index", lambda batch: [0] * len(batch)), LLADA, prompt_column="text")


def test_what_an_actor_raised_is_found_in_rays_wrapping():
    """Ray hands an actor's error back wrapped (RayTaskError, UserCodeException, ActorDiedError): the ValueError is
    found in the chain of causes, else in the report's `ValueError: ...` line (its colour codes dropped)."""
    try:
        try:
            raise ValueError("the prompt is too long")
        except ValueError as inner:
            raise RuntimeError("UDF failed to process a data block.") from inner
    except RuntimeError as wrapped:
        assert _value_error(wrapped) == "the prompt is too long"
    report = RuntimeError("\x1b[36mray::MapWorker(MapBatches(BatchGenerator)).__init__()\x1b[39m (pid=1)\n"
                          "ValueError: /m holds a Qwen2ForCausalLM, not a diffusion model\n")
    assert _value_error(report) == "/m holds a Qwen2ForCausalLM, not a diffusion model"
    assert _value_error(RuntimeError("the node died")) is None


@pytest.mark.nightly
def test_a_prompt_the_model_refuses_is_a_value_error(ray_cluster):
    """What diffusion_generate refuses inside an actor comes back as the ValueError it raised (an actor start: ~20 s
    on a small machine, so nightly)."""
    with pytest.raises(ValueError, match=r"more than the model's 4096"):
        generate_dataset(["Start with 1. Add 2."], LLADA, num_workers=1, max_new_tokens=4096, steps=4096)
