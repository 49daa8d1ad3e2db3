"""SDAR decoding reproduces the reference's tokens and forwards (tests/fixtures/golden_sdar).

The cases were produced by `benchmarks/sdar_reference.py golden`, which runs the authors' evaluation decoding
(`block_diffusion_generate` of their OpenCompass model, greedy) unmodified on the tiny random model stored beside
them. The reference's canvas is whole aligned blocks, so each case's length ends on a block boundary; ours must be a
multiple of the block length, so it may be longer: tokens are compared over the reference's length. The reference
stores the last block in its cache before it stops (a forward nothing reads), which this library skips: our
forwards, up to the step that settled the reference's last token, are the reference's minus one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlm_generation import SDARForCausalLM

GOLDEN = Path(__file__).parent / "fixtures" / "golden_sdar"
CASES = [json.loads(line) for line in (GOLDEN / "cases.jsonl").read_text().splitlines()]
MASK, STOPS, PAD = 500, [501, 502], 503


@pytest.fixture(scope="module")
def models():
    model = SDARForCausalLM.from_pretrained(GOLDEN / "tiny-sdar", dtype=torch.float32).eval()
    return {"float32": model, "float64": SDARForCausalLM.from_pretrained(GOLDEN / "tiny-sdar").double().eval()}


def settings(case) -> dict:
    args = case["args"]
    block = args["block_length"]
    new = -(-args["gen_length"] // block) * block
    return dict(max_new_tokens=new, block_length=block, steps=args["denoising_steps"] * new // block,
                threshold=None if args["threshold"] >= 1 else args["threshold"], mask_token_id=MASK,
                eos_token_id=STOPS, pad_token_id=PAD, return_dict_in_generate=True, output_commit_steps=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_block_diffusion_generate_cases(models, case):
    model = models[case["dtype"]]
    prompt = torch.tensor(case["input_ids"])
    out = model.diffusion_generate(prompt, **settings(case))
    ours = out.sequences[0, prompt.shape[1]:].tolist()
    expected = case["generated"][0]
    assert ours[:len(expected)] == expected
    if case["stopped"][0]:
        assert out.nfe == case["nfe"] - 1
    else:
        assert int(out.commit_steps[0, :len(expected)].max()) == case["nfe"] - 1
