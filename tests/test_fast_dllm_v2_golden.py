"""Fast-dLLM v2 decoding reproduces the reference's tokens and forwards (tests/fixtures/golden_block_diffusion).

The cases were produced by `benchmarks/fast_dllm_v2_reference.py golden`, which runs the reference code unmodified
(the released checkpoint's `generate`, NVlabs' `batch_sample`) on the tiny random model stored beside them. Our
canvas is always `max_new_tokens` positions after the prompt, while the reference stops at the aligned block
boundary before it and then predicts one token more (README of the fixtures): tokens are compared over the
reference's length, and forwards at the step that settled the reference's last token. `batch_sample` right-pads
prompts with the mask id and gives every row the longest row's block count; our batch is left-padded and each row
equals its solo call, so its rows are compared up to the last aligned block boundary inside our canvas (forwards are
not compared: the reference's batch forwards are shared differently).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlm_generation import FastDLLMV2Model

GOLDEN = Path(__file__).parent / "fixtures" / "golden_block_diffusion"
CASES = [json.loads(line) for line in (GOLDEN / "cases.jsonl").read_text().splitlines()]
MASK, STOP = 500, 501


@pytest.fixture(scope="module")
def models():
    model = FastDLLMV2Model.from_pretrained(GOLDEN / "tiny-fast-dllm-v2", dtype=torch.float32).eval()
    return {"float32": model, "float64": FastDLLMV2Model.from_pretrained(GOLDEN / "tiny-fast-dllm-v2").double().eval()}


def settings(case) -> dict:
    args = case["args"]
    return dict(max_new_tokens=args["max_new_tokens"], block_length=args["block_size"],
                sub_block_length=args["small_block_size"], threshold=float(args["threshold"]), mask_token_id=MASK,
                eos_token_id=STOP, pad_token_id=502, return_dict_in_generate=True, output_commit_steps=True)


@pytest.mark.parametrize("case", [c for c in CASES if c["reference"] == "generate"], ids=lambda c: c["id"])
def test_generate_cases(models, case):
    model = models[case["dtype"]]
    prompt = torch.tensor(case["input_ids"])
    out = model.diffusion_generate(prompt, **settings(case))
    ours = out.sequences[0, prompt.shape[1]:].tolist()
    expected = case["generated"][0]
    shared = min(len(ours), len(expected))
    assert ours[:shared] == expected[:shared]
    if case["stopped"][0]:
        assert out.nfe == case["nfe"]
    elif len(expected) <= len(ours):  # the forward that settled the reference's last token is its last forward
        assert int(out.commit_steps[0, len(expected) - 1]) == case["nfe"]
    else:  # the reference's extra token lies past our canvas: it made one more forward
        assert out.nfe == case["nfe"] - (len(expected) - len(ours))


@pytest.mark.parametrize("case", [c for c in CASES if c["reference"] == "batch_sample"], ids=lambda c: c["id"])
def test_batch_sample_cases_with_a_left_padded_batch(models, case):
    model = models[case["dtype"]]
    rows = case["input_ids"]
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    out = model.diffusion_generate(ids, attention_mask=mask, **settings(case))
    block, new = case["args"]["block_size"], case["args"]["max_new_tokens"]
    for row, (prompt, expected) in enumerate(zip(rows, case["generated"])):
        ours = out.sequences[row, length:].tolist()
        # batch_sample gives every row the block count of the longest prompt; a row's tokens agree up to the last
        # aligned block boundary inside our canvas (and the token the forward that completes that block predicts)
        aligned = (len(prompt) + new) // block * block + 1 - len(prompt)
        shared = min(len(expected), aligned)
        assert ours[:shared] == expected[:shared], row
