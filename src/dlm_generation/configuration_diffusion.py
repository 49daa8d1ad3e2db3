"""`DiffusionGenerationConfig`: every knob of diffusion decoding, validated in one place.

A `transformers.GenerationConfig` subclass, so it saves to and loads from `generation_config.json`, pushes to the
Hub, and passes through pipelines. Unset fields are `None`; the value used at generation time is resolved by one
precedence rule (see `DiffusionGenerationMixin._prepare_generation_config`): call kwargs > the `generation_config`
argument > `model.generation_config` > the model family's defaults > `LIBRARY_DEFAULTS`.

This file travels with saved models, so it imports only transformers and sibling files.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
from typing import Any

from transformers import GenerationConfig

from .diffusion_cache import is_int, is_number
from .diffusion_caches import DIFFUSION_CACHE_CLASSES, KNOWN_CACHE_IMPLEMENTATIONS
from .diffusion_guidance import resolve_guidance_config

# Confidence measures ("scorers"). `confidence_threshold` is Fast-dLLM Dream's name for maskgit_plus confidence
# with budgeted threshold commits; it is accepted so that existing Dream call sites keep working.
ALGS = ("low_confidence", "maskgit_plus", "topk_margin", "entropy", "random", "origin", "confidence_threshold")
SCHEDULES = ("linear", "eps")

# Diffusion-only fields with their library defaults (the lowest precedence layer).
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "steps": None,  # None: one step per generated token (resolved at generation time)
    "block_length": None,  # None: the whole canvas is one block
    "sub_block_length": None,  # block-diffusion models: commits go sub-block by sub-block (None: the whole block)
    "schedule": "linear",
    "alg": "low_confidence",
    "alg_temp": None,
    "eps": 1e-3,
    "cfg_scale": 0.0,
    "logits_eos_inf": False,
    "confidence_eos_eot_inf": False,
    "eot_token_id": None,
    "threshold": None,
    "factor": None,
    "entropy_bound": None,
    "position_decay": None,
    "suffix_window": None,  # None: every masked position after the block enters the forward
    "mask_token_id": None,
    "eos_early_stop": False,
    "guidance": None,  # None: no AR guide (unless the call passes assistant_model=)
    "output_history": False,
    "output_confidences": False,
    "output_commit_steps": False,
}
# Fields of the parent class that the diffusion loop reads, with their library defaults.
SHARED_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": None,  # None: max_length - prompt length if max_length is set, else DEFAULT_MAX_NEW_TOKENS
    "max_length": None,
    "temperature": 0.0,
    "top_p": None,
    "top_k": None,
    "do_sample": None,
    "num_return_sequences": 1,
    "cache_implementation": None,
    "cache_config": None,
    "return_dict_in_generate": False,
    "stop_strings": None,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}
LIBRARY_DEFAULTS = {**SHARED_DEFAULTS, **DIFFUSION_DEFAULTS}
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_CONFIDENCE_THRESHOLD = 0.9  # Fast-dLLM's default for alg="confidence_threshold"

# Names from the LLaDA reference code, accepted as aliases.
ALIASES = {"gen_length": "max_new_tokens", "mask_id": "mask_token_id", "remasking": "alg",
           "small_block_size": "sub_block_length"}
REMASKING_VALUES = ("low_confidence", "random")

# Autoregressive-only features of GenerationConfig: value that means "off", and why diffusion cannot honour it.
UNSUPPORTED_AR_FIELDS: dict[str, tuple[Any, str]] = {
    "num_beams": (1, "beam search has no diffusion counterpart"),
    "num_beam_groups": (1, "beam search has no diffusion counterpart"),
    "penalty_alpha": (None, "contrastive search is autoregressive"),
    "repetition_penalty": (1.0, "it depends on a left-to-right history"),
    "no_repeat_ngram_size": (0, "it depends on a left-to-right history"),
    "min_new_tokens": (None, "the canvas length is fixed by max_new_tokens"),
    "min_length": (0, "the canvas length is fixed by max_new_tokens"),
    "prompt_lookup_num_tokens": (None, "prompt lookup is autoregressive speculative decoding"),
    "watermarking_config": (None, "watermarking assumes left-to-right sampling"),
    "min_p": (None, "not implemented for diffusion logits; use top_p or top_k"),
    "typical_p": (1.0, "not implemented for diffusion logits; use top_p or top_k"),
    "guidance_scale": (None, "use cfg_scale for classifier-free guidance"),
    "bad_words_ids": (None, "pass a SuppressTokensLogitsProcessor through logits_processor instead"),
    "suppress_tokens": (None, "pass a SuppressTokensLogitsProcessor through logits_processor instead"),
}


def translate_aliases(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map the reference code's names (LLaDA's `gen_length`, `mask_id`, `remasking`; Fast-dLLM v2's
    `small_block_size`) to the config's names."""
    out = dict(kwargs)
    for alias, name in ALIASES.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if alias == "remasking" and value not in REMASKING_VALUES:
            raise ValueError(f"remasking={value!r} is not a LLaDA remasking strategy; use one of {REMASKING_VALUES}.")
        if name in out and out[name] is not None and out[name] != value:
            raise ValueError(
                f"{alias}={value!r} and {name}={out[name]!r} were both given and disagree; {alias} is an alias of "
                f"{name}, pass only one of them."
            )
        out[name] = value
    return out


