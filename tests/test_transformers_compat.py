"""Every supported transformers 5.x release (5.23 up to the newest): no deprecation message about the cache's name.

transformers 5.24 renamed the cache of model outputs and forward arguments from `past_key_values` to `cache`; the
old name keeps working there but logs "`past_key_values`/`cache_params` are deprecated. Use `cache` instead." (once
per process, through its logger) or raises a FutureWarning (a forward argument). These tests run generation for
both families, with a cache and with AR guidance, and fail if transformers says anything about the old name. They
pass on 5.23 too, where `past_key_values` is the only name.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_outputs import CausalLMOutputWithPast

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation.diffusion_cache import DiffusionCache
from dlm_generation.diffusion_guidance import guide_cache_argument
from dlm_generation.modeling_diffusion_utils import CACHE_FIELD

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
OLD_NAMES = ("past_key_values", "cache_params")


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def cache_name_complaints():
    """Collects what transformers says about the old cache names: its log lines and Python warnings.

    `logger.warning_once` remembers what it already printed in this process, so its memory is cleared first (an
    earlier test's warning would otherwise hide this one's)."""
    logging.Logger.warning_once.cache_clear()
    logger = logging.getLogger("transformers")
    recorder, level = _Recorder(), logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.WARNING)
    complaints: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield complaints
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)
    complaints.extend(recorder.messages)
    complaints.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    complaints[:] = [message for message in complaints if any(name in message for name in OLD_NAMES)]


@pytest.fixture(scope="module")
def chain_tokenizer():
    return AutoTokenizer.from_pretrained(CARDS / "tiny-llada-chain-arith", padding_side="left")


def chat(tokenizer, questions):
    chats = [[{"role": "user", "content": q}] for q in questions]
    return tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                         return_dict=True)


QUESTIONS = ["Start with 63. Subtract 39. Add 46. What is the result?",
             "Start with 8. Add 75. Subtract 19. What is the result?"]


def test_the_cache_field_is_the_installed_transformers_name():
    fields = CausalLMOutputWithPast.__dataclass_fields__
    assert CACHE_FIELD in fields
    # From 5.24 on the class has `cache` (and `past_key_values` is only a deprecated alias): choose it then.
    assert CACHE_FIELD == ("cache" if "cache" in fields else "past_key_values")


def test_the_recorder_hears_transformers_when_the_old_name_is_used():
    """The check below can fail: on a release with the new name, the old one is reported."""
    if CACHE_FIELD != "cache":
        pytest.skip("this transformers release has no other name for the cache")
    with cache_name_complaints() as complaints:
        CausalLMOutputWithPast(logits=torch.zeros(1), past_key_values=DiffusionCache())
    assert complaints, "transformers no longer logs the old name's deprecation; update cache_name_complaints"


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_forward_output_carries_the_cache_under_the_installed_name(family):
    model = AutoModelForCausalLM.from_pretrained(CARDS / f"tiny-random-{family}")
    cache = DiffusionCache()
    ids = torch.tensor([[5, 6, 7, model.config.mask_token_id]])
    with cache_name_complaints() as complaints:
        out = model(ids, past_key_values=cache)
        assert getattr(out, CACHE_FIELD) is cache
        assert out[CACHE_FIELD] is cache
        assert model(ids).get(CACHE_FIELD) is None  # no cache passed, none returned
    assert complaints == []


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_forward_takes_the_cache_as_cache_too(family):
    model = AutoModelForCausalLM.from_pretrained(CARDS / f"tiny-random-{family}")
    ids = torch.tensor([[5, 6, 7, model.config.mask_token_id, model.config.mask_token_id]])
    seen = []

    class Watching(DiffusionCache):
        def update(self, key, value, layer_idx):
            seen.append(layer_idx)
            return super().update(key, value, layer_idx)

    watching = Watching()
    by_new_name = model(ids, cache=watching)
    assert seen, "the cache passed as cache= was not used"
    assert getattr(by_new_name, CACHE_FIELD) is watching
    torch.testing.assert_close(by_new_name.logits, model(ids, past_key_values=DiffusionCache()).logits)
    with pytest.raises(ValueError, match=r"got both past_key_values= and cache=; .* pass only one of them"):
        model(ids, past_key_values=DiffusionCache(), cache=DiffusionCache())


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_generation_with_a_dual_cache_says_nothing_about_the_old_name(family, chain_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(CARDS / f"tiny-{family}-chain-arith")
    tokenizer = AutoTokenizer.from_pretrained(CARDS / f"tiny-{family}-chain-arith", padding_side="left")
    inputs = chat(tokenizer, QUESTIONS)
    with cache_name_complaints() as complaints:
        out = model.diffusion_generate(**inputs, max_new_tokens=32, block_length=8, cache_implementation="dual",
                                       threshold=0.9, return_dict_in_generate=True)
    assert out.sequences.shape == (2, inputs.input_ids.shape[1] + 32)
    assert complaints == []


def test_ar_guided_generation_says_nothing_about_the_old_name(chain_tokenizer):
    dllm = AutoModelForCausalLM.from_pretrained(CARDS / "tiny-llada-chain-arith")
    guide = AutoModelForCausalLM.from_pretrained(CARDS / "tiny-ar-chain-arith")
    inputs = chat(chain_tokenizer, QUESTIONS)
    with cache_name_complaints() as complaints:
        out = dllm.diffusion_generate(**inputs, max_new_tokens=32, assistant_model=guide,
                                      guidance={"strategy": "speculative", "verify_chunk": 8},
                                      return_dict_in_generate=True)
    assert out.assistant_forwards > 0  # the guide did run
    assert complaints == []


def test_guide_cache_argument_follows_the_guides_forward():
    class NewName(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            pass

    class OldName(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            pass

    class Wrapper(torch.nn.Module):  # a PEFT-style forward that passes everything on
        def forward(self, *args, **kwargs):
            pass

    def decorated(cls):  # as transformers' forward decorators do: a **kwargs wrapper made with functools.wraps
        def wrap(forward):
            @functools.wraps(forward)
            def wrapper(self, *args, **kwargs):
                return forward(self, *args, **kwargs)
            return wrapper
        return type(f"Decorated{cls.__name__}", (cls,), {"forward": wrap(cls.forward)})

    assert guide_cache_argument(NewName()) == "cache"
    assert guide_cache_argument(OldName()) == "past_key_values"
    assert guide_cache_argument(decorated(NewName)()) == "cache"
    assert guide_cache_argument(decorated(OldName)()) == "past_key_values"
    assert guide_cache_argument(Wrapper()) == CACHE_FIELD
    guide = AutoModelForCausalLM.from_pretrained(CARDS / "tiny-ar-chain-arith")
    assert guide_cache_argument(guide) == CACHE_FIELD  # transformers' own models use the installed name
