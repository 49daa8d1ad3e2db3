"""Non-finite logits (NaN / inf: a float16 overflow, a broken checkpoint) stop decoding with an error that names the
forward pass and the dtype, instead of an empty completion after a full decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dlm_generation  # noqa: F401  (registers LLaDA and Dream)

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
PROMPT = torch.tensor([[5, 6, 7]])
# A weight whose NaN / inf reaches every logit (a NaN query alone does not: CPU attention returns finite values).
BROKEN_WEIGHT = {"tiny-random-llada": "model.transformer.blocks.0.ff_out.weight",
                 "tiny-random-dream": "model.layers.0.mlp.down_proj.weight"}
CONFIGS = [dict(), dict(cache_implementation="dual", threshold=0.9, alg="maskgit_plus", block_length=4)]


@pytest.fixture(scope="module", params=sorted(BROKEN_WEIGHT))
def family(request):
    return request.param, AutoModelForCausalLM.from_pretrained(CARDS / request.param).eval()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("config", CONFIGS, ids=["no-cache", "dual-threshold"])
def test_broken_weights_raise_instead_of_decoding(family, value, config):
    name, model = family
    weight = dict(model.named_parameters())[BROKEN_WEIGHT[name]]
    expected = model.diffusion_generate(PROMPT, max_new_tokens=8, **config)  # finite weights decode as before
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(value)
        with pytest.raises(ValueError) as caught:
            model.diffusion_generate(PROMPT, max_new_tokens=8, **config)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    message = str(caught.value)
    assert "forward pass 1 (block 1 of" in message and "non-finite logits (NaN or inf)" in message
    assert "the model's dtype is float32" in message and "check the checkpoint" in message
    assert torch.equal(model.diffusion_generate(PROMPT, max_new_tokens=8, **config), expected)


class BreakFrom:
    """A forward hook that writes NaN into the logits from the `first`-th forward on."""

    def __init__(self, first: int, value: float = float("nan")):
        self.first, self.value, self.calls = first, value, 0

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls >= self.first:
            output.logits[..., 3] = self.value
        return output


@pytest.mark.parametrize("first", [1, 3, 6])
def test_the_error_names_the_first_forward_with_non_finite_logits(family, first):
    _, model = family
    hook = model.register_forward_hook(BreakFrom(first))
    try:
        with pytest.raises(ValueError, match=rf"forward pass {first} \(block {(first - 1) // 4 + 1} of 2\)"):
            model.diffusion_generate(PROMPT, max_new_tokens=8, block_length=4, steps=8)
    finally:
        hook.remove()


@pytest.mark.parametrize("dtype, advice", [(torch.bfloat16, "load the model with dtype=torch.float32"),
                                           (torch.float16, "float16 overflows easily: load the model with "
                                                           "dtype=torch.bfloat16 or torch.float32")])
def test_a_half_precision_model_is_told_which_dtype_to_use(family, dtype, advice):
    half = AutoModelForCausalLM.from_pretrained(CARDS / family[0], dtype=dtype).eval()
    hook = half.register_forward_hook(BreakFrom(2, float("inf")))
    with pytest.raises(ValueError) as caught:
        half.diffusion_generate(PROMPT, max_new_tokens=8)
    hook.remove()
    message = str(caught.value)
    assert "forward pass 2 (block 1 of 1)" in message and f"dtype is {str(dtype)[6:]}" in message
    assert advice in message


def test_minus_infinity_logits_are_not_an_error(family):
    """A suppressed token (-inf logit, what SuppressTokensLogitsProcessor writes) is a finite distribution."""
    _, model = family

    def suppress(module, args, output):
        output.logits[..., 9] = float("-inf")
        return output

    hook = model.register_forward_hook(suppress)
    try:
        suppressed = model.diffusion_generate(PROMPT, max_new_tokens=8)
    finally:
        hook.remove()
    assert suppressed.shape == (1, 11) and not (suppressed[:, 3:] == 9).any()
