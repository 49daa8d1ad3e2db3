"""Memory and state: long runs of calls keep resident memory flat, nothing carries from one call into the next, an
exception or Ctrl-C in the middle of a call leaves the model usable, and threads sharing one model get exactly the
results of sequential calls."""

from __future__ import annotations

import gc
import random
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor

import dlm_generation

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
CACHES = [None, "prefix", "dual", "freecache", "dllm", "d2cache"]
# The memory test's prefix and freecache runs share the dual cache's store (CanvasKVCache): nightly only (CI time).
MEMORY_CACHES = [None, pytest.param("prefix", marks=pytest.mark.nightly), "dual",
                 pytest.param("freecache", marks=pytest.mark.nightly), "dllm", "d2cache"]
CALLS = 500
RSS_BOUND_MB = 16.0


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request):
    return request.getfixturevalue(f"random_{request.param}")  # shared (conftest): tests here must not modify it


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def varied_call(model, rng: random.Random, cache):
    batch, prompt_len = rng.randint(1, 3), rng.randint(1, 6)
    block = rng.choice([2, 4])
    ids = torch.randint(0, 400, (batch, prompt_len), generator=torch.Generator().manual_seed(rng.randint(0, 99)))
    mask = torch.ones_like(ids)
    mask[0, : rng.randint(0, prompt_len - 1)] = 0  # left padding in the first row
    return model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=block * rng.randint(1, 2),
                                    block_length=block, cache_implementation=cache,
                                    threshold=rng.choice([None, 0.5]), alg="low_confidence",
                                    eos_early_stop=rng.choice([True, False]), return_dict_in_generate=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="resident memory is read from /proc (Linux)")
@pytest.mark.parametrize("family", ["llada", pytest.param("dream", marks=pytest.mark.nightly)])
@pytest.mark.parametrize("cache", MEMORY_CACHES, ids=lambda c: str(c))
def test_hundreds_of_calls_keep_resident_memory_flat(family, cache):
    model = AutoModelForCausalLM.from_pretrained(CARDS / f"tiny-random-{family}").eval()
    rng = random.Random(0)
    for _ in range(50):  # allocator and autograd-free kernels warm up
        varied_call(model, rng, cache)
    gc.collect()
    before = rss_mb()
    for _ in range(CALLS):
        varied_call(model, rng, cache)
    gc.collect()
    growth = rss_mb() - before
    print(f"\n{type(model).__name__} cache={cache}: RSS {before:.1f} MB -> +{growth:.2f} MB over {CALLS} calls")
    assert growth < RSS_BOUND_MB, f"resident memory grew {growth:.1f} MB over {CALLS} calls"


PROMPTS = torch.tensor([[5, 6, 7, 8], [501, 9, 10, 11]])
MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])


def reference(model, cache, **kwargs):
    return model.diffusion_generate(PROMPTS, attention_mask=MASK, max_new_tokens=8, block_length=4,
                                    cache_implementation=cache, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("cache", CACHES, ids=lambda c: str(c))
def test_no_state_carries_into_the_next_call(model, cache):
    first = reference(model, cache)
    other = torch.tensor([[42, 43]])
    model.diffusion_generate(other, max_new_tokens=16, block_length=8, cache_implementation=cache, threshold=0.3,
                             alg="maskgit_plus")
    again = reference(model, cache)
    assert torch.equal(first.sequences, again.sequences) and first.nfe == again.nfe


@pytest.mark.parametrize("cache", CACHES[1:])
def test_a_cache_instance_can_be_passed_again(model, cache):
    instance = dlm_generation.DIFFUSION_CACHE_CLASSES[cache]()
    expected = reference(model, cache)
    for _ in range(2):
        out = model.diffusion_generate(PROMPTS, attention_mask=MASK, max_new_tokens=8, block_length=4,
                                       past_key_values=instance, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected.sequences)


class Interrupt(LogitsProcessor):
    """Raises `error` at the `at`-th forward."""

    def __init__(self, error: BaseException, at: int = 3):
        self.error, self.at, self.calls = error, at, 0

    def __call__(self, canvas, logits):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return logits


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
@pytest.mark.parametrize("cache", CACHES, ids=lambda c: str(c))
def test_an_interrupted_call_leaves_the_model_usable(model, cache, error):
    expected = reference(model, cache)
    instance = None if cache is None else dlm_generation.DIFFUSION_CACHE_CLASSES[cache]()
    with pytest.raises(type(error)):
        model.diffusion_generate(PROMPTS, attention_mask=MASK, max_new_tokens=8, block_length=4,
                                 past_key_values=instance, logits_processor=[Interrupt(error)])
    assert torch.equal(reference(model, cache).sequences, expected.sequences)
    if instance is not None:  # the interrupted cache instance is usable again too
        again = model.diffusion_generate(PROMPTS, attention_mask=MASK, max_new_tokens=8, block_length=4,
                                         past_key_values=instance, return_dict_in_generate=True)
        assert torch.equal(again.sequences, expected.sequences)


JOBS = [(c, dict(threshold=t, alg="low_confidence")) for c in CACHES for t in (None, 0.5)]


@pytest.mark.slow
def test_threads_sharing_one_model_get_the_sequential_results(model):
    expected = [reference(model, cache, **job).sequences for cache, job in JOBS]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors = []

    def worker(thread: int):
        try:
            order = list(range(len(JOBS)))
            random.Random(thread).shuffle(order)
            for index in order * 2:
                cache, job = JOBS[index]
                results[thread, index] = reference(model, cache, **job).sequences
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish within 300 s"
    assert not errors, errors
    assert len(results) == 4 * len(JOBS)
    for (thread, index), sequences in results.items():
        assert torch.equal(sequences, expected[index]), (thread, JOBS[index])
