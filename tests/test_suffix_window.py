"""DPad's `suffix_window`: only the first `suffix_window` positions after the block enter a forward."""

from __future__ import annotations

import pytest
import torch

from dlm_generation import DiffusionGenerationConfig

PROMPTS = ["Question: Start with 63. Subtract 39. Add 46. What is the result?\nAnswer:",
           "Question: Start with 8. Add 75. What is the result?\nAnswer:"]


def forward_lengths(model, call) -> list[int]:
    """The query lengths of every model forward `call()` makes."""
    lengths = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return lengths


@pytest.mark.parametrize("cache", [None, "dual", "prefix"])
def test_the_forwards_end_suffix_window_after_the_block(llada_chain_arith, chain_arith_tokenizer, cache):
    ids = chain_arith_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    settings = dict(max_new_tokens=128, steps=128, block_length=32, threshold=0.9, alg="low_confidence",
                    cache_implementation=cache, eos_early_stop=False)
    lengths = forward_lengths(llada_chain_arith, lambda: llada_chain_arith.diffusion_generate(
        ids, suffix_window=16, **settings))
    plain = forward_lengths(llada_chain_arith, lambda: llada_chain_arith.diffusion_generate(ids, **settings))
    prompt = ids.shape[1]
    # A block's widest forward (no cache: every one; a cache: the block's first) ends 16 after the block: the first
    # block's at prompt + 48, the last block's at the canvas end.
    assert max(lengths) == prompt + 128 and min(lengths) <= prompt + 48 and max(plain) == prompt + 128
    assert sum(lengths) < sum(plain)
    if cache is None:
        assert set(lengths) == {prompt + 48, prompt + 80, prompt + 112, prompt + 128}


@pytest.mark.parametrize("fixture", ["llada_chain_arith", "dream_chain_arith"])
@pytest.mark.parametrize("cache", [None, "dual"])
def test_a_block_sees_what_a_canvas_ending_there_sees(request, chain_arith_tokenizer, fixture, cache):
    """The first block of a 128-token canvas with suffix_window=32 decodes exactly as the first block of a 64-token
    canvas: its forwards contain the same positions."""
    model = request.getfixturevalue(fixture)
    ids = chain_arith_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    settings = dict(block_length=32, threshold=None, cache_implementation=cache, eos_early_stop=False)
    windowed = model.diffusion_generate(ids, max_new_tokens=128, steps=128, suffix_window=32, **settings)
    short = model.diffusion_generate(ids, max_new_tokens=64, steps=64, **settings)
    prompt = ids.shape[1]
    assert torch.equal(windowed[:, :prompt + 32], short[:, :prompt + 32])


def test_a_window_past_the_canvas_changes_nothing(llada_chain_arith, chain_arith_tokenizer):
    ids = chain_arith_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    settings = dict(max_new_tokens=64, steps=64, block_length=32, threshold=0.9, alg="low_confidence",
                    cache_implementation="dual")
    assert torch.equal(llada_chain_arith.diffusion_generate(ids, suffix_window=64, **settings),
                       llada_chain_arith.diffusion_generate(ids, **settings))


@pytest.mark.parametrize("cache", [None, "dual", "elastic"])
def test_batch_rows_equal_their_solo_runs(llada_chain_arith, chain_arith_tokenizer, cache):
    settings = dict(max_new_tokens=96, steps=96, block_length=32, threshold=0.9, alg="low_confidence", suffix_window=8,
                    cache_implementation=cache, eos_early_stop=True)
    batch = chain_arith_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    together = llada_chain_arith.diffusion_generate(**batch, **settings)
    for row, prompt in enumerate(PROMPTS):
        alone = llada_chain_arith.diffusion_generate(chain_arith_tokenizer(prompt, return_tensors="pt").input_ids,
                                                     **settings)
        assert torch.equal(together[row, -alone.shape[1]:], alone[0])


def test_refusals_say_what_to_change(llada_chain_arith, chain_arith_tokenizer):
    with pytest.raises(ValueError, match="suffix_window must be a non-negative integer"):
        DiffusionGenerationConfig(suffix_window=-1)
    with pytest.raises(ValueError, match="suffix_window must be a non-negative integer"):
        DiffusionGenerationConfig(suffix_window=2.5)
    ids = chain_arith_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    for cache in ("d2cache", "dllm"):
        with pytest.raises(ValueError, match=f"the '{cache}' cache chooses positions over the whole canvas"):
            llada_chain_arith.diffusion_generate(ids, max_new_tokens=64, block_length=32, suffix_window=8,
                                                 cache_implementation=cache)


def test_a_call_s_cache_or_policy_drops_what_it_would_only_inherit(llada_chain_arith):
    """The shipped LLaDA holds suffix_window and position_decay: a call's d2Cache drops the inherited window (and
    an explicit window with it raises), a call's own policy drops the inherited decay."""
    shipped = llada_chain_arith.generation_config
    assert shipped.suffix_window == 32 and shipped.position_decay == 0.05
    resolve = llada_chain_arith._prepare_generation_config
    assert resolve(None, {}).suffix_window == 32
    assert resolve(None, {"cache_implementation": "d2cache"}).suffix_window is None
    assert resolve(None, {"cache_implementation": "elastic"}).suffix_window == 32
    assert resolve(None, {"cache_implementation": "d2cache", "suffix_window": 8}).suffix_window == 8  # raises later
    assert resolve(None, {"threshold": 0.9}).position_decay is None
    assert resolve(None, {"threshold": 0.9, "position_decay": 0.2}).position_decay == 0.2
    assert resolve(None, {"suffix_window": None}).suffix_window is None  # None: back to the default (no window)