class DiffusionGenerationConfig(GenerationConfig):
    """Configuration of `model.diffusion_generate()` / `model.generate()` for masked-diffusion language models.

    Diffusion fields (all default to `None` = unset; library defaults in `LIBRARY_DEFAULTS`):

    - `steps` (int): total denoising steps for the canvas, spread evenly over the blocks. Default: one per token.
    - `block_length` (int): semi-autoregressive block size; must divide `max_new_tokens`. Default: one block.
    - `sub_block_length` (int): block-diffusion models (Fast-dLLM v2) only: inside a block, steps commit only in the
      leftmost sub-block of this many positions that still has masks (Fast-dLLM v2's `small_block_size`, 8); must
      divide `block_length`. Default: the whole block.
    - `schedule` (`"linear"` | `"eps"`): how many tokens a step commits. `"linear"` (LLaDA): a block's masks spread
      evenly over its steps, remainder to the first steps. `"eps"` (Dream): `k = int(masks * (1 - s/t))` on the
      timesteps `linspace(1, eps, steps + 1)`, everything left at the last step.
    - `alg` (str): confidence measure used to choose positions: `"low_confidence"` / `"maskgit_plus"` (probability
      of the proposed token), `"topk_margin"` (top-1 minus top-2 probability), `"entropy"` (negative entropy),
      `"random"` (uniform), `"origin"` (Dream: each mask revealed with probability `1 - s/t`), or
      `"confidence_threshold"` (Fast-dLLM Dream: maskgit_plus confidence with budgeted threshold commits).
    - `alg_temp` (float): Dream: if > 0, positions are drawn from `softmax(confidence / alg_temp)` instead of top-k.
    - `eps` (float): final timestep of the `"eps"` schedule.
    - `cfg_scale` (float): classifier-free guidance, `uncond + (cfg_scale + 1) * (cond - uncond)`.
    - `logits_eos_inf`, `confidence_eos_eot_inf` (bool): LLaDA's EOS controls, with the model's own EOS ids and
      `eot_token_id`.
    - `eot_token_id` (int): end-of-turn token (LLaDA-Instruct `<|eot_id|>`); also a stop token.
    - `threshold` (float): Fast-dLLM parallel decoding: commit every eligible position with confidence >=
      threshold, and always the most confident one.
    - `factor` (float): Fast-dLLM factor decoding: commit the leading run of confidences with c_r >= 1 - f/(r+1).
    - `entropy_bound` (float > 0): EB-Sampler (arXiv 2505.24857; transformers' DiffusionGemma name): per step, commit
      the eligible positions in order of increasing entropy while the sum of their entropies minus the largest stays
      within the bound (always at least one). An alternative to `threshold` / `factor`.
    - `position_decay` (float >= 0): PC-Sampler's position-aware calibration (arXiv 2508.13021): a position's
      confidence is weighted by exp(-position_decay * its distance from the row's leftmost committable mask)
      (negative scores, `alg="entropy"`, are divided by the weight; so is the entropy `entropy_bound` reads), with
      every scorer and policy. 0 or None: off.
    - `suffix_window` (int >= 0): DPad (arXiv 2508.14148): while a semi-AR block decodes, only the first
      `suffix_window` positions after it enter the model's forwards (the masked suffix beyond them is left out, its
      positions keep their rotary positions); works with no cache and the prefix, dual, FreeCache and Elastic-Cache
      caches. None: the whole canvas (today's behaviour). No effect with a single block (`block_length=None`).
    - `mask_token_id` (int): defaults to the model config's.
    - `eos_early_stop` (bool): a row stops as soon as every position before its first stop token is committed;
      what follows that token becomes `pad_token_id`. Lossless for the text up to the stop token.
    - `guidance` (dict): AR-guided diffusion (FlashDLM) with the guide passed as `assistant_model=`: `strategy`
      (`"deterministic"`, `"topk_relative"` with `top_k` 2 and `relative_threshold` 0.5, or `"speculative"`),
      `verify_chunk` (32), `draft_temperature` (0.0 = argmax drafts) and `assistant_model_id` (the guide loaded
      when none is passed). It replaces the commit policy (so no threshold / factor; the scorer `alg` and
      `alg_temp` go unused), draws drafts at `draft_temperature` (leave `temperature` at 0) and implies
      `eos_early_stop`. A guided call drops those settings when it inherits them from the model's
      generation_config; passed with the guidance, they raise. See `diffusion_guidance.py`.
    - `output_history` (bool): return the canvas after every step as `history`.
    - `output_confidences` (bool): return, per generated position, the confidence it was committed with as
      `confidences` (see `DiffusionGenerateOutput`).
    - `output_commit_steps` (bool): return `commit_steps`, the forward pass at which each generated position stopped
      being a mask (a (batch, max_new_tokens) tensor; far cheaper than `history`). dlm-generation's `visualize`
      module draws it.

    Shared with `GenerationConfig` and read by the loop: `max_new_tokens` (canvas length), `max_length`,
    `temperature` (0 = greedy), `top_p`, `top_k`, `do_sample` (False forces greedy), `num_return_sequences`,
    `cache_implementation` / `cache_config`, `return_dict_in_generate`, `stop_strings`, and the special token ids.
    LLaDA aliases are accepted: `gen_length`, `mask_id`, `remasking`.
    """

    def __init__(self, **kwargs):
        kwargs = translate_aliases(kwargs)
        for name in DIFFUSION_DEFAULTS:
            setattr(self, name, kwargs.pop(name, None))
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ validation (the only place)
    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None) -> None:
        """Check every field the diffusion loop reads; raise `ValueError` saying what is wrong and how to fix it.

        Cross-field checks run only when both fields are set, so partial configs (one layer of the precedence rule)
        validate on their own.
        """
        errors = []

        def positive_int(name: str) -> None:
            value = getattr(self, name, None)
            if value is not None and (not is_int(value) or value <= 0):
                errors.append(f"{name} must be a positive integer, got {value!r}.")

        def non_negative(name: str) -> None:
            value = getattr(self, name, None)
            if value is not None and (not is_number(value) or not 0 <= value < math.inf):
                errors.append(f"{name} must be a finite number >= 0, got {value!r}.")

        def boolean(name: str) -> None:
            value = getattr(self, name, None)
            if value is not None and not isinstance(value, bool):
                errors.append(f"{name} must be True or False, got {value!r}.")

        def token_id(name: str) -> None:
            value = getattr(self, name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(is_int(v) and v >= 0 for v in values):
                errors.append(f"{name} must be a non-negative token id (or a list of them), got {value!r}.")

        for name in ("steps", "max_new_tokens", "max_length", "top_k", "num_return_sequences"):
            positive_int(name)
        block_ok = self.block_length is None or (is_int(self.block_length) and self.block_length > 0)
        if not block_ok:
            errors.append(
                f"block_length must be a positive integer that divides max_new_tokens (e.g. 32), or None for a single "
                f"block over the whole canvas; got {self.block_length!r}."
            )
        if self.sub_block_length is not None:
            if not (is_int(self.sub_block_length) and self.sub_block_length > 0):
                errors.append(f"sub_block_length must be a positive integer that divides block_length (Fast-dLLM v2 "
                              f"uses 8), or None for the whole block; got {self.sub_block_length!r}.")
            elif block_ok and self.block_length is not None and self.block_length % self.sub_block_length:
                errors.append(f"sub_block_length ({self.sub_block_length}) must divide block_length "
                              f"({self.block_length}), so that a block is a whole number of sub-blocks.")
        for name in ("temperature", "alg_temp", "cfg_scale"):
            non_negative(name)
        for name in ("logits_eos_inf", "confidence_eos_eot_inf", "eos_early_stop", "output_history",
                     "output_confidences", "output_commit_steps", "do_sample",
                     "return_dict_in_generate"):
            boolean(name)
        for name in ("mask_token_id", "eot_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            token_id(name)

        if self.alg is not None and self.alg not in ALGS:
            errors.append(f"alg={self.alg!r} is unknown; choose one of {ALGS}.")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            errors.append(f"schedule={self.schedule!r} is unknown; choose one of {SCHEDULES}.")
        if self.top_p is not None and (not is_number(self.top_p) or not 0 < self.top_p <= 1):
            errors.append(f"top_p must be in (0, 1], got {self.top_p!r}; use None to disable nucleus filtering.")
        if self.eps is not None and (not is_number(self.eps) or not 0 < self.eps < 1):
            errors.append(f"eps must be in (0, 1), got {self.eps!r} (Dream uses 1e-3).")
        if self.threshold is not None and (not is_number(self.threshold) or not 0 < self.threshold <= 1):
            errors.append(f"threshold must be in (0, 1], got {self.threshold!r} (Fast-dLLM uses 0.9).")
        if self.factor is not None and (not is_number(self.factor) or self.factor <= 0):
            errors.append(f"factor must be a number > 0, got {self.factor!r} (Fast-dLLM uses 1.0).")
        if self.pad_token_id is not None and self.pad_token_id == self.mask_token_id:
            errors.append(f"pad_token_id equals mask_token_id ({self.mask_token_id}): padding would read as positions "
                          "still to decode; use the EOS id (or another non-mask id) as pad_token_id.")
        if self.threshold is not None and self.factor is not None:
            errors.append("threshold and factor are two alternative parallel-decoding policies; set only one of them.")
        if self.position_decay is not None and (not is_number(self.position_decay) or self.position_decay < 0):
            errors.append(f"position_decay must be a number >= 0 (0 or None: off), got {self.position_decay!r}; "
                          "PC-Sampler uses values around 0.1-1 per position.")
        if self.suffix_window is not None and not (is_int(self.suffix_window) and self.suffix_window >= 0):
            errors.append(f"suffix_window must be a non-negative integer (masked positions after the block that enter "
                          f"a forward; DPad keeps about 64-128) or None for all of them, got {self.suffix_window!r}.")
        if self.entropy_bound is not None:
            if not is_number(self.entropy_bound) or self.entropy_bound <= 0:
                errors.append(f"entropy_bound must be a number > 0, got {self.entropy_bound!r} (the EB-Sampler paper "
                              "uses 0.01-1; larger commits more tokens per step).")
            others = [name for name in ("threshold", "factor") if getattr(self, name) is not None]
            if others:
                errors.append(f"entropy_bound and {' and '.join(others)} are alternative parallel-decoding policies; "
                              f"set only one of them (pass {others[0]}=None... or drop entropy_bound).")
            if self.alg in ("origin", "confidence_threshold"):
                errors.append(f"alg={self.alg!r} is a commit policy of its own; entropy_bound replaces it: use "
                              "alg='low_confidence' (the scorer only breaks nothing here) or drop entropy_bound.")
        if self.alg == "origin" and (self.threshold is not None or self.factor is not None):
            errors.append(
                "alg='origin' reveals random positions and has no confidence to threshold; use another alg with "
                "threshold/factor, or drop threshold/factor."
            )
        if self.alg == "entropy" and (self.threshold is not None or self.factor is not None):
            errors.append(
                "threshold/factor compare confidences with probabilities, but alg='entropy' scores by negative entropy "
                "(<= 0); use alg='maskgit_plus' (or 'low_confidence', 'topk_margin') with threshold/factor."
            )
        if self.alg == "confidence_threshold" and self.factor is not None:
            errors.append("alg='confidence_threshold' is a threshold policy; it cannot be combined with factor.")
        if self.block_length is not None and self.max_new_tokens is not None and block_ok:
            if is_int(self.max_new_tokens) and self.max_new_tokens > 0 and self.max_new_tokens % self.block_length:
                errors.append(
                    f"max_new_tokens ({self.max_new_tokens}) must be a multiple of block_length ({self.block_length}); "
                    "change one of them, or set block_length=None for a single block."
                )
        if self.cache_implementation is not None and self.cache_implementation not in KNOWN_CACHE_IMPLEMENTATIONS:
            errors.append(
                f"cache_implementation={self.cache_implementation!r} is not a diffusion cache; choose one of "
                f"{KNOWN_CACHE_IMPLEMENTATIONS} or None."
            )
        if self.cache_config is not None and not isinstance(self.cache_config, dict):
            errors.append(f"cache_config must be a dict of the cache's hyper-parameters, got {self.cache_config!r}.")
        elif self.cache_implementation in KNOWN_CACHE_IMPLEMENTATIONS:
            try:  # a check only: the cache resolves its config once, when it is built for the call
                DIFFUSION_CACHE_CLASSES[self.cache_implementation].resolve_cache_config(self.cache_config)
            except ValueError as error:
                errors.append(str(error))
        if self.guidance is not None:
            try:
                resolve_guidance_config(self.guidance)
            except ValueError as error:
                errors.extend(str(error).split("\n  - ")[1:])
            errors.extend(guidance_conflicts(self))
        for name, (off, why) in UNSUPPORTED_AR_FIELDS.items():
            value = getattr(self, name, None)
            if value is not None and value != off:
                errors.append(f"{name}={value!r} is not supported by diffusion decoding ({why}); leave it unset.")
        if errors:
            raise ValueError("Invalid diffusion generation config:\n  - " + "\n  - ".join(errors))

    def check_resolved(self) -> None:
        """Checks that need resolved values (after precedence): steps against the number of blocks."""
        num_blocks = self.max_new_tokens // (self.block_length or self.max_new_tokens)
        if self.steps % num_blocks:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of the number of blocks ({num_blocks} = max_new_tokens "
                f"{self.max_new_tokens} / block_length {self.block_length}); every block gets steps / num_blocks steps."
            )
        if self.mask_token_id is None:
            raise ValueError(
                "No mask token id: the model config has no mask_token_id and none was passed; pass mask_token_id=..."
            )

    # ------------------------------------------------------------------ transformers plumbing
    def update(self, defaults_only: bool = False, allow_custom_entries: bool = False, **kwargs) -> dict[str, Any]:
        return super().update(defaults_only=defaults_only, allow_custom_entries=allow_custom_entries,
                              **translate_aliases(kwargs))

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("_unknown_saved_fields", None)  # bookkeeping of from_dict, never saved
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        # Unset diffusion fields are left out of generation_config.json (the parent only knows its own defaults).
        return {key: value for key, value in super().to_diff_dict().items()
                if not (key in DIFFUSION_DEFAULTS and value is None)}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """As `GenerationConfig.from_dict`, remembering the saved fields this version does not know (a config written
        by a newer dlm-generation, say); `diffusion_generate` refuses to decode with them silently ignored."""
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        config._unknown_saved_fields = unknown_fields(config_dict)
        return result

    def unknown_fields(self) -> dict[str, Any]:
        """The fields this config carries (or was loaded with) that neither dlm-generation nor transformers knows."""
        return {**getattr(self, "_unknown_saved_fields", {}), **unknown_fields(vars(self))}

    def drop_unknown_fields(self) -> dict[str, Any]:
        """Forget the unknown fields (decode without them); returns what was dropped."""
        dropped = self.unknown_fields()
        for key in dropped:
            self.__dict__.pop(key, None)
        self._unknown_saved_fields = {}
        return dropped

    def check_no_unknown_saved_fields(self, where: str) -> None:
        check_no_unknown_fields(self.unknown_fields(), where)

    @classmethod
    def from_model_config(cls, model_config) -> DiffusionGenerationConfig:
        """Special token ids (mask, eos, pad, bos) come from the model config; everything else stays unset."""
        config_dict = model_config if isinstance(model_config, dict) else model_config.to_dict()
        keys = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")
        config = cls(**{key: config_dict[key] for key in keys if config_dict.get(key) is not None})
        config._from_model_config = True
        config._original_object_hash = hash(config)
        return config

    @classmethod
    def from_generation_config(cls, config: GenerationConfig | None) -> DiffusionGenerationConfig:
        """Accept a plain `GenerationConfig` (e.g. a pipeline's) and keep every field it carries."""
        if config is None or isinstance(config, cls):
            return copy.deepcopy(config)
        return cls(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})

    def explicit_fields(self) -> dict[str, Any]:
        """The fields this config sets (non-None) among those the diffusion loop reads."""
        return {name: getattr(self, name) for name in LIBRARY_DEFAULTS if getattr(self, name, None) is not None}


# Fields older transformers versions wrote into generation_config.json and later dropped: not from a newer version.
LEGACY_GENERATION_FIELDS = {"return_legacy_cache", "forced_decoder_ids", "trust_remote_code", "generation_kwargs",
                            "use_cache", "transformers_version"}


def unknown_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The entries of a config dict that no version of the loop reads: not a field of DiffusionGenerationConfig (nor of
    its parent), not an alias, not private, not a legacy transformers field, and not None."""
    known = _known_fields()
    return {key: value for key, value in fields.items()
            if key not in known and key not in LEGACY_GENERATION_FIELDS and not key.startswith("_") and value is not None}


@functools.lru_cache(maxsize=1)
def _known_fields() -> frozenset[str]:
    return frozenset(vars(DiffusionGenerationConfig())) | frozenset(ALIASES)


def check_no_unknown_fields(unknown: dict[str, Any], where: str) -> None:
    if unknown:
        raise ValueError(
            f"{where} has field(s) this version of dlm-generation does not know: {sorted(unknown)} (written by a "
            "newer version, or another library?). Decoding without them could differ from what the config intends: "
            "upgrade dlm-generation (pip install -U dlm-generation), or decode without them: call "
            ".drop_unknown_fields() on that config (e.g. model.generation_config), or delete them from "
            "generation_config.json."
        )


# What AR guidance replaces: dropped when inherited from the model's generation_config by a call that asks for guidance.
GUIDANCE_REPLACES = ("threshold", "factor", "entropy_bound", "temperature", "do_sample")
# The parallel-decoding policies: alternatives, one of which a call (or its passed config) may choose over the others
# that it would only inherit from the model's generation_config or the family's defaults.
POLICY_FIELDS = ("threshold", "factor", "entropy_bound")


def guidance_conflicts(config) -> list[str]:
    """What an AR-guided config sets that guidance replaces (the guide decides what to commit and drafts at its own
    temperature)."""
    conflicts = []
    for name in ("threshold", "factor", "entropy_bound"):
        if getattr(config, name, None) is not None:
            conflicts.append(f"{name}={getattr(config, name)!r} cannot be combined with guidance: the guide decides "
                             f"which proposals to commit; pass {name}=None.")
    temperature = getattr(config, "temperature", None)
    if is_number(temperature) and temperature > 0:
        conflicts.append(f"temperature={temperature!r}: with guidance the drafts are drawn at guidance"
                         "['draft_temperature']; set that instead and leave temperature at 0.")
    return conflicts


def check_known_kwargs(kwargs: dict[str, Any], extra_names: set[str]) -> None:
    """Raise on a keyword that is neither a config field, an alias, nor one of `extra_names`."""
    known = set(vars(DiffusionGenerationConfig())) | set(ALIASES) | extra_names
    unknown = [key for key in kwargs if key not in known or key.startswith("_")]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(k for k in known if not k.startswith("_")), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"Unknown argument(s) {', '.join(hints)} for diffusion generation. Valid names are the fields of "
            "DiffusionGenerationConfig (see its docstring), the LLaDA aliases gen_length/mask_id/remasking, and "
            f"the model inputs {sorted(extra_names)}."
        )


__all__ = ["DiffusionGenerationConfig"]
