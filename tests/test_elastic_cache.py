"""Elastic-Cache (`cache_implementation="elastic"`): the window runs, the rest is cached and refreshed from the layer
where attention to the most-attended keys drifts."""

from __future__ import annotations

import pytest
import torch

from dlm_generation import DiffusionGenerationConfig, ElasticCache

PROMPTS = ["Question: Start with 63. Subtract 39. Add 46. What is the result?\nAnswer:",
           "Question: Start with 8. Add 75. Subtract 19. Add 52. What is the result?\nAnswer:"]
FAST = dict(max_new_tokens=64, steps=64, block_length=32, threshold=0.9, alg="low_confidence", eos_early_stop=False)


def ids(tokenizer, prompt=PROMPTS[0]):
    return tokenizer(prompt, return_tensors="pt").input_ids


def test_without_refreshes_the_block_window_is_the_dual_cache(llada_chain_arith, chain_arith_tokenizer):
    """gamma=-1 never refreshes inside a block: every step runs the block against the keys of the block's first
    forward, which is exactly what the dual cache does."""
    for prompt in PROMPTS:
        cache = ElasticCache({"gamma": -1.0})
        elastic = llada_chain_arith.diffusion_generate(ids(chain_arith_tokenizer, prompt), past_key_values=cache, **FAST)
        dual = llada_chain_arith.diffusion_generate(ids(chain_arith_tokenizer, prompt), cache_implementation="dual",
                                                    **FAST)
        assert torch.equal(elastic, dual)
        assert int(cache.cached_steps.sum()) > 0 and int(cache.drift_refreshes.sum()) == 0


def test_gamma_sets_how_often_drift_refreshes(llada_chain_arith, chain_arith_tokenizer):
    counts = {}
    for gamma in (-1.0, 0.9, 1.0):
        cache = ElasticCache({"gamma": gamma})
        llada_chain_arith.diffusion_generate(ids(chain_arith_tokenizer), past_key_values=cache, **FAST)
        counts[gamma] = (int(cache.drift_refreshes.sum()), int(cache.cached_steps.sum()))
    assert counts[-1.0][0] == 0 and counts[1.0][0] == counts[1.0][1] > 0  # never / at every cached step
    assert counts[-1.0][0] <= counts[0.9][0] <= counts[1.0][0]


def test_refreshing_every_step_stays_close_to_no_cache(llada_chain_arith, chain_arith_tokenizer):
    settings = {**FAST, "max_new_tokens": 128, "steps": 128, "eos_early_stop": True}
    batch = chain_arith_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    plain = llada_chain_arith.diffusion_generate(**batch, **settings)
    elastic = llada_chain_arith.diffusion_generate(**batch, cache_implementation="elastic", cache_config={"gamma": 1.0},
                                                   **settings)
    text = chain_arith_tokenizer.batch_decode
    assert text(elastic, skip_special_tokens=True) == text(plain, skip_special_tokens=True)


@pytest.mark.parametrize("fixture", ["llada_chain_arith", "dream_chain_arith"])
@pytest.mark.parametrize("cache_config", [{}, {"window_size": 8, "track_num": 2}])
def test_batch_rows_equal_their_solo_runs(request, chain_arith_tokenizer, fixture, cache_config):
    model = request.getfixturevalue(fixture)
    settings = {**FAST, "cache_implementation": "elastic", "cache_config": cache_config}
    batch = chain_arith_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    together = model.diffusion_generate(**batch, **settings)
    for row, prompt in enumerate(PROMPTS):
        alone = model.diffusion_generate(ids(chain_arith_tokenizer, prompt), **settings)
        assert torch.equal(together[row, -alone.shape[1]:], alone[0])


def test_a_sliding_window_commits_only_near_the_first_mask(llada_chain_arith, chain_arith_tokenizer, ):
    prompt_ids = ids(chain_arith_tokenizer)
    out = llada_chain_arith.diffusion_generate(
        prompt_ids, max_new_tokens=64, steps=64, block_length=None, threshold=0.7, alg="low_confidence", eos_early_stop=False,
        cache_implementation="elastic", cache_config={"window_size": 8}, return_dict_in_generate=True,
        output_history=True)
    mask = llada_chain_arith.config.mask_token_id
    before = torch.full((64,), mask)
    for canvas in out.history:
        after = canvas[0, prompt_ids.shape[1]:]
        first = int((before == mask).nonzero()[0])
        changed = (before != after).nonzero().flatten()
        assert len(changed) >= 1 and int(changed.min()) >= first and int(changed.max()) < first + 8
        before = after
    assert not bool((before == mask).any())


def test_classifier_free_guidance_runs(llada_chain_arith, chain_arith_tokenizer):
    out = llada_chain_arith.diffusion_generate(ids(chain_arith_tokenizer), cache_implementation="elastic",
                                               cfg_scale=0.5, **FAST)
    assert not bool((out == llada_chain_arith.config.mask_token_id).any())


def test_bad_settings_say_what_to_change():
    with pytest.raises(ValueError, match="gamma of the 'elastic' cache must be a cosine similarity"):
        DiffusionGenerationConfig(cache_implementation="elastic", cache_config={"gamma": 2})
    with pytest.raises(ValueError, match="track_num of the 'elastic' cache must be a positive integer"):
        DiffusionGenerationConfig(cache_implementation="elastic", cache_config={"track_num": 0})
    with pytest.raises(ValueError, match="window_size of the 'elastic' cache must be a positive integer"):
        DiffusionGenerationConfig(cache_implementation="elastic", cache_config={"window_size": 0})
    with pytest.raises(ValueError, match="not a setting of the 'elastic' cache"):
        DiffusionGenerationConfig(cache_implementation="elastic", cache_config={"beta": 16})
