"""PC-Sampler's position-aware calibration (`position_decay`): off at 0, left to right when strong, validated."""

from __future__ import annotations

import pytest
import torch

from dlm_generation import DiffusionGenerationConfig

PROMPT = "Question: Start with 63. Subtract 39. Add 46. What is the result?\nAnswer:"


def decode(model, tokenizer, **settings):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    settings = {"threshold": None, "position_decay": None, "suffix_window": None, **settings}
    return model.diffusion_generate(ids, max_new_tokens=64, block_length=32, cache_implementation=None,
                                    eos_early_stop=False, return_dict_in_generate=True, output_commit_steps=True,
                                    **settings)


def test_zero_decay_changes_nothing(llada_chain_arith, chain_arith_tokenizer):
    plain = decode(llada_chain_arith, chain_arith_tokenizer)
    zero = decode(llada_chain_arith, chain_arith_tokenizer, position_decay=0.0)
    assert torch.equal(plain.sequences, zero.sequences) and torch.equal(plain.commit_steps, zero.commit_steps)


@pytest.mark.parametrize("alg", ["low_confidence", "entropy"])
def test_a_strong_decay_decodes_left_to_right(llada_chain_arith, chain_arith_tokenizer, alg):
    out = decode(llada_chain_arith, chain_arith_tokenizer, position_decay=50.0, alg=alg)
    steps = out.commit_steps[0].tolist()
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one position per step, in canvas order
    plain = decode(llada_chain_arith, chain_arith_tokenizer, alg=alg)
    assert plain.commit_steps[0].tolist() != steps  # without it the model commits out of order


def test_it_works_with_threshold_and_thins_far_commits(llada_chain_arith, chain_arith_tokenizer):
    fast = decode(llada_chain_arith, chain_arith_tokenizer, threshold=0.9, alg="low_confidence")
    decayed = decode(llada_chain_arith, chain_arith_tokenizer, threshold=0.9, alg="low_confidence",
                     position_decay=0.5)
    assert decayed.nfe >= fast.nfe  # far positions need more confidence to pass


def test_validation_says_what_to_change():
    with pytest.raises(ValueError, match="position_decay must be a number >= 0"):
        DiffusionGenerationConfig(position_decay=-1)
    assert DiffusionGenerationConfig(position_decay=0.3).position_decay == 0.3


def test_it_scales_the_entropy_that_the_entropy_bound_reads(llada_chain_arith, chain_arith_tokenizer):
    """EB-Sampler ranks and bounds by entropy, not confidence: the decay divides it by the weight (the uncertainty of
    a far position counts more), so a strong decay decodes left to right under an entropy bound too."""
    bound = decode(llada_chain_arith, chain_arith_tokenizer, entropy_bound=0.5)
    decayed = decode(llada_chain_arith, chain_arith_tokenizer, entropy_bound=0.5, position_decay=50.0)
    assert decayed.nfe > bound.nfe
    steps = decayed.commit_steps[0].tolist()
    assert steps == sorted(steps)
