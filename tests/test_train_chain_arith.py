"""examples/train_chain_arith.py: the script that trained the shipped chain-arith models.

Tiny dimensions, a few steps: the point is that training, resuming, exporting and the AR/Dream -> LLaDA
initialisation work, not that anything is learned.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import dlm_generation
from dlm_generation.tasks import dev_split

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import train_chain_arith as train  # noqa: E402

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--ffn", "128", "--batch-size", "8", "--warmup", "1",
        "--eval-problems", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(train.TOKENIZER)


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory, tokenizer):
    """A random 2-layer Qwen2 on the chain-arith tokenizer, saved like the shipped AR model."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=128, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def namespace(init_from, extra_layers=0, qkv_bias=True):
    return argparse.Namespace(hidden=64, layers=2, heads=4, ffn=128, qkv_bias=qkv_bias, extra_layers=extra_layers,
                              seed=0, init_from=str(init_from))


@pytest.mark.parametrize("extra_layers", [1, 2])
def test_shift_block_makes_llada_read_the_shifted_features(qwen2_folder, tokenizer, extra_layers):
    """LLaDA = the source's blocks + one shift block (+ identity blocks): its logits at i are Dream's at i-1."""
    dream = train.build_model("dream", namespace(qwen2_folder), tokenizer).eval()
    llada = train.build_model("llada", namespace(qwen2_folder, extra_layers=extra_layers), tokenizer).eval()
    problem = dev_split(1)[0]
    ids = torch.tensor([tokenizer(problem.prompt + problem.completion).input_ids])
    ids[0, -12::2] = tokenizer.mask_token_id  # masked positions, as in decoding
    with torch.no_grad():
        shifted = dream(input_ids=ids).logits[0, :-1]
        unshifted = llada(input_ids=ids).logits[0, 1:]
    assert torch.equal(shifted.argmax(-1), unshifted.argmax(-1))
    assert (shifted - unshifted).abs().max() < 0.05 * shifted.abs().max()
    # without the shift block the unshifted head reads position i's own features: a different model
    plain = train.build_model("llada", namespace(qwen2_folder), tokenizer).eval()
    with torch.no_grad():
        same_place = plain(input_ids=ids).logits[0, 1:]
    assert (shifted.argmax(-1) != same_place.argmax(-1)).any()


def test_llada_from_qwen2_needs_qkv_bias(qwen2_folder):
    with pytest.raises(SystemExit):
        train.main(["--kind", "llada", "--out", "unused", "--init-from", str(qwen2_folder), *TINY])


@pytest.mark.slow
def test_train_resume_export(tmp_path, qwen2_folder, capsys):
    out = tmp_path / "run"
    common = ["--kind", "llada", "--out", str(out), "--init-from", str(qwen2_folder), "--qkv-bias",
              "--extra-layers", "1", *TINY, "--eval-every", "2"]
    train.main([*common, "--steps", "2"])
    state = torch.load(out / "checkpoint.pt", weights_only=False)["state"]
    # a run initialised from another model is evaluated before its first step too
    assert state["step"] == 2 and [c["step"] for c in state["curve"]] == [0, 2]
    assert state["curve"][0]["loss"] is None and (out / "best.pt").exists()

    train.main([*common, "--steps", "4"])  # resumes from step 2
    assert "resumed from step 2" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=False)["state"]
    assert state["step"] == 4 and [i["from_step"] for i in state["invocations"]] == [0, 2]

    with pytest.raises(SystemExit, match="different settings"):
        train.main([*common[:-2], "--batch-size", "16", "--eval-every", "2", "--steps", "6"])

    folder = tmp_path / "exported"
    train.main([*common, "--steps", "4", "--export", str(folder)])
    model = AutoModel.from_pretrained(folder)
    assert isinstance(model, dlm_generation.LLaDAModelLM) and model.config.n_layers == 3
    assert model.generation_config.block_length == train.RECOMMENDED["llada"]["block_length"]
    log = json.loads((folder / "training_log.json").read_text())
    assert log["step"] == 4 and log["args"]["extra_layers"] == 1 and log["best_metric"]["block_length"] == 32
    assert log["best_metric"]["gen_length"] == 256 and set(log["curve"][0]["dev_accuracies"]) == {"vanilla", "threshold", "left-to-right"}
    assert log["initialised_from"] is None  # the random Qwen2 source has no training log
    assert AutoTokenizer.from_pretrained(folder).mask_token_id == 3
    assert not list(folder.glob("*.py"))  # loaded through the installed package


@pytest.mark.slow
def test_export_records_the_lineage_of_its_source(tmp_path, qwen2_folder, tokenizer):
    """A run initialised from a trained folder keeps that folder's log (and its own source's, nested), read before
    an export can overwrite the folder."""
    (qwen2_folder / "training_log.json").write_text(json.dumps({"step": 7, "train_seconds": 60.0,
                                                                 "args": {"init_from": None}}))
    try:
        out, folder = tmp_path / "run", tmp_path / "exported"
        common = ["--kind", "dream", "--out", str(out), "--init-from", str(qwen2_folder), *TINY,
                  "--skip-initial-eval", "--eval-every", "100"]
        train.main([*common, "--steps", "1"])
        (qwen2_folder / "training_log.json").unlink()  # what an export over the source folder would do
        torch.save(torch.load(out / "checkpoint.pt", weights_only=False)["model"], out / "best.pt")
        train.main([*common, "--steps", "1", "--export", str(folder)])
        log = json.loads((folder / "training_log.json").read_text())
        assert log["initialised_from"]["model"] == qwen2_folder.name
        assert log["initialised_from"]["train_seconds"] == 60.0 and log["initialised_from"]["initialised_from"] is None
    finally:
        (qwen2_folder / "training_log.json").unlink(missing_ok=True)


