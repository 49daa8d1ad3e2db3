"""Tests of `DiffusionGenerationConfig` (validation, aliases, unknown kwargs, round trips) and of the config /
input handling of `DiffusionGenerationMixin` (precedence rule, prompt and length checks, cache and assistant checks).

The models are the tiny golden checkpoints under `tests/fixtures/golden/` (CPU, a few ms per forward).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers.generation import WatermarkingConfig

import dlm_generation  # noqa: F401  (registers the LLaDA / Dream model types)
from dlm_generation import DIFFUSION_CACHE_CLASSES, DiffusionCache, DiffusionGenerationConfig
from dlm_generation.configuration_diffusion import (
    ALGS,
    ALIASES,
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_MAX_NEW_TOKENS,
    DIFFUSION_DEFAULTS,
    LIBRARY_DEFAULTS,
    REMASKING_VALUES,
    SCHEDULES,
    UNSUPPORTED_AR_FIELDS,
    check_known_kwargs,
    translate_aliases,
)
from dlm_generation.diffusion_caches import KNOWN_CACHE_IMPLEMENTATIONS
from dlm_generation.generation_utils import MODEL_INPUT_NAMES

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
LLADA_DIR = GOLDEN / "tiny-llada"
DREAM_DIR = GOLDEN / "tiny-dream"
VOCAB = 512  # both tiny models
MASK_ID = 500  # both tiny models' config.json
PROMPT = [[1, 2, 3]]

FAMILY_DEFAULTS = {
    "llada": {"schedule": "linear", "alg": "low_confidence"},
    "dream": {"schedule": "eps", "alg": "entropy"},
}


# ---------------------------------------------------------------------------------------------------------- fixtures
# (conftest.py runs the tests on one torch thread: the tiny models are ~100x faster so on a busy CPU)
@pytest.fixture(scope="module")
def llada(golden_llada):
    return golden_llada  # shared (conftest): tests change its generation_config only through monkeypatch


@pytest.fixture(scope="module")
def dream(golden_dream):
    return golden_dream


@pytest.fixture(params=["llada", "dream"])
def family(request):
    """(family name, model) for both tiny models."""
    return request.param, request.getfixturevalue(request.param)


def prompt():
    return torch.tensor(PROMPT)


def raises(message_regex):
    return pytest.raises(ValueError, match=message_regex)


def rx(text):
    """Regex matching `text` literally."""
    return re.escape(text)


# ====================================================================================================================
# 1. Validation: DiffusionGenerationConfig.validate()
# ====================================================================================================================
POSITIVE_INT_FIELDS = ("steps", "block_length", "max_new_tokens", "max_length", "top_k", "num_return_sequences")
NON_NEGATIVE_FIELDS = ("temperature", "alg_temp", "cfg_scale")
BOOLEAN_FIELDS = ("logits_eos_inf", "confidence_eos_eot_inf", "eos_early_stop", "output_history", "output_confidences",
                  "output_commit_steps",
                  "do_sample", "return_dict_in_generate")
TOKEN_ID_FIELDS = ("mask_token_id", "eot_token_id", "pad_token_id", "bos_token_id", "eos_token_id")


def assert_rejected(kwargs, message_regex):
    """The config is rejected both at construction and by `validate()` after the fields are set on a valid one."""
    with raises(message_regex):
        DiffusionGenerationConfig(**kwargs)
    config = DiffusionGenerationConfig()
    for name, value in kwargs.items():
        setattr(config, name, value)
    with raises(message_regex):
        config.validate()


@pytest.mark.parametrize("name", POSITIVE_INT_FIELDS)
@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4"])
def test_positive_int_fields(name, value):
    if name == "block_length":  # its message also says what a valid block_length is
        assert_rejected({name: value}, rx("block_length must be a positive integer that divides max_new_tokens (e.g. "
                                          f"32), or None for a single block over the whole canvas; got {value!r}."))
    else:
        assert_rejected({name: value}, rx(f"{name} must be a positive integer, got {value!r}."))


@pytest.mark.parametrize("name", NON_NEGATIVE_FIELDS)
@pytest.mark.parametrize("value", [-0.5, -1, True, "1.0", float("nan"), float("inf")])
def test_non_negative_fields(name, value):
    assert_rejected({name: value}, rx(f"{name} must be a finite number >= 0, got {value!r}."))


@pytest.mark.parametrize("name", BOOLEAN_FIELDS)
@pytest.mark.parametrize("value", [1, 0, "yes"])
def test_boolean_fields(name, value):
    assert_rejected({name: value}, rx(f"{name} must be True or False, got {value!r}."))


@pytest.mark.parametrize("name", TOKEN_ID_FIELDS)
@pytest.mark.parametrize("value", [-1, 1.5, True, "5", [1, -2], [1, "2"]])
def test_token_id_fields(name, value):
    assert_rejected({name: value}, rx(f"{name} must be a non-negative token id (or a list of them), got {value!r}."))


# Every single-field and cross-field branch after the typed helpers: (kwargs, regex of the specific message).
VALIDATE_BRANCHES = [
    pytest.param({"alg": "greedy"}, rx(f"alg='greedy' is unknown; choose one of {ALGS}."), id="alg-unknown"),
    pytest.param({"schedule": "cosine"}, rx(f"schedule='cosine' is unknown; choose one of {SCHEDULES}."),
                 id="schedule-unknown"),
    pytest.param({"top_p": 0}, r"top_p must be in \(0, 1\], got 0; use None to disable", id="top_p-zero"),
    pytest.param({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1\.5", id="top_p-above-one"),
    pytest.param({"top_p": "0.9"}, r"top_p must be in \(0, 1\], got '0\.9'", id="top_p-string"),
    pytest.param({"top_p": True}, r"top_p must be in \(0, 1\], got True", id="top_p-bool"),
    pytest.param({"eps": 0}, r"eps must be in \(0, 1\), got 0 \(Dream uses 1e-3\)", id="eps-zero"),
    pytest.param({"eps": 1}, r"eps must be in \(0, 1\), got 1 ", id="eps-one"),
    pytest.param({"eps": "1e-3"}, r"eps must be in \(0, 1\), got '1e-3'", id="eps-string"),
    pytest.param({"threshold": 0}, r"threshold must be in \(0, 1\], got 0 \(Fast-dLLM uses 0\.9\)",
                 id="threshold-zero"),
    pytest.param({"threshold": 1.1}, r"threshold must be in \(0, 1\], got 1\.1", id="threshold-above-one"),
    pytest.param({"threshold": True}, r"threshold must be in \(0, 1\], got True", id="threshold-bool"),
    pytest.param({"factor": 0}, r"factor must be a number > 0, got 0 \(Fast-dLLM uses 1\.0\)", id="factor-zero"),
    pytest.param({"factor": -1.0}, r"factor must be a number > 0, got -1\.0", id="factor-negative"),
    pytest.param({"factor": "1"}, r"factor must be a number > 0, got '1'", id="factor-string"),
    pytest.param({"threshold": 0.9, "factor": 1.0},
                 r"threshold and factor are two alternative parallel-decoding policies; set only one of them",
                 id="threshold-and-factor"),
    pytest.param({"alg": "origin", "threshold": 0.9},
                 r"alg='origin' reveals random positions and has no confidence to threshold", id="origin-threshold"),
    pytest.param({"alg": "origin", "factor": 1.0},
                 r"alg='origin' reveals random positions and has no confidence to threshold", id="origin-factor"),
    pytest.param({"alg": "entropy", "threshold": 0.9},
                 r"threshold/factor compare confidences with probabilities, but alg='entropy' scores by negative "
                 r"entropy \(<= 0\); use alg='maskgit_plus'", id="entropy-threshold"),
    pytest.param({"alg": "entropy", "factor": 1.0},
                 r"threshold/factor compare confidences with probabilities, but alg='entropy'", id="entropy-factor"),
    pytest.param({"alg": "confidence_threshold", "factor": 1.0},
                 r"alg='confidence_threshold' is a threshold policy; it cannot be combined with factor",
                 id="confidence_threshold-factor"),
    pytest.param({"max_new_tokens": 10, "block_length": 4},
                 r"max_new_tokens \(10\) must be a multiple of block_length \(4\); change one of them, or set "
                 r"block_length=None", id="block_length-not-divisor"),
    pytest.param({"max_new_tokens": 8, "block_length": 16},
                 r"max_new_tokens \(8\) must be a multiple of block_length \(16\)", id="block_length-too-long"),
    pytest.param({"cache_implementation": "static"},
                 rx(f"cache_implementation='static' is not a diffusion cache; choose one of "
                    f"{KNOWN_CACHE_IMPLEMENTATIONS} or None."), id="cache_implementation-ar"),
    pytest.param({"cache_config": [("x", 1)]}, r"cache_config must be a dict of the cache's hyper-parameters, got "
                 r"\[\('x', 1\)\]", id="cache_config-not-dict"),
    pytest.param({"cache_implementation": "dual", "cache_config": {"x": 1}},
                 r"cache_config key 'x' is not a setting of the 'dual' cache \(its keys: none\)", id="cache_config-dual-key"),
    pytest.param({"cache_implementation": "freecache", "cache_config": {"window_left": -1}},
                 r"cache_config window_left of the 'freecache' cache must be a non-negative integer, got -1",
                 id="freecache-negative"),
    pytest.param({"cache_implementation": "freecache", "cache_config": {"window_right": 2.5}},
                 r"cache_config window_right of the 'freecache' cache must be a positive integer \(or None: every "
                 r"remaining position\), got 2.5", id="freecache-float"),
    pytest.param({"cache_implementation": "freecache", "cache_config": {"window_right": 0}},
                 r"window_right of the 'freecache' cache must be a positive integer", id="freecache-right-zero"),
    pytest.param({"cache_implementation": "dllm", "cache_config": {"kr": 0}},
                 r"cache_config kr of the 'dllm' cache must be a positive integer \(a refresh interval in forwards\), "
                 r"got 0", id="dllm-kr-zero"),
    pytest.param({"cache_implementation": "dllm", "cache_config": {"rho": 2}},
                 r"cache_config rou of the 'dllm' cache must be a share between 0 and 1", id="dllm-rho-above-one"),
    pytest.param({"cache_implementation": "freecache", "cache_config": {"window": 8}},
                 r"cache_config key 'window' is not a setting of the 'freecache' cache \(its keys: \['window_left', "
                 r"'window_right'\]\)", id="cache_config-freecache-key"),
]


@pytest.mark.parametrize("kwargs, message", VALIDATE_BRANCHES)
def test_validate_branches(kwargs, message):
    assert_rejected(kwargs, message)


# One rejected value per autoregressive-only field; the table must cover UNSUPPORTED_AR_FIELDS exactly.
UNSUPPORTED_BAD_VALUES = {
    "num_beams": 4,
    "num_beam_groups": 2,
    "penalty_alpha": 0.6,
    "repetition_penalty": 1.2,
    "no_repeat_ngram_size": 3,
    "min_new_tokens": 5,
    "min_length": 5,
    "prompt_lookup_num_tokens": 10,
    "watermarking_config": WatermarkingConfig(),
    "min_p": 0.05,
    "typical_p": 0.9,
    "guidance_scale": 1.5,
    "bad_words_ids": [[5]],
    "suppress_tokens": [5],
}


def test_unsupported_table_is_fully_covered():
    assert set(UNSUPPORTED_BAD_VALUES) == set(UNSUPPORTED_AR_FIELDS)


@pytest.mark.parametrize("name, entry", list(UNSUPPORTED_AR_FIELDS.items()), ids=list(UNSUPPORTED_AR_FIELDS))
def test_unsupported_ar_fields_rejected(name, entry):
    off, why = entry
    value = UNSUPPORTED_BAD_VALUES[name]
    with raises(rf"{name}=.* is not supported by diffusion decoding \({re.escape(why)}\); leave it unset\."):
        DiffusionGenerationConfig(**{name: value})


@pytest.mark.parametrize("name, entry", list(UNSUPPORTED_AR_FIELDS.items()), ids=list(UNSUPPORTED_AR_FIELDS))
def test_unsupported_ar_fields_accept_their_off_value(name, entry):
    off, _ = entry
    config = DiffusionGenerationConfig(**{name: off})
    config.validate()


@pytest.mark.parametrize("kwargs", [
    pytest.param({"alg": alg}, id=f"alg-{alg}") for alg in ALGS
] + [
    pytest.param({"schedule": schedule}, id=f"schedule-{schedule}") for schedule in SCHEDULES
] + [
    pytest.param({"cache_implementation": name,
                  "cache_config": dict(DIFFUSION_CACHE_CLASSES[name].cache_config_defaults)}, id=f"cache-{name}")
    for name in KNOWN_CACHE_IMPLEMENTATIONS
] + [
    pytest.param({"cache_implementation": "dllm", "cache_config": {"rho": 0.5, "kp": 10}}, id="cache-dllm-alias"),
    pytest.param({"cache_implementation": "dual", "cache_config": {}}, id="cache-dual-empty"),
] + [
    pytest.param({"block_length": 3}, id="block_length-alone"),  # cross-field checks need both fields set
    pytest.param({"max_new_tokens": 32, "block_length": 8, "steps": 4}, id="blocks-ok"),
    pytest.param({"top_p": 1.0, "top_k": 1, "temperature": 0, "alg_temp": 0.0, "cfg_scale": 0}, id="boundaries"),
    pytest.param({"eos_token_id": [501, 502], "pad_token_id": 0, "mask_token_id": 1}, id="token-lists-and-zero"),
    pytest.param({"threshold": 1.0}, id="threshold-one"),
    pytest.param({"alg": "confidence_threshold", "threshold": 0.8}, id="confidence_threshold-threshold"),
    pytest.param({"do_sample": False, "return_dict_in_generate": True, "output_history": True}, id="booleans"),
])
def test_valid_configs_pass(kwargs):
    config = DiffusionGenerationConfig(**kwargs)
    config.validate()
    config.validate(strict=True)
    for name, value in kwargs.items():
        assert getattr(config, name) == value


def test_all_errors_of_one_config_are_reported_together():
    bad = {"steps": 0, "alg": "nope", "top_p": 2.0, "threshold": 0.5, "factor": 1.0, "num_beams": 3,
           "do_sample": "yes", "max_new_tokens": 10, "block_length": 4}
    expected = [
        "steps must be a positive integer, got 0.",
        "do_sample must be True or False, got 'yes'.",
        "alg='nope' is unknown",
        "top_p must be in (0, 1], got 2.0",
        "threshold and factor are two alternative parallel-decoding policies",
        "max_new_tokens (10) must be a multiple of block_length (4)",
        "num_beams=3 is not supported by diffusion decoding",
    ]
    with pytest.raises(ValueError) as info:
        DiffusionGenerationConfig(**bad)
    message = str(info.value)
    assert message.startswith("Invalid diffusion generation config:\n  - ")
    for part in expected:
        assert part in message
    assert message.count("\n  - ") == len(expected)

    # The same list from validate() on a config that was valid when built.
    config = DiffusionGenerationConfig()
    for name, value in bad.items():
        setattr(config, name, value)
    with pytest.raises(ValueError) as info2:
        config.validate()
    assert str(info2.value) == message


def test_invalid_config_cannot_be_saved(tmp_path):
    config = DiffusionGenerationConfig(steps=4)
    config.steps = -1
    with raises(r"steps must be a positive integer, got -1\.[\s\S]*Fix these issues to save the configuration"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "generation_config.json").exists()


# ====================================================================================================================
# 1b. check_resolved()
# ====================================================================================================================
def test_check_resolved_steps_not_multiple_of_blocks():
    config = DiffusionGenerationConfig(max_new_tokens=8, block_length=4, steps=3, mask_token_id=MASK_ID)
    with raises(r"steps \(3\) must be a multiple of the number of blocks \(2 = max_new_tokens 8 / block_length 4\); "
                r"every block gets steps / num_blocks steps"):
        config.check_resolved()


def test_check_resolved_no_mask_token_id():
    config = DiffusionGenerationConfig(max_new_tokens=8, steps=8)
    with raises(r"No mask token id: the model config has no mask_token_id and none was passed; pass mask_token_id="):
        config.check_resolved()


@pytest.mark.parametrize("block_length, steps", [(None, 8), (None, 3), (4, 2), (4, 6), (2, 4), (8, 1)])
def test_check_resolved_accepts(block_length, steps):
    DiffusionGenerationConfig(max_new_tokens=8, block_length=block_length, steps=steps,
                              mask_token_id=MASK_ID).check_resolved()


def test_steps_not_multiple_of_blocks_through_generate(llada):
    with raises(r"steps \(3\) must be a multiple of the number of blocks \(2 = max_new_tokens 8 / block_length 4\)"):
        llada.diffusion_generate(prompt(), max_new_tokens=8, block_length=4, steps=3)


def test_no_mask_token_id_through_generate(llada, monkeypatch):
    monkeypatch.setattr(llada.config, "mask_token_id", None)
    monkeypatch.setattr(llada, "generation_config", DiffusionGenerationConfig())
    with raises(r"No mask token id"):
        llada.diffusion_generate(prompt(), max_new_tokens=4)


# ====================================================================================================================
# 1c. translate_aliases() and check_known_kwargs()
# ====================================================================================================================
ALIAS_CONFLICTS = [
    pytest.param({"gen_length": 8, "max_new_tokens": 16}, "gen_length=8", "max_new_tokens=16", id="gen_length"),
    pytest.param({"mask_id": 1, "mask_token_id": 2}, "mask_id=1", "mask_token_id=2", id="mask_id"),
    pytest.param({"remasking": "random", "alg": "entropy"}, "remasking='random'", "alg='entropy'", id="remasking"),
]


@pytest.mark.parametrize("kwargs, alias_part, name_part", ALIAS_CONFLICTS)
def test_conflicting_alias(kwargs, alias_part, name_part):
    alias, name = alias_part.split("=")[0], name_part.split("=")[0]
    message = (rf"{re.escape(alias_part)} and {re.escape(name_part)} were both given and disagree; {alias} is an "
               rf"alias of {name}, pass only one of them\.")
    with raises(message):
        translate_aliases(kwargs)
    with raises(message):
        DiffusionGenerationConfig(**kwargs)
    with raises(message):
        DiffusionGenerationConfig().update(**kwargs)


def test_conflicting_alias_through_generate(llada):
    with raises(r"gen_length=8 and max_new_tokens=16 were both given and disagree"):
        llada.diffusion_generate(prompt(), gen_length=8, max_new_tokens=16)


@pytest.mark.parametrize("value", ["entropy", "maskgit_plus", "LOW_CONFIDENCE", None])
def test_bad_remasking_value(value, llada):
    message = rx(f"remasking={value!r} is not a LLaDA remasking strategy; use one of {REMASKING_VALUES}.")
    with raises(message):
        translate_aliases({"remasking": value})
    with raises(message):
        DiffusionGenerationConfig(remasking=value)
    with raises(message):
        llada.diffusion_generate(prompt(), max_new_tokens=4, remasking=value)


def test_aliases_translate_and_agreeing_duplicates_pass():
    assert translate_aliases({"gen_length": 8, "mask_id": 7, "remasking": "random", "steps": 2}) == {
        "max_new_tokens": 8, "mask_token_id": 7, "alg": "random", "steps": 2}
    assert translate_aliases({"gen_length": 8, "max_new_tokens": 8}) == {"max_new_tokens": 8}
    assert translate_aliases({"mask_id": 7, "mask_token_id": None}) == {"mask_token_id": 7}
    original = {"gen_length": 4}
    translate_aliases(original)
    assert original == {"gen_length": 4}  # the input dict is not modified
    assert set(ALIASES) == {"gen_length", "mask_id", "remasking", "small_block_size"}


@pytest.mark.parametrize("kwargs, hint", [
    ({"stepz": 4}, r"'stepz' \(did you mean 'steps'\?\)"),
    ({"max_new_token": 4}, r"'max_new_token' \(did you mean 'max_new_tokens'\?\)"),
    ({"gen_lenght": 4}, r"'gen_lenght' \(did you mean 'gen_length'\?\)"),
    ({"treshold": 0.9}, r"'treshold' \(did you mean 'threshold'\?\)"),
    ({"zzqqxx": 1}, r"'zzqqxx' for diffusion"),
    ({"_from_model_config": True}, r"'_from_model_config'"),
])
def test_unknown_kwarg(kwargs, hint):
    with raises(rf"Unknown argument\(s\) {hint}"):
        check_known_kwargs(kwargs, set(MODEL_INPUT_NAMES))


def test_unknown_kwarg_message_lists_all_unknowns_and_valid_names():
    with pytest.raises(ValueError) as info:
        check_known_kwargs({"stepz": 1, "steps": 2, "blok_length": 3}, {"input_ids", "attention_mask"})
    message = str(info.value)
    assert "'stepz' (did you mean 'steps'?)" in message
    assert "'blok_length' (did you mean 'block_length'?)" in message
    assert "'steps'," not in message.split(" for diffusion")[0]  # known names are not reported
    assert "gen_length/mask_id/remasking" in message
    assert "['attention_mask', 'input_ids']" in message


def test_known_kwargs_pass():
    check_known_kwargs({name: None for name in LIBRARY_DEFAULTS}, set())
    check_known_kwargs({"gen_length": 1, "mask_id": 2, "remasking": "random", "input_ids": 0}, {"input_ids"})


def test_unknown_kwarg_through_generate(llada):
    with raises(r"Unknown argument\(s\) 'stepz' \(did you mean 'steps'\?\) for diffusion generation"):
        llada.diffusion_generate(prompt(), max_new_tokens=4, stepz=2)
    with raises(r"Unknown argument\(s\) 'max_new_token' \(did you mean 'max_new_tokens'\?\)"):
        llada._prepare_generation_config(None, {"max_new_token": 4})


# ====================================================================================================================
# 1d. Input checks of the mixin: _prepare_prompt, _resolve_lengths, _prepare_diffusion_cache, assistant_model
# ====================================================================================================================
def test_no_prompt(family):
    _, model = family
    with raises(r"diffusion_generate needs a prompt: pass input_ids \(batch, prompt_len\)"):
        model.diffusion_generate(max_new_tokens=4)


def test_prompt_given_twice(llada):
    with raises(r"Pass the prompt either positionally \(inputs\) or as input_ids=, not both"):
        llada.diffusion_generate(prompt(), input_ids=prompt(), max_new_tokens=4)


@pytest.mark.parametrize("bad_input, shown", [
    pytest.param(PROMPT, r"list ", id="list"),
    pytest.param(torch.tensor([[1.0, 2.0, 3.0]]), r"Tensor torch\.Size\(\[1, 3\]\)", id="float"),
    pytest.param(torch.tensor([[1, 2, 3]], dtype=torch.uint8), r"Tensor torch\.Size\(\[1, 3\]\)", id="uint8"),
    pytest.param(torch.tensor([1, 2, 3]), r"Tensor torch\.Size\(\[3\]\)", id="1d"),
    pytest.param(torch.tensor([[[1, 2, 3]]]), r"Tensor torch\.Size\(\[1, 1, 3\]\)", id="3d"),
])
def test_prompt_wrong_type_dtype_or_shape(llada, bad_input, shown):
    with raises(rf"input_ids must be an integer tensor of shape \(batch, prompt_len\); got {shown}\. "
                r"Use tokenizer\(\.\.\., return_tensors='pt'\)"):
        llada.diffusion_generate(bad_input, max_new_tokens=4)


def test_int32_prompt_is_accepted(llada):
    out = llada.diffusion_generate(torch.tensor(PROMPT, dtype=torch.int32), max_new_tokens=4, steps=2)
    assert out.dtype == torch.long and out.shape == (1, 7)


def test_empty_prompt(family):
    _, model = family
    with raises(r"input_ids has shape \(1, 0\): pass at least one prompt of at least one token"):
        model.diffusion_generate(torch.empty((1, 0), dtype=torch.long), max_new_tokens=4)


def test_empty_batch(llada):
    with raises(r"input_ids"):
        llada.diffusion_generate(torch.empty((0, 3), dtype=torch.long), max_new_tokens=4)


@pytest.mark.parametrize("ids", [[[1, 2, VOCAB]], [[-1, 2, 3]], [[1, 2, 10_000]]])
def test_prompt_ids_out_of_vocab(family, ids):
    _, model = family
    with raises(rf"input_ids contains ids outside the model's vocabulary \[0, {VOCAB}\)"):
        model.diffusion_generate(torch.tensor(ids), max_new_tokens=4)


@pytest.mark.parametrize("kwargs, mask", [({"mask_token_id": VOCAB}, VOCAB), ({"mask_id": 600}, 600)])
def test_mask_id_out_of_vocab(family, kwargs, mask):
    _, model = family
    with raises(rf"mask_token_id {mask} is outside the model's vocabulary \[0, {VOCAB}\)"):
        model.diffusion_generate(prompt(), max_new_tokens=4, **kwargs)


@pytest.mark.parametrize("mask_shape", [(1, 2), (2, 3), (1, 4), (3,)])
def test_attention_mask_shape_mismatch(llada, mask_shape):
    with raises(rf"attention_mask has shape {re.escape(str(tuple(mask_shape)))} but input_ids has \(1, 3\); they "
                r"must match"):
        llada.diffusion_generate(prompt(), attention_mask=torch.ones(mask_shape, dtype=torch.long), max_new_tokens=4)


@pytest.mark.parametrize("mask", [[[1, 1, 0]], [[1, 0, 1]], [[0, 1, 0]]])
def test_right_padding_rejected(family, mask):
    _, model = family
    with raises(r"attention_mask has padding after real tokens; .* pad on the left \(tokenizer\.padding_side = "
                r"'left'\)"):
        model.diffusion_generate(prompt(), attention_mask=torch.tensor(mask), max_new_tokens=4)


def test_left_padding_and_full_mask_accepted(llada):
    for mask in ([[0, 1, 1]], [[1, 1, 1]]):
        out = llada.diffusion_generate(prompt(), attention_mask=torch.tensor(mask), max_new_tokens=4, steps=2)
        assert out.shape == (1, 7)


@pytest.mark.parametrize("max_length", [3, 2, 1])
def test_max_length_too_short(family, max_length):
    _, model = family
    with raises(rf"max_length \({max_length}\) leaves no room after the 3-token prompt; set max_new_tokens instead"):
        model.diffusion_generate(prompt(), max_length=max_length, steps=1)


def test_max_length_sets_canvas_and_default_length(llada):
    out = llada.diffusion_generate(prompt(), max_length=7, steps=2, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 7) and out.nfe == 2
    config = llada._resolve_lengths(llada._prepare_generation_config(None, {}), prompt_len=3)
    assert config.max_new_tokens == DEFAULT_MAX_NEW_TOKENS and config.steps == DEFAULT_MAX_NEW_TOKENS
    config = llada._resolve_lengths(llada._prepare_generation_config(None, {"max_new_tokens": 6, "max_length": 4}), 3)
    assert config.max_new_tokens == 6 and config.steps == 6  # max_new_tokens wins over max_length


@pytest.mark.parametrize("cache", [
    pytest.param(transformers.DynamicCache(), id="DynamicCache"),
    pytest.param(object(), id="object"),
    pytest.param(((torch.zeros(1),),), id="legacy-tuple"),
])
def test_past_key_values_must_be_diffusion_cache(llada, cache):
    name = type(cache).__name__
    with raises(rf"past_key_values must be a DiffusionCache \(got {name}\); autoregressive caches do not apply"):
        llada.diffusion_generate(prompt(), max_new_tokens=4, past_key_values=cache)


def test_diffusion_cache_instance_accepted(llada):
    calls = []

    class RecordingCache(DiffusionCache):
        def begin_generation(self, canvas, attention_mask, mask_token_id, **details):
            calls.append((canvas.shape, details["prompt_length"]))

    out = llada.diffusion_generate(prompt(), max_new_tokens=4, steps=2, past_key_values=RecordingCache(),
                                   cache_implementation="dual")  # the instance overrides cache_implementation
    assert out.shape == (1, 7) and calls == [((1, 7), 3)]


@pytest.mark.parametrize("name", KNOWN_CACHE_IMPLEMENTATIONS)
def test_cache_implementation_name_runs_its_registered_class(llada, monkeypatch, name):
    cls = DIFFUSION_CACHE_CLASSES[name]
    assert issubclass(cls, DiffusionCache) and cls.cache_name == name
    used = []
    original = cls.begin_generation

    def recording(self, *args, **kwargs):
        used.append(type(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "begin_generation", recording)
    if cls.block_causal_only:  # the block-diffusion models' cache: a full-attention model refuses it
        with pytest.raises(ValueError, match="exact KV cache of block-diffusion models"):
            llada.diffusion_generate(prompt(), max_new_tokens=4, steps=2, cache_implementation=name)
        return
    out = llada.diffusion_generate(prompt(), max_new_tokens=4, steps=2, cache_implementation=name)
    assert used == [cls] and not (out == MASK_ID).any()


def test_diffusion_model_rejected_as_guide(family):
    _, model = family
    with raises(r"assistant_model is a diffusion model; the guide must be an autoregressive causal LM"):
        model.diffusion_generate(prompt(), max_new_tokens=4, assistant_model=model)


def test_guidance_must_be_a_dict(family):
    _, model = family
    with raises(r"guidance must be a dict such as \{'strategy': 'deterministic'\}, got 'ar'"):
        model.diffusion_generate(prompt(), max_new_tokens=4, guidance="ar")


def test_logits_eos_inf_needs_eos(llada, monkeypatch):
    monkeypatch.setattr(llada.config, "eos_token_id", None)
    monkeypatch.setattr(llada, "generation_config", DiffusionGenerationConfig())
    with raises(r"logits_eos_inf=True needs an eos_token_id; pass eos_token_id="):
        llada.diffusion_generate(prompt(), max_new_tokens=4, logits_eos_inf=True)


def test_stop_strings_need_tokenizer(llada):
    with raises(r"stop_strings needs the tokenizer to read the text: pass tokenizer="):
        llada.diffusion_generate(prompt(), max_new_tokens=4, steps=2, stop_strings=["x"])


# ====================================================================================================================
# 2. Round trips, update(), from_model_config(), unset fields not serialised
# ====================================================================================================================
_COMMON = dict(steps=16, block_length=8, sub_block_length=4, schedule="eps", alg_temp=0.5, eps=0.01, cfg_scale=1.5,
               logits_eos_inf=True, confidence_eos_eot_inf=True, eot_token_id=502, mask_token_id=MASK_ID,
               eos_early_stop=True, output_history=True, output_confidences=True, output_commit_steps=True, max_new_tokens=32, temperature=0.7, top_p=0.9, top_k=20,
               eos_token_id=501, pad_token_id=501)
# threshold and factor exclude each other, so "every diffusion field" takes two configs.
FREECACHE = {"cache_implementation": "freecache", "cache_config": {"window_left": 32, "window_right": 128}}
FULL_THRESHOLD = {**_COMMON, "alg": "maskgit_plus", "threshold": 0.8, "position_decay": 0.2, "suffix_window": 48,
                  **FREECACHE}
FULL_FACTOR = {**_COMMON, "alg": "topk_margin", "factor": 1.0, **FREECACHE}
# guidance replaces the commit policy and draws at its own temperature
FULL_GUIDED = {**{k: v for k, v in _COMMON.items() if k != "temperature"}, "alg": "entropy", **FREECACHE,
               "guidance": {"strategy": "topk_relative", "top_k": 3, "relative_threshold": 0.4, "verify_chunk": 16,
                            "draft_temperature": 0.2, "assistant_model_id": "org/guide"}}
FULL_ENTROPY = {**_COMMON, "alg": "low_confidence", "entropy_bound": 0.4, **FREECACHE}
FULL_CONFIGS = [pytest.param(FULL_THRESHOLD, id="threshold"), pytest.param(FULL_FACTOR, id="factor"),
                pytest.param(FULL_GUIDED, id="guided"), pytest.param(FULL_ENTROPY, id="entropy-bound")]


def test_full_configs_cover_every_diffusion_field():
    assert set(DIFFUSION_DEFAULTS) <= set(FULL_THRESHOLD) | set(FULL_FACTOR) | set(FULL_GUIDED) | set(FULL_ENTROPY)
    assert set(DIFFUSION_DEFAULTS) - {"factor", "guidance", "entropy_bound"} <= set(FULL_THRESHOLD)


def assert_fields(config, fields):
    assert isinstance(config, DiffusionGenerationConfig)
    for name, value in fields.items():
        assert getattr(config, name) == value, name
        assert type(getattr(config, name)) is type(value), name


@pytest.mark.parametrize("fields", FULL_CONFIGS)
def test_save_and_load_round_trip(tmp_path, fields):
    config = DiffusionGenerationConfig(**fields)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    for name, value in fields.items():
        assert saved[name] == value, name
    loaded = DiffusionGenerationConfig.from_pretrained(tmp_path)
    assert_fields(loaded, fields)
    assert loaded == config
    loaded.validate(strict=True)
    # Unset diffusion fields stay unset after the round trip.
    for name in DIFFUSION_DEFAULTS:
        if name not in fields:
            assert getattr(loaded, name) is None


@pytest.mark.parametrize("fields", [
    pytest.param(FULL_THRESHOLD, id="threshold-freecache", marks=pytest.mark.xfail(raises=ValueError, strict=True, reason=(
        "Known limitation (documented in docs/configuration.md): DiffusionGenerationConfig writes cache_implementation='freecache' (a "
        "KNOWN_CACHE_IMPLEMENTATIONS name) to generation_config.json, but transformers.GenerationConfig.from_pretrained "
        "validates it against the autoregressive cache names and raises ValueError: Invalid `cache_implementation`."))),
    pytest.param({k: v for k, v in FULL_THRESHOLD.items() if k != "cache_implementation"}, id="threshold"),
    pytest.param({k: v for k, v in FULL_FACTOR.items() if k != "cache_implementation"}, id="factor"),
    pytest.param({k: v for k, v in FULL_GUIDED.items() if k != "cache_implementation"}, id="guided"),
])
def test_plain_generation_config_round_trip(tmp_path, fields):
    DiffusionGenerationConfig(**fields).save_pretrained(tmp_path)
    plain = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert type(plain) is transformers.GenerationConfig
    converted = DiffusionGenerationConfig.from_generation_config(plain)
    assert_fields(converted, fields)
    converted.validate()


def test_from_generation_config_variants():
    assert DiffusionGenerationConfig.from_generation_config(None) is None
    original = DiffusionGenerationConfig(steps=4, alg="entropy", cache_config={"x": [1]})
    copied = DiffusionGenerationConfig.from_generation_config(original)
    assert copied is not original and copied == original
    assert copied.cache_config is not original.cache_config  # deep copy
    plain = transformers.GenerationConfig(max_new_tokens=8, temperature=0.5, alg="topk_margin", steps=2)
    converted = DiffusionGenerationConfig.from_generation_config(plain)
    assert_fields(converted, {"max_new_tokens": 8, "temperature": 0.5, "alg": "topk_margin", "steps": 2})
    assert converted.schedule is None and converted.block_length is None


def test_unset_diffusion_fields_are_not_written(tmp_path):
    DiffusionGenerationConfig().save_pretrained(tmp_path / "empty")
    saved = json.loads((tmp_path / "empty" / "generation_config.json").read_text())
    assert not set(saved) & set(DIFFUSION_DEFAULTS)

    DiffusionGenerationConfig(steps=4, max_new_tokens=8, output_history=False).save_pretrained(tmp_path / "some")
    saved = json.loads((tmp_path / "some" / "generation_config.json").read_text())
    assert set(saved) & set(DIFFUSION_DEFAULTS) == {"steps", "output_history"}
    assert saved["steps"] == 4 and saved["max_new_tokens"] == 8 and saved["output_history"] is False
    assert not any(value is None for key, value in saved.items() if key in DIFFUSION_DEFAULTS)


def test_update_with_aliases_and_validate():
    config = DiffusionGenerationConfig()
    unused = config.update(gen_length=16, mask_id=7, remasking="random", steps=4, block_length=8, not_a_field=1)
    assert unused == {"not_a_field": 1}
    assert_fields(config, {"max_new_tokens": 16, "mask_token_id": 7, "alg": "random", "steps": 4, "block_length": 8})
    config.validate()
    assert not hasattr(config, "gen_length") and not hasattr(config, "mask_id") and not hasattr(config, "remasking")

    config.update(defaults_only=True, steps=8, threshold=0.9)
    assert config.steps == 4 and config.threshold == 0.9  # defaults_only fills unset fields only

    with raises(r"steps must be a positive integer, got 0\."):
        config.update(steps=0)
    with raises(r"max_new_tokens \(12\) must be a multiple of block_length \(8\)"):
        DiffusionGenerationConfig(block_length=8).update(gen_length=12)


def test_constructor_accepts_aliases():
    config = DiffusionGenerationConfig(gen_length=8, mask_id=9, remasking="low_confidence")
    assert_fields(config, {"max_new_tokens": 8, "mask_token_id": 9, "alg": "low_confidence"})


@pytest.mark.parametrize("as_dict", [False, True])
def test_from_model_config(family, as_dict):
    name, model = family
    source = model.config.to_dict() if as_dict else model.config
    config = DiffusionGenerationConfig.from_model_config(source)
    assert isinstance(config, DiffusionGenerationConfig)
    assert config.mask_token_id == model.config.mask_token_id == MASK_ID
    assert config.eos_token_id == model.config.eos_token_id == 501
    assert config.pad_token_id == model.config.pad_token_id == 501
    assert config.bos_token_id == (501 if name == "dream" else None)  # tiny-llada's config.json has no bos
    assert config._from_model_config is True
    # Everything else stays unset.
    for field in DIFFUSION_DEFAULTS:
        if field != "mask_token_id":
            assert getattr(config, field) is None, field
    assert config.temperature is None and config.max_new_tokens is None
    config.validate()


# ====================================================================================================================
# 3. Precedence: call kwargs > generation_config argument > model.generation_config > family defaults > library
# ====================================================================================================================
def test_family_defaults_beat_library_defaults(family, monkeypatch):
    name, model = family
    monkeypatch.setattr(model, "generation_config", None)
    resolved = model._prepare_generation_config(None, {})
    assert isinstance(resolved, DiffusionGenerationConfig)
    for field, value in FAMILY_DEFAULTS[name].items():
        assert getattr(resolved, field) == value
    # Fields no family sets come from LIBRARY_DEFAULTS.
    for field in ("temperature", "cfg_scale", "eps", "num_return_sequences", "steps", "block_length", "threshold",
                  "return_dict_in_generate", "output_history", "cache_implementation"):
        assert getattr(resolved, field) == LIBRARY_DEFAULTS[field], field
    # ... and special ids from the model config.
    assert resolved.mask_token_id == MASK_ID and resolved.eos_token_id == 501


def test_dream_family_defaults_differ_from_library():
    # The Dream check above only proves precedence if the two layers disagree.
    assert LIBRARY_DEFAULTS["schedule"] == "linear" and LIBRARY_DEFAULTS["alg"] == "low_confidence"
    from dlm_generation import DreamModel, LLaDAModelLM
    assert {k: DreamModel.diffusion_generation_defaults[k] for k in ("schedule", "alg")} == FAMILY_DEFAULTS["dream"]
    assert LLaDAModelLM.diffusion_generation_defaults == FAMILY_DEFAULTS["llada"]


def test_empty_model_generation_config_falls_to_family_defaults(family, monkeypatch):
    name, model = family
    monkeypatch.setattr(model, "generation_config", DiffusionGenerationConfig())
    resolved = model._prepare_generation_config(None, {})
    assert (resolved.schedule, resolved.alg) == (FAMILY_DEFAULTS[name]["schedule"], FAMILY_DEFAULTS[name]["alg"])


def test_model_generation_config_beats_family_defaults(family, monkeypatch):
    name, model = family
    other = {"schedule": "eps" if name == "llada" else "linear", "alg": "topk_margin"}
    monkeypatch.setattr(model, "generation_config", DiffusionGenerationConfig(**other, steps=4, cfg_scale=0.5))
    resolved = model._prepare_generation_config(None, {})
    assert_fields(resolved, {**other, "steps": 4, "cfg_scale": 0.5})


def test_dream_golden_generation_config_beats_family_defaults(dream):
    resolved = dream._prepare_generation_config(None, {})
    assert resolved.alg == "origin"  # generation_config.json, not the family's "entropy"
    assert resolved.steps == 512 and resolved.eps == 0.001 and resolved.schedule == "eps"


def test_generation_config_argument_beats_model_generation_config(family, monkeypatch):
    _, model = family
    monkeypatch.setattr(model, "generation_config",
                        DiffusionGenerationConfig(steps=4, alg="topk_margin", cfg_scale=0.5, block_length=2))
    passed = DiffusionGenerationConfig(steps=8, alg="maskgit_plus")
    resolved = model._prepare_generation_config(passed, {})
    assert_fields(resolved, {"steps": 8, "alg": "maskgit_plus", "cfg_scale": 0.5, "block_length": 2})
    # A plain GenerationConfig works as the argument too (e.g. a pipeline's).
    resolved = model._prepare_generation_config(transformers.GenerationConfig(temperature=0.5, steps=2), {})
    assert_fields(resolved, {"temperature": 0.5, "steps": 2, "alg": "topk_margin"})


def test_call_kwargs_beat_everything(family, monkeypatch):
    name, model = family
    monkeypatch.setattr(model, "generation_config", DiffusionGenerationConfig(steps=4, alg="topk_margin",
                                                                              cfg_scale=0.5, temperature=0.3))
    passed = DiffusionGenerationConfig(steps=8, alg="maskgit_plus", block_length=4)
    kwargs = {"steps": 2, "alg": "random", "schedule": "eps" if name == "llada" else "linear"}
    resolved = model._prepare_generation_config(passed, dict(kwargs))
    assert_fields(resolved, {
        **kwargs,  # call kwargs
        "block_length": 4,  # generation_config argument
        "cfg_scale": 0.5, "temperature": 0.3,  # model.generation_config
        "eps": LIBRARY_DEFAULTS["eps"], "threshold": None, "top_k": None,  # library defaults
    })


def test_prepare_generation_config_consumes_kwargs_and_does_not_mutate_layers(llada, monkeypatch):
    model_config = DiffusionGenerationConfig(steps=4)
    monkeypatch.setattr(llada, "generation_config", model_config)
    passed = DiffusionGenerationConfig(alg="random")
    kwargs = {"steps": 2, "gen_length": 8}
    resolved = llada._prepare_generation_config(passed, kwargs)
    assert kwargs == {}
    assert resolved.steps == 2 and resolved.max_new_tokens == 8 and resolved.alg == "random"
    assert model_config.steps == 4 and model_config.alg is None and model_config.max_new_tokens is None
    assert passed.steps is None and passed.alg == "random"


def test_invalid_layer_values_are_reported(llada):
    with raises(r"steps must be a positive integer, got -2\."):
        llada._prepare_generation_config(None, {"steps": -2})
    passed = DiffusionGenerationConfig()
    passed.alg = "bogus"
    with raises(r"alg='bogus' is unknown"):
        llada._prepare_generation_config(passed, {})


@pytest.mark.parametrize("layer", ["kwargs", "generation_config", "model"])
def test_do_sample_false_forces_temperature_zero(llada, monkeypatch, layer):
    kwargs = {"temperature": 0.7}
    passed = None
    if layer == "kwargs":
        kwargs["do_sample"] = False
    elif layer == "generation_config":
        passed = DiffusionGenerationConfig(do_sample=False)
    else:
        monkeypatch.setattr(llada, "generation_config", DiffusionGenerationConfig(do_sample=False))
    resolved = llada._prepare_generation_config(passed, kwargs)
    assert resolved.temperature == 0.0 and resolved.do_sample is False


@pytest.mark.parametrize("do_sample", [None, True])
def test_temperature_kept_unless_do_sample_false(llada, do_sample):
    resolved = llada._prepare_generation_config(None, {"temperature": 0.7, "do_sample": do_sample})
    assert resolved.temperature == 0.7


def test_do_sample_false_end_to_end_is_greedy(llada):
    greedy = llada.diffusion_generate(prompt(), max_new_tokens=8, steps=4, temperature=0.0)
    for seed in (0, 1):
        torch.manual_seed(seed)
        out = llada.diffusion_generate(prompt(), max_new_tokens=8, steps=4, temperature=5.0, do_sample=False)
        assert torch.equal(out, greedy)


def test_confidence_threshold_gets_default_threshold(llada):
    assert llada._prepare_generation_config(None, {"alg": "confidence_threshold"}).threshold == \
        DEFAULT_CONFIDENCE_THRESHOLD
    assert llada._prepare_generation_config(None, {"alg": "confidence_threshold", "threshold": 0.5}).threshold == 0.5


# ---------------------------------------------------------------------------------------------- end to end (nfe)
def nfe(model, **kwargs):
    out = model.diffusion_generate(prompt(), max_new_tokens=8, return_dict_in_generate=True, **kwargs)
    assert out.sequences.shape == (1, 11)
    assert not bool((out.sequences[:, 3:] == MASK_ID).any())
    return out.nfe


def test_steps_precedence_end_to_end(family, monkeypatch):
    name, model = family
    config = copy.deepcopy(model.generation_config)
    config.steps = 4
    if name == "dream":
        config.alg = "entropy"  # the golden file's "origin" is random; keep the step count deterministic
    monkeypatch.setattr(model, "generation_config", config)
    assert nfe(model) == 4  # model.generation_config
    assert nfe(model, steps=2) == 2  # call kwargs > model.generation_config
    assert nfe(model, generation_config=DiffusionGenerationConfig(steps=8)) == 8  # argument > model
    assert nfe(model, generation_config=DiffusionGenerationConfig(steps=8), steps=2) == 2  # kwargs > argument
    assert nfe(model, generation_config=DiffusionGenerationConfig(alg="entropy")) == 4  # unset steps: model's
    # Fall through to the library default (one step per token) when no layer sets steps.
    config.steps = None
    assert nfe(model) == 8


def test_generate_entry_point_uses_same_precedence(llada, monkeypatch):
    config = copy.deepcopy(llada.generation_config)
    config.steps = 4
    monkeypatch.setattr(llada, "generation_config", config)
    out = llada.generate(prompt(), max_new_tokens=8, use_cache=True, return_dict_in_generate=True)
    assert out.nfe == 4
    out = llada.generate(input_ids=prompt(), max_new_tokens=8, steps=2, return_dict_in_generate=True)
    assert out.nfe == 2


def test_llada_aliases_in_diffusion_generate(llada):
    out = llada.diffusion_generate(prompt(), gen_length=8, steps=4, mask_id=499, remasking="low_confidence",
                                   output_history=True, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 11) and out.nfe == 4
    # The canvas is filled with mask_id: after the first of 4 steps, 8 - 2 positions still hold 499.
    assert int((out.history[0][0, 3:] == 499).sum()) == 6
    reference = llada.diffusion_generate(prompt(), max_new_tokens=8, steps=4, mask_token_id=499,
                                         alg="low_confidence")
    assert torch.equal(out.sequences, reference)
    resolved = llada._prepare_generation_config(None, {"gen_length": 16, "mask_id": 3, "remasking": "random"})
    assert_fields(resolved, {"max_new_tokens": 16, "mask_token_id": 3, "alg": "random"})


def test_mask_token_id_falls_back_to_model_config(dream, monkeypatch):
    on_disk = json.loads((DREAM_DIR / "generation_config.json").read_text())
    assert "mask_token_id" in on_disk and on_disk["mask_token_id"] is None
    file_config = DiffusionGenerationConfig.from_pretrained(DREAM_DIR)
    assert file_config.mask_token_id is None
    # The loaded model's generation_config takes the id from config.json.
    assert dream.generation_config.mask_token_id == dream.config.mask_token_id == MASK_ID

    # _prepare_generation_config falls back to model.config when no layer has a mask id.
    monkeypatch.setattr(dream, "generation_config", file_config)
    assert dream._prepare_generation_config(None, {}).mask_token_id == MASK_ID
    assert dream._prepare_generation_config(DiffusionGenerationConfig(steps=2), {}).mask_token_id == MASK_ID
    out = dream.diffusion_generate(prompt(), max_new_tokens=8, steps=4, alg="entropy", output_history=True,
                                   return_dict_in_generate=True)
    assert out.nfe == 4
    assert int((out.history[0][0, 3:] == MASK_ID).sum()) > 0  # the canvas used the model config's mask id
    # A mask id set in any layer wins over the model config.
    assert dream._prepare_generation_config(DiffusionGenerationConfig(mask_token_id=7), {}).mask_token_id == 7
    assert dream._prepare_generation_config(None, {"mask_token_id": 9}).mask_token_id == 9


# ====================================================================================================================
# 4. The loaded model.generation_config
# ====================================================================================================================
def test_loaded_dream_generation_config_keeps_diffusion_fields(dream):
    config = dream.generation_config
    assert isinstance(config, DiffusionGenerationConfig)
    assert config.alg == "origin" and config.steps == 512 and config.eps == 0.001
    assert config.output_history is False and config.alg_temp is None
    assert config.temperature == 0.0 and config.top_k is None and config.top_p is None
    assert config.bos_token_id == config.eos_token_id == config.pad_token_id == 501
    assert config.schedule == "eps"  # unset in the file: filled with the family default
    config.validate()


def test_loaded_llada_generation_config(llada):
    config = llada.generation_config
    assert isinstance(config, DiffusionGenerationConfig)
    assert config.bos_token_id == 503  # generation_config.json wins over the model config
    assert config.eos_token_id == 501 and config.mask_token_id == MASK_ID
    assert config.schedule == "linear" and config.alg == "low_confidence" and config.temperature == 0.0
    assert config.steps is None and config.block_length is None
    config.validate()


def test_explicit_none_kwarg_falls_back_to_the_family_default():
    """Dream's call style passes None for unused fields: None means "the default", the family's first."""
    from transformers import AutoModelForCausalLM

    dream = AutoModelForCausalLM.from_pretrained(GOLDEN / "tiny-dream")
    resolved = dream._prepare_generation_config(None, {"alg": None, "top_p": None, "schedule": None})
    assert (resolved.alg, resolved.schedule, resolved.top_p) == ("entropy", "eps", None)
