"""EB-Sampler as a commit policy (`entropy_bound`): transformers' acceptance rule, validation, precedence, saving."""

from __future__ import annotations

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
)

from dlm_generation import DiffusionGenerationConfig
from dlm_generation.diffusion_strategies import EntropyBoundPolicy, LinearSchedule, StepContext, token_entropy


def context(entropy: torch.Tensor) -> StepContext:
    batch = entropy.shape[0]
    return StepContext(step=0, count=torch.ones(batch, dtype=torch.long), remaining=torch.full((batch,), 99),
                       schedule=LinearSchedule(), entropy=entropy)


@pytest.mark.parametrize("bound", [0.05, 0.5, 2.0, 10.0])
def test_acceptance_equals_transformers_entropy_bound_sampler(bound):
    generator = torch.Generator().manual_seed(int(bound * 100))
    logits = torch.randn(4, 24, 50, generator=generator) * torch.rand(4, 24, 1, generator=generator) * 6
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), canvas_length=24, vocab_size=50,
                                  max_denoising_steps=1)
    current, proposed = torch.zeros(4, 24, dtype=torch.long), torch.ones(4, 24, dtype=torch.long)
    sampler.accept_canvas(current, proposed, logits, 0)
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    eligible = torch.ones(4, 24, dtype=torch.bool)
    ours = EntropyBoundPolicy(bound).select(torch.zeros(4, 24), eligible, context(entropy))
    assert torch.equal(ours, sampler.accepted_token_mask)


def test_only_eligible_positions_count_and_one_always_passes():
    entropy = torch.tensor([[0.1, 5.0, 0.2, 0.3, 9.0]])
    eligible = torch.tensor([[False, True, True, True, True]])
    chosen = EntropyBoundPolicy(0.25).select(torch.zeros(1, 5), eligible, context(entropy))
    assert chosen.tolist() == [[False, False, True, True, False]]  # 0.2 + 0.3 - 0.3 <= 0.25; adding 5.0 is not
    tiny = EntropyBoundPolicy(1e-9).select(torch.zeros(1, 5), eligible, context(entropy))
    assert tiny.tolist() == [[False, False, True, False, False]]  # the lowest entropy one, whatever the bound


def test_the_step_entropy_is_the_distributions():
    """The entropy the loop hands the policy (`token_entropy`) equals torch's Categorical entropy of the same logits,
    also where a logit is -inf (a suppressed token)."""
    logits = torch.randn(2, 7, 300) * 4
    logits[0, 0, :10] = float("-inf")
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(token_entropy(logits), expected, rtol=1e-5, atol=1e-5)


def test_validation_says_what_to_change():
    with pytest.raises(ValueError, match="entropy_bound must be a number > 0"):
        DiffusionGenerationConfig(entropy_bound=0)
    with pytest.raises(ValueError, match="entropy_bound and threshold are alternative"):
        DiffusionGenerationConfig(entropy_bound=0.5, threshold=0.9)
    with pytest.raises(ValueError, match="entropy_bound replaces it"):
        DiffusionGenerationConfig(entropy_bound=0.5, alg="origin")


def test_a_call_s_policy_replaces_the_one_the_model_ships(llada_chain_arith, tmp_path):
    """The shipped LLaDA's generation_config holds a threshold (0.7): a call (or a passed config) with entropy_bound
    decodes with the bound alone; two policies chosen explicitly raise."""
    model = llada_chain_arith
    assert model.generation_config.threshold == 0.7
    config = model._prepare_generation_config(None, {"entropy_bound": 0.3})
    assert (config.entropy_bound, config.threshold) == (0.3, None)
    saved = DiffusionGenerationConfig(entropy_bound=0.3)
    saved.save_pretrained(tmp_path)
    loaded = DiffusionGenerationConfig.from_pretrained(tmp_path)
    assert loaded.entropy_bound == 0.3
    config = model._prepare_generation_config(loaded, {})
    assert (config.entropy_bound, config.threshold) == (0.3, None)  # a passed config chooses too
    for passed, call in ((None, {"entropy_bound": 0.3, "threshold": 0.8}), (loaded, {"threshold": 0.8})):
        with pytest.raises(ValueError, match="alternative parallel-decoding policies"):  # both chosen explicitly
            model._prepare_generation_config(passed, call)


def test_decoding_commits_more_per_step_as_the_bound_grows(llada_chain_arith, chain_arith_tokenizer):
    ids = chain_arith_tokenizer("Question: Start with 63. Subtract 39. Add 46. What is the result?\nAnswer:",
                                return_tensors="pt").input_ids
    forwards = []
    for bound in (1e-9, 0.1, 1.0):
        out = llada_chain_arith.diffusion_generate(ids, max_new_tokens=64, block_length=32, entropy_bound=bound,
                                                   cache_implementation=None, eos_early_stop=False,
                                                   return_dict_in_generate=True)
        forwards.append(out.nfe)
    assert forwards[0] == 64 and forwards[0] > forwards[1] >= forwards[2]  # a tiny bound: one token per step