def test_decode_state_masks():
    """Block rows: clean prefix, a partly masked block carrying the loss, masked suffix. Uniform rows: loss on every
    masked position, the EOS padding after the answer weighted PAD_WEIGHT in all."""
    rng = train.random.Random(0)
    blocks = uniform = 0
    for _ in range(400):
        masked, weights = train.decode_state_mask(rng, answer=30, canvas=256, block_prob=0.75)
        assert len(masked) == len(weights) == 256 and any(masked)
        carrying = [i for i, w in enumerate(weights) if w]
        if weights[-1] == 0:  # a block state: the loss sits in one block, everything after it is masked
            blocks += 1
            frontier, stop = carrying[0], carrying[-1] + 1
            assert stop % 8 == 0 and stop - frontier <= max(train.BLOCK_LENGTHS)
            assert frontier < 32 + 64 + 64  # at most the block after the one holding the first EOS
            assert masked[frontier] and not any(masked[:frontier]) and all(masked[stop:])
        else:
            uniform += 1
            assert weights[:30] == [1.0] * 30 and abs(sum(weights[30:]) - train.PAD_WEIGHT) < 1e-6
    assert 250 < blocks < 350 and blocks + uniform == 400
    # the decoding frontier (first masked position of the block) weighs 1, the look-ahead positions after it less
    for _ in range(50):
        masked, weights = train.decode_state_mask(rng, answer=30, canvas=256, block_prob=1.0, lookahead_weight=0.2)
        carrying = [i for i, w in enumerate(weights) if w]
        frontier = carrying[0]
        assert masked[frontier] and not any(masked[:frontier]) and set(weights[frontier + 1:]) <= {0.0, 0.2}


def test_diffusion_batches_keep_the_token_budget():
    args = argparse.Namespace(seed=0, canvas_min=64, canvas_max=1024, tokens_per_step=6144, short_canvas_prob=0.0)
    canvases = []
    for step in range(200):
        problems, canvas = train.diffusion_batch(step, args)
        assert 64 <= canvas <= 1024 and canvas % 8 == 0
        assert len(problems) * (canvas + 40) <= 6144 or len(problems) <= 2
        canvases.append(canvas)
    assert min(canvases) < 100 and max(canvases) > 800  # log-uniform over the whole range
    assert train.diffusion_batch(5, args)[0] == train.diffusion_batch(5, args)[0]  # deterministic in the step


def test_short_canvas_steps():
    args = argparse.Namespace(seed=0, canvas_min=64, canvas_max=1024, tokens_per_step=6144, short_canvas_prob=0.5)
    canvases = [train.diffusion_batch(step, args)[1] for step in range(400)]
    short = sum(c <= 128 for c in canvases)
    assert all(64 <= c <= 1024 and c % 8 == 0 for c in canvases)
    assert 200 < short < 300 and max(canvases) > 800  # half the steps short, plus the log-uniform share below 128


def test_result_positions_are_the_computed_digits(tokenizer):
    problem = dev_split(1)[0]  # 97 - 21 = 76. 76 - 72 = 4. 4 + 49 = 53. 53 + 50 = 103. #### 103
    _, (completion,) = train.encode([problem], tokenizer)
    positions = train.result_positions(completion, tokenizer)
    digits = "".join(tokenizer.decode([completion[i]]).strip() for i in positions)
    assert digits == "".join(str(r) for r in problem.results) + str(problem.answer)


def test_hard_decode_states_put_the_loss_on_a_computed_digit():
    rng = train.random.Random(0)
    hard = [9, 10, 21, 31, 32]
    for _ in range(200):
        masked, weights = train.decode_state_mask(rng, answer=52, canvas=256, block_prob=1.0, lookahead_weight=0.2,
                                                  hard=hard, hard_prob=1.0)
        targets = [i for i in hard if weights[i] == 1.0 and masked[i]]
        assert targets, "one computed digit is masked and carries weight 1"
        carrying = [i for i, w in enumerate(weights) if w]
        frontier = carrying[0]
        assert masked[frontier] and not any(masked[:frontier]) and weights[frontier] == 1.0
        assert all(masked[frontier + max(train.BLOCK_LENGTHS):]) and set(weights) <= {0.0, 0.2, 1.0}
    # hard_prob 0 draws exactly what it drew before the option existed
    a, b = train.random.Random(3), train.random.Random(3)
    assert [train.decode_state_mask(a, 52, 256, 0.75, 0.2) for _ in range(20)] == \
        [train.decode_state_mask(b, 52, 256, 0.75, 0.2, hard, 0.0) for _ in range(20)]
