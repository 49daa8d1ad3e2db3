"""`DiffusionGenerationMixin`: the one denoising loop, then its helpers in call order.

Mixed into a `PreTrainedModel` that declares two class attributes:

* `diffusion_logits_shift` (int): 0 if position i predicts token i (LLaDA), 1 if the prediction for position i is
  read at position i - 1 (Dream, adapted from an autoregressive model).
* `diffusion_generation_defaults` (dict): the family's defaults (schedule, alg, ...), the layer just above the
  library defaults in the precedence rule.

This file travels with saved models, so it imports only torch, transformers and sibling files.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.logits_process import SuppressTokensLogitsProcessor
from transformers.utils import ModelOutput

from .configuration_diffusion import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_MAX_NEW_TOKENS,
    GUIDANCE_REPLACES,
    LIBRARY_DEFAULTS,
    POLICY_FIELDS,
    DiffusionGenerationConfig,
    check_no_unknown_fields,
    unknown_fields,
    check_known_kwargs,
    guidance_conflicts,
    translate_aliases,
)
from .diffusion_cache import CacheStep, DiffusionCache, StepOutcome
from .diffusion_caches import DIFFUSION_CACHE_CLASSES
from .diffusion_guidance import ARGuide, check_shared_vocabulary, resolve_guidance_config
from .diffusion_strategies import (
    NEG_INF,
    PolicyCommitRule,
    StepContext,
    build_strategies,
    propose_tokens,
    token_entropy,
)

MODEL_INPUT_NAMES = {"input_ids", "attention_mask", "tokenizer", "assistant_tokenizer"}
# Arguments that pipelines and upstream `generate` callers pass and that have no effect on diffusion decoding.
IGNORED_GENERATE_ARGS = {"use_cache", "synced_gpus", "prefix_length"}


@dataclass
class DiffusionGenerateOutput(ModelOutput):
    """Result of `diffusion_generate(..., return_dict_in_generate=True)`.

    Attributes:
        sequences: (batch, prompt_len + max_new_tokens) prompt followed by the completion. With `eos_early_stop` or
            `stop_strings`, the positions after the first stop are `pad_token_id`.
        nfe: number of model forward passes (full or partial) made by this call; a CFG forward of the doubled batch
            counts once.
        tokens_per_forward: (batch,) generated tokens up to and including the first stop token, divided by `nfe`.
        history: with `output_history=True`, the canvas after every step (list of (batch, length) tensors).
        confidences: with `output_confidences=True`, (batch, max_new_tokens) float32: for every generated position
            the score its token was committed with, at the step it was committed (for `alg="low_confidence"` the
            model's probability of that token, so confidences can be checked against correctness); NaN where
            nothing was committed (positions a stop filled with padding).
        commit_steps: with `output_commit_steps=True`, (batch, max_new_tokens) int64: the forward pass (1-based,
            counted like `nfe`) after which each generated position stopped being a mask: committed, or filled with
            `pad_token_id` when its row stopped (a committed position that a stop later overwrote with padding keeps
            the step its token was committed at). Positions committed by the same forward share a value, so the
            tensor shows the decoding order and how many tokens each forward settled.
            dlm-generation's `visualize` module turns it into a picture or a terminal rendering.
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    tokens_per_forward: torch.Tensor | None = None
    history: list[torch.LongTensor] | None = None
    confidences: torch.FloatTensor | None = None
    assistant_forwards: int | None = None
    commit_steps: torch.LongTensor | None = None


def generated_lengths(completions: torch.Tensor, eos_token_id: int | list[int] | torch.Tensor | None) -> torch.Tensor:
    """Tokens per row of `completions` (batch, length) up to and including the first stop token.

    `eos_token_id` is one id, a list / tuple / 1-D tensor of ids, or None; a row without a stop token (or any row,
    when there are no stop ids) counts its whole length. Returns an int64 tensor (batch,) on `completions`' device.
    This is how `tokens_per_forward` counts generated tokens; cut a completion with
    `sequences[:, prompt_len:][row, :length]`.
    """
    if eos_token_id is None:
        stops = torch.empty(0, dtype=torch.long)
    elif isinstance(eos_token_id, torch.Tensor):
        stops = eos_token_id.reshape(-1)
    else:
        stops = torch.tensor(list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id],
                             dtype=torch.long)
    full = torch.full((completions.shape[0],), completions.shape[1], dtype=torch.long, device=completions.device)
    if not stops.numel():
        return full
    is_stop = torch.isin(completions, stops.to(completions.device))
    return torch.where(is_stop.any(-1), is_stop.long().argmax(-1) + 1, full)


@dataclass
class DecodeRules:
    """What one `diffusion_generate` call decides once and every step reads: the resolved config and the objects
    built from it (strategies keep per-block counters, reset by `begin_block`)."""

    config: DiffusionGenerationConfig
    strategies: Any
    processors: LogitsProcessorList
    criteria: StoppingCriteriaList
    stop_ids: torch.Tensor
    excluded_ids: torch.Tensor | None
    draft_temperature: float
    mask_id: int
    mask_index: torch.Tensor  # (1,) the mask id, never proposed as a token
    commit_rule: Any  # which positions a step commits, with which tokens: the policy's rule, or the AR guide
    shift: int  # the model's logit shift (Dream 1: position i is read at i - 1)
    block_length: int
    num_blocks: int
    steps_in_block: int
    tokenizer: Any = None
    # The blocks in order: (start, end, origin) canvas positions; commits go from start to end, `origin` is where
    # the block begins in the model's block layout (a block-diffusion model's blocks are aligned to its trained block
    # size, so the first one may begin inside the prompt); sub-blocks are counted from it.
    blocks: list = None
    sub_block_length: int | None = None
    suffix_window: int | None = None  # DPad: positions after the block that enter a forward (None: all)


@dataclass
class DecodeState:
    """Everything a `diffusion_generate` call's denoising loop reads and changes, step after step.

    The canvas (prompt + generated positions, mask ids where nothing is committed yet), the rows already finished,
    the model inputs that stay fixed (padding mask, position ids, CFG's unconditional prompt), the cache and the AR
    guide, the forward count, the recorders (history, confidences, commit steps, streamer) and the block in
    progress: its index and span, the first position that can change (`window_start`), the step within it.
    """

    canvas: torch.Tensor
    finished: torch.Tensor
    prompt_len: int
    padding_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    uncond_prompt: torch.Tensor | None
    cache: DiffusionCache
    guide: ARGuide | None = None
    nfe: int = 0
    # True once a forward gave non-finite logits at a position it could commit; computed on the device and read at
    # the step's one host sync, so the check costs no extra synchronisation.
    nonfinite: torch.Tensor | None = None
    history: list | None = None
    confidences: torch.Tensor | None = None
    commit_steps: torch.Tensor | None = None
    streamer: Any = None
    streamed: int = 0
    drafts: bool = False
    full_drafts: bool = False
    block: int = 0
    block_start: int = 0
    block_end: int = 0
    window_start: int = 0
    step: int = 0
    fill_steps: int = 0  # forwards of the block that only filled the cache (not denoising steps of the schedule)
    max_steps: int = 0
    in_block: bool = False  # block `block` has been started and may have eligible masks left
    block_origin: int = 0


@dataclass
class PlannedStep:
    """A denoising step before its forward: the cache's plan, the window of canvas positions [step_start, step_end)
    whose logits it computes, and there the masked positions of unfinished rows it may commit (`eligible`)."""

    plan: CacheStep
    step_start: int
    step_end: int
    eligible: torch.Tensor


@dataclass
class ForwardInputs:
    """One step's model inputs: ids and position ids of the positions it runs (batch, queries), the key mask
    (batch, key_end) or None, and the logits to keep: indices into the queries (window,), or per row (batch, window).
    With classifier-free guidance the batch is doubled (conditional rows first) and `cfg_scale` is set."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    keep: torch.Tensor
    key_end: int
    cfg_scale: float | None = None

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """The forward's kept logits for these inputs -> the step's logits (CFG's two halves combined)."""
        if self.cfg_scale is None:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + (self.cfg_scale + 1) * (cond - uncond)


class DiffusionGenerationMixin(GenerationMixin):
    """Adds `diffusion_generate()` and a pipeline-compatible `generate()` to a masked-diffusion LM."""

    generation_config_class = DiffusionGenerationConfig
    diffusion_logits_shift: int = 0
    diffusion_generation_defaults: dict[str, Any] = {}
    diffusion_threshold_strict: bool = False  # the family's threshold rule: confidence > threshold (else >=)
    diffusion_block_causal: bool = False  # block-diffusion attention (causal across blocks): its own caches
    # SDAR's reference rules (all False: LLaDA / Dream / Fast-dLLM): a threshold step commits at least the schedule's
    # count (else at least one); the linear schedule spreads the block's aligned length over its steps (else its
    # masks); eos_early_stop finishes a row once the block holding its stop token is complete (else at once).
    diffusion_threshold_at_least_count: bool = False
    diffusion_schedule_aligned: bool = False
    diffusion_stop_at_block_end: bool = False

    @property
    def diffusion_threshold_off(self) -> float | None:
        """The `threshold` value that turns threshold decoding off for this model. None, unless the family's
        defaults hold a threshold (Fast-dLLM v2: 0.9), which `threshold=None` in a call falls back to: then 1.0,
        which its strict rule (probability > threshold) never passes, so a step commits only its most confident
        position (the schedule's one token), as the reference's `generate` does by default."""
        if self.diffusion_generation_defaults.get("threshold") is None:
            return None
        if not self.diffusion_threshold_strict:
            raise NotImplementedError("a family default threshold needs a strict rule for threshold=1.0 to be off")
        return 1.0

    @torch.no_grad()
    def diffusion_generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer=None,
        past_key_values: DiffusionCache | None = None,
        assistant_model=None,
        **kwargs,
    ) -> DiffusionGenerateOutput | torch.LongTensor:
        """Fill `max_new_tokens` masked positions after the prompt by iterative unmasking.

        1. Resolve the config: call kwargs > `generation_config` > `model.generation_config` > family defaults >
           library defaults (a guided call drops the threshold / factor / temperature it would only inherit);
           validate it; unknown kwargs raise.
        2. Build the canvas: prompt followed by `max_new_tokens` mask ids, padding mask and position ids.
        3. Turn strings into objects: schedule, commit policy, cache, logits processors, stopping criteria.
        4. For each block (`_begin_block`), until it has no eligible masks (masks before the block end, in
           unfinished rows), one denoising step: `_next_step` plans it (4.1), `_step_inputs` + `_forward_logits` run
           the forward, `_finish_step` does the rest (4.2-4.5), on the call's `DecodeState` and `DecodeRules`:
           4.1 ask the cache which positions this step runs; run the model on them and read the logits of the
               positions that can change and have fresh logits;
           4.2 apply the model's logit shift, classifier-free guidance and the logits processors;
           4.3 propose a token and a confidence at every position;
           4.4 choose the positions to commit (schedule count + policy; masks the block's later steps get no fresh
               logits for are committed now, greedily, and alone) and commit them;
           4.5 finish rows: `eos_early_stop`, `stop_strings`, stopping criteria.
        5. Return `sequences` (and `nfe`, `tokens_per_forward`, `history`, `confidences` with
           `return_dict_in_generate=True`).

        Args:
            inputs / input_ids: (batch, prompt_len) prompt ids; batches are left-padded.
            attention_mask: (batch, prompt_len), 0 on padding.
            generation_config: a `DiffusionGenerationConfig` (or plain `GenerationConfig`) for this call.
            logits_processor: `LogitsProcessor`s called as `processor(canvas, logits)` with `canvas` (batch, length)
                and `logits` (batch, window, vocab) before tokens are proposed. Processors that act on the vocabulary
                axis only are shape-safe: `SuppressTokensLogitsProcessor`, `TemperatureLogitsWarper`,
                `TopKLogitsWarper`, `NoBadWordsLogitsProcessor` with single-token bad words is NOT (it reads the canvas
                as a left-to-right history), nor are `TopPLogitsWarper`, `MinPLogitsWarper` or
                `RepetitionPenaltyLogitsProcessor` (they index dimension 1 as the vocabulary); use the config's
                `top_p` instead.
            stopping_criteria: `StoppingCriteria`s called as `criterion(canvas, None)` after every step; a row for
                which one returns True is finished and its remaining masks become `pad_token_id`.
            streamer: follows transformers' streamer protocol. `put` receives the prompt, then each newly settled
                token run (generated tokens before the first mask); a streamer with `put_draft` (such as
                `TextDiffusionStreamer`) also receives, after every forward, the canvas after that settled text,
                masks included;
                `end` is called when decoding is done. These streamers handle one row; for batches use a streamer
                whose `supports_batch` is True (dlm-generation's `CanvasStreamer`), which then receives the prompt
                and, as drafts, the whole generated canvas of every row, but no settled runs.
            past_key_values: a `DiffusionCache` instance (overrides `cache_implementation`).
            assistant_model: the AR guide of AR-guided diffusion (a causal LM sharing the tokenizer); its options
                are the config's `guidance` dict (deterministic acceptance when unset). Without it, a config whose
                `guidance` names an `assistant_model_id` loads that guide (once per model).
            assistant_tokenizer: the guide's tokenizer, for the vocabulary check (default: loaded from the guide's
                `name_or_path`); `tokenizer` is the diffusion model's (default: loaded from its `name_or_path`).
            kwargs: any `DiffusionGenerationConfig` field or LLaDA alias (`gen_length`, `mask_id`, `remasking`).
        """
        # 1. config and inputs
        if inputs is not None and kwargs.get("input_ids") is not None:
            raise ValueError("Pass the prompt either positionally (inputs) or as input_ids=, not both.")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        tokenizer = kwargs.pop("tokenizer", None)
        assistant_tokenizer = kwargs.pop("assistant_tokenizer", None)
        config = self._prepare_generation_config(generation_config, kwargs, guided=assistant_model is not None,
                                                 cache=past_key_values)
        input_ids, attention_mask = self._prepare_prompt(input_ids, attention_mask, config)
        given_prompt, input_ids = input_ids, self._unmask_padding(input_ids, attention_mask, config)
        batch, prompt_len = input_ids.shape
        drafts = self._check_streamer(streamer, batch)
        config = self._resolve_lengths(config, prompt_len)
        guidance, assistant_model, hidden_ids = self._prepare_guidance(
            config, assistant_model, tokenizer, assistant_tokenizer, input_ids.device
        )

        if self.diffusion_block_causal and (batch > 1 or (attention_mask is not None and not bool(attention_mask.all()))):
            # Block-diffusion rows have their own block layout (aligned from each row's first real token): each row
            # decodes on its own state, and the rows' steps share one forward.
            return self._diffusion_generate_rows(input_ids, attention_mask, given_prompt, config, logits_processor,
                                                 stopping_criteria, streamer, past_key_values, tokenizer)

        # 2-3. canvas, strategies, cache, recorders
        state, rules = self._start_decoding(
            input_ids, attention_mask, config, logits_processor=logits_processor,
            stopping_criteria=stopping_criteria, streamer=streamer, drafts=drafts, past_key_values=past_key_values,
            guidance=guidance, assistant_model=assistant_model, hidden_ids=hidden_ids, tokenizer=tokenizer,
        )
        if streamer is not None:
            streamer.put(given_prompt.cpu())

        # 4. the denoising loop: blocks in order, each stepped until it has no eligible masks
        try:
            while (step := self._next_step(state, rules)) is not None:
                self._finish_step(state, rules, step, self._forward_logits(self._step_inputs(state, rules, step),
                                                                           state.cache))
        finally:
            state.cache.end_generation()

        # 5. outputs
        if streamer is not None:
            streamer.end()
        canvas, nfe, guide, stop_ids = state.canvas, state.nfe, state.guide, rules.stop_ids
        sequences = canvas
        if given_prompt is not input_ids:  # padding that held the mask id is returned as given
            padding = ~attention_mask.bool()
            sequences[:, :prompt_len] = torch.where(padding, given_prompt, sequences[:, :prompt_len])
        if not config.return_dict_in_generate:
            return sequences
        return DiffusionGenerateOutput(
            sequences=sequences,
            nfe=nfe,
            tokens_per_forward=generated_lengths(canvas[:, prompt_len:], stop_ids).to(torch.float32) / max(nfe, 1),
            history=state.history,
            confidences=None if state.confidences is None else state.confidences[:, prompt_len:],
            assistant_forwards=None if guide is None else guide.forwards,
            commit_steps=state.commit_steps,
        )

    def _diffusion_generate_rows(self, input_ids, attention_mask, given_prompt, config, logits_processor,
                                 stopping_criteria, streamer, past_key_values, tokenizer):
        """`diffusion_generate` for a batch of a block-diffusion model: one decode state per row (its padding
        removed), stepped together: per step one shared forward per bucket of similar query counts (`shared_forward`,
        `forward_buckets`: a row's prefill does not pad the others' block steps), so every row equals its solo call.
        `nfe` counts the shared forwards; `commit_steps` index them."""
        for name, value in (("streamer", streamer), ("past_key_values", past_key_values),
                            ("output_history", config.output_history or None)):
            if value is not None:
                raise ValueError(f"{name} is not supported for a batch (or a padded prompt) of a block-diffusion "
                                 "model; decode one unpadded prompt per call to use it.")
        batch, prompt_len = input_ids.shape
        rows = []
        for row in range(batch):
            start = 0 if attention_mask is None else int((attention_mask[row] == 0).sum())
            state, rules = self._start_decoding(input_ids[row:row + 1, start:], None, config,
                                                logits_processor=logits_processor,
                                                stopping_criteria=stopping_criteria, tokenizer=tokenizer)
            rows.append([state, rules, None, []])  # state, rules, planned step, global index of its forwards
        nfe = 0
        try:
            while True:
                for entry in rows:
                    entry[2] = None if entry[2] is False else self._next_step(entry[0], entry[1])
                    if entry[2] is None:
                        entry[2] = False  # done
                active = [entry for entry in rows if entry[2] is not False]
                if not active:
                    break
                entries = [(self._step_inputs(s, r, p), s.cache) for s, r, p, _ in active]
                for bucket in forward_buckets(entries):
                    logits = shared_forward(self, [entries[i] for i in bucket])
                    nfe += 1
                    for index, own in zip(bucket, logits):
                        state, rules, planned, forwards = active[index]
                        forwards.append(nfe)
                        self._finish_step(state, rules, planned, own)
        finally:
            for state, *_ in rows:
                state.cache.end_generation()
        sequences = torch.cat([given_prompt, given_prompt.new_zeros((batch, config.max_new_tokens))], 1)
        commit_steps = sequences.new_zeros((batch, config.max_new_tokens)) if config.output_commit_steps else None
        confidences = torch.full((batch, config.max_new_tokens), float("nan")) if config.output_confidences else None
        for row, (state, rules, _, forwards) in enumerate(rows):
            sequences[row, prompt_len:] = state.canvas[0, state.prompt_len:]
            if commit_steps is not None:
                index = torch.tensor([0, *forwards], device=sequences.device)
                commit_steps[row] = index[state.commit_steps[0]]
            if confidences is not None:
                confidences[row] = state.confidences[0, state.prompt_len:]
        if not config.return_dict_in_generate:
            return sequences
        stop_ids = rows[0][1].stop_ids
        return DiffusionGenerateOutput(
            sequences=sequences, nfe=nfe,
            tokens_per_forward=generated_lengths(sequences[:, prompt_len:], stop_ids).to(torch.float32) / max(nfe, 1),
            confidences=confidences, commit_steps=commit_steps,
        )

    def generate(self, inputs: torch.LongTensor | None = None, generation_config: GenerationConfig | None = None,
                 logits_processor=None, stopping_criteria=None, streamer=None, **kwargs):
        """Pipeline-compatible entry point: the same loop as `diffusion_generate`.

        Accepts what `pipeline("text-generation")` passes (`input_ids`, `attention_mask`, `max_new_tokens`,
        `do_sample`, `temperature`, `pad_token_id`, `generation_config`, `stop_strings`, `tokenizer`). Arguments
        that only matter to autoregressive decoding (`use_cache`, `synced_gpus`) are ignored.
        """
        for name in IGNORED_GENERATE_ARGS:
            kwargs.pop(name, None)
        return self.diffusion_generate(
            inputs, generation_config=generation_config, logits_processor=logits_processor,
            stopping_criteria=stopping_criteria, streamer=streamer, **kwargs,
        )

    # ------------------------------------------------------------------------------- 2-3. the decode state
    def _start_decoding(self, input_ids, attention_mask, config, *, logits_processor=None, stopping_criteria=None,
                        streamer=None, drafts=False, past_key_values=None, guidance=None, assistant_model=None,
                        hidden_ids=(), tokenizer=None) -> tuple[DecodeState, DecodeRules]:
        """The decode state and rules of prompts `input_ids` (batch, prompt_len; left-padded, padding unmasked) under
        a resolved `config`: the canvas (prompt + `max_new_tokens` masks), padding mask, position ids, the strategies,
        cache (its `begin_generation` called), logits processors, stopping criteria, AR guide and recorders."""
        batch, prompt_len = input_ids.shape
        mask_id = config.mask_token_id
        mask_index = torch.tensor([mask_id], device=input_ids.device)  # never drawn as a token
        canvas = torch.cat([input_ids, input_ids.new_full((batch, config.max_new_tokens), mask_id)], dim=1)
        length = canvas.shape[1]
        padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            padding_mask = torch.cat([attention_mask.bool(), attention_mask.new_ones((batch, config.max_new_tokens)).bool()], 1)
        position_ids = self._canvas_position_ids(padding_mask, batch, length, canvas.device)
        uncond_prompt = None
        if config.cfg_scale > 0:
            uncond_prompt = input_ids.masked_fill(input_ids != mask_id, mask_id)
        strategies = build_strategies(config, self.diffusion_threshold_strict, self.diffusion_threshold_at_least_count)
        cache = self._prepare_diffusion_cache(config, past_key_values)
        if config.suffix_window is not None and not cache.honours_forward_end():
            name = getattr(cache, "cache_name", None) or type(cache).__name__
            raise ValueError(
                f"suffix_window={config.suffix_window} needs a cache whose forwards can end after the block; the "
                f"{name!r} cache chooses positions over the whole canvas. Use suffix_window with no cache or with "
                "'prefix', 'dual', 'freecache' or 'elastic', or drop suffix_window.")
        processors = self._prepare_logits_processors(config, logits_processor, canvas.device)
        criteria = StoppingCriteriaList(stopping_criteria or [])
        stop_ids = self._stop_token_ids(config, canvas.device)
        excluded_ids = stop_ids if config.confidence_eos_eot_inf and stop_ids.numel() else None
        guide = None
        if guidance is not None:
            guide = ARGuide(assistant_model, guidance, canvas, padding_mask, mask_id, stop_ids, hidden_ids)
        block_length = config.block_length or config.max_new_tokens
        blocks = self._diffusion_blocks(prompt_len, config.max_new_tokens, block_length)
        num_blocks = len(blocks)
        rules = DecodeRules(
            config=config, strategies=strategies, processors=processors, criteria=criteria, stop_ids=stop_ids,
            excluded_ids=excluded_ids, draft_temperature=config.temperature if guide is None else guidance["draft_temperature"],
            mask_id=mask_id, mask_index=mask_index,
            commit_rule=PolicyCommitRule(strategies.policy) if guide is None else guide,
            shift=self.diffusion_logits_shift, block_length=block_length, num_blocks=num_blocks,
            steps_in_block=config.steps // (config.max_new_tokens // block_length), tokenizer=tokenizer,
            blocks=blocks, sub_block_length=config.sub_block_length,
            suffix_window=config.suffix_window,
        )
        state = DecodeState(
            canvas=canvas, finished=torch.zeros(batch, dtype=torch.bool, device=canvas.device), prompt_len=prompt_len,
            padding_mask=padding_mask, position_ids=position_ids, uncond_prompt=uncond_prompt, cache=cache,
            guide=guide, nonfinite=torch.zeros((), dtype=torch.bool, device=canvas.device),
            history=[] if config.output_history else None,
            confidences=canvas.new_full(canvas.shape, float("nan"), dtype=torch.float32)
            if config.output_confidences else None,
            commit_steps=canvas.new_zeros((batch, config.max_new_tokens)) if config.output_commit_steps else None,
            streamer=streamer, streamed=prompt_len, drafts=drafts,
            full_drafts=drafts and getattr(streamer, "supports_batch", False),
        )
        cache.begin_generation(canvas, padding_mask, mask_id, prompt_length=prompt_len, logits_shift=rules.shift,
                               guided_frontier=0 if guide is None else guidance["verify_chunk"])
        return state, rules

    @staticmethod
    def _diffusion_blocks(prompt_len: int, max_new_tokens: int, block_length: int) -> list[tuple[int, int, int]]:
        """The blocks of the canvas as (start, end, origin): `block_length` positions each from the prompt's end."""
        return [(prompt_len + k * block_length, prompt_len + (k + 1) * block_length, prompt_len + k * block_length)
                for k in range(max_new_tokens // block_length)]

    # --------------------------------------------------------------------------------------- 4. the loop
    def _next_step(self, state: DecodeState, rules: DecodeRules) -> PlannedStep | None:
        """Plan the next denoising step (4.1's choice of positions), moving on to the next block when the one in
        progress has no eligible masks left; None when decoding is done. Raises if the previous forward gave
        non-finite logits where it could commit."""
        while True:
            if state.in_block:
                step = self._plan_step(state, rules)
                if step is not None:
                    return step
                state.in_block = False
                state.block += 1
            if state.block >= rules.num_blocks:
                return None
            state.in_block = self._begin_block(state, rules, state.block)
            if not state.in_block:
                state.block += 1

    def _begin_block(self, state: DecodeState, rules: DecodeRules, block: int) -> bool:
        """Start block `block`: False when no unfinished row has a mask before its end (nothing to decode)."""
        block_start, block_end, state.block_origin = rules.blocks[block]
        is_mask = state.canvas[:, :block_end] == rules.mask_id
        eligible_counts = (is_mask & ~state.finished[:, None]).sum(-1)
        if not bool((eligible_counts > 0).any()):
            return False
        # The positions that can change in this block: from the first eligible mask to the block end.
        state.window_start = int(is_mask.any(0).nonzero()[0])
        counted = eligible_counts
        if self.diffusion_schedule_aligned:  # the reference's count per step: the aligned block over its steps
            counted = torch.full_like(eligible_counts, block_end - state.block_origin)
        rules.strategies.schedule.begin_block(counted, rules.steps_in_block)
        rules.strategies.policy.begin_block(eligible_counts, rules.steps_in_block)
        state.block, state.block_start, state.block_end = block, block_start, block_end
        state.cache.begin_block(state.block_start, block_end)
        if rules.suffix_window is not None:  # DPad: the forwards of this block end this far after it
            state.cache.forward_end = min(state.canvas.shape[1], block_end + rules.suffix_window)
        state.step = state.fill_steps = 0
        # Every policy commits at least one token per row within its step budget, so this bound is never reached;
        # it turns a future policy bug into an error instead of a hang.
        state.max_steps = rules.steps_in_block + (block_end - state.window_start)
        return True

    def _plan_step(self, state: DecodeState, rules: DecodeRules) -> PlannedStep | None:
        """The next step of the block in progress: the cache's plan and the window of positions it can commit; None,
        without a forward, once the block has no eligible masks left."""
        canvas, window_start, block_end, shift = state.canvas, state.window_start, state.block_end, rules.shift
        block_masks = (canvas[:, window_start:block_end] == rules.mask_id) & ~state.finished[:, None]
        if rules.sub_block_length is None:
            masks_left, broken = torch.stack([block_masks.any(), state.nonfinite]).tolist()  # the step's host sync
        else:  # the same sync also reads the first eligible mask (whose sub-block this step commits in)
            masks_left, broken, first = torch.stack([block_masks.any().long(), state.nonfinite.long(),
                                                     block_masks.any(0).long().argmax()]).tolist()
        if broken:  # the forward just run (number `nfe`)
            raise self._nonfinite_logits_error(state.nfe, state.block, rules.num_blocks)
        if not masks_left:
            return None
        if state.step >= state.max_steps:
            config = rules.config
            raise RuntimeError(
                f"diffusion_generate made no progress: block {state.block} still has masked positions after"
                f" {state.step} steps (alg={config.alg!r}, threshold={config.threshold}, factor={config.factor})."
                " Please report this with the configuration."
            )
        plan = state.cache.plan_step(canvas, state.step)
        # The positions whose logits this forward computes (a shifted model reads position i at i - 1).
        step_start = max(window_start, plan.query_start + shift)
        step_end = min(block_end, plan.query_end + shift)
        if rules.sub_block_length is not None:
            size, origin = rules.sub_block_length, state.block_origin
            sub_start = origin + (window_start + first - origin) // size * size
            step_start, step_end = max(step_start, sub_start), min(step_end, sub_start + size)
        step_end = max(step_end, step_start)  # an empty window: a forward that only fills the cache
        eligible = block_masks[:, step_start - window_start : step_end - window_start]
        if plan.row_queries is not None:  # each row commits only where its own logits are fresh
            sources = torch.arange(step_start, step_end, device=canvas.device) - shift - plan.query_start
            eligible = eligible & plan.row_queries[:, sources]
        return PlannedStep(plan, step_start, step_end, eligible)

    def _step_inputs(self, state: DecodeState, rules: DecodeRules, step: PlannedStep) -> ForwardInputs:
        """The model inputs of a planned step: the plan's positions [plan.query_start, plan.query_end) (or its
        scattered positions), attending to keys [0, plan.key_end); the logits to keep are those of the step's window
        [step_start, step_end), read at the plan's positions moved left by the model's logit shift. Classifier-free
        guidance doubles the batch (conditional rows first)."""
        canvas, plan, shift = state.canvas, step.plan, rules.shift
        start, end = plan.query_start, plan.query_end
        # Position i reads the prediction made at i - shift (position 0 reads its own).
        keep = (torch.arange(step.step_start, step.step_end, device=canvas.device) - shift).clamp_min(0) - start
        mask = self._step_attention_mask(state, rules, plan)
        if plan.positions is not None:  # scattered positions: run those, then read the window's logits from them
            slots = torch.zeros((canvas.shape[0], end - start), dtype=torch.long, device=canvas.device)
            slots.scatter_(1, plan.positions - start, torch.arange(plan.positions.shape[1], device=canvas.device)
                           .expand_as(plan.positions))
            keep = slots[:, keep]  # (batch, window): each window position's row in the forward (stale where unused)
            inputs, positions = canvas.gather(1, plan.positions), state.position_ids.gather(1, plan.positions)
        else:
            inputs, positions = canvas[:, start:end], state.position_ids[:, start:end]
        cfg_scale = None
        if state.uncond_prompt is not None:
            cfg_scale = rules.config.cfg_scale
            uncond = canvas.clone()
            uncond[:, : state.uncond_prompt.shape[1]] = state.uncond_prompt
            uncond_inputs = uncond.gather(1, plan.positions) if plan.positions is not None else uncond[:, start:end]
            inputs = torch.cat([inputs, uncond_inputs])
            mask = torch.cat([mask, mask]) if mask is not None else None
            positions = torch.cat([positions, positions])
            if keep.dim() == 2:
                keep = torch.cat([keep, keep])
        return ForwardInputs(inputs, positions, mask, keep, plan.key_end, cfg_scale)

    def _step_attention_mask(self, state: DecodeState, rules: DecodeRules, plan: CacheStep) -> torch.Tensor | None:
        """The attention mask of a planned forward: (batch, key_end) padding and per-row keys, or None (full
        attention). A block-diffusion model returns its (batch, 1, queries, key_end) block-causal mask."""
        mask = state.padding_mask[:, : plan.key_end] if state.padding_mask is not None else None
        if plan.row_keys is not None:
            mask = plan.row_keys if mask is None else mask.bool() & plan.row_keys
        return mask

    def _forward_logits(self, inputs: ForwardInputs, cache: DiffusionCache) -> torch.Tensor:
        """Run the model on `inputs` with `cache`: the kept logits (batch, window, vocab), CFG combined."""
        keep = inputs.keep
        logits = self(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                      position_ids=inputs.position_ids, past_key_values=cache,
                      logits_to_keep=0 if keep.dim() == 2 else keep).logits
        if keep.dim() == 2:  # per-row positions of a scattered forward
            logits = logits.gather(1, keep[..., None].expand(-1, -1, logits.shape[-1]))
        return inputs.combine(logits)

    def _finish_step(self, state: DecodeState, rules: DecodeRules, step: PlannedStep, logits: torch.Tensor) -> None:
        """The rest of a denoising step once its forward gave `logits` (batch, window, vocab) (4.2-4.5): logits
        processors, proposals, commits, finished rows, recorders."""
        config, cache, canvas = rules.config, state.cache, state.canvas
        step_start, step_end, eligible = step.step_start, step.step_end, step.eligible
        window = canvas[:, step_start:step_end]
        remaining = eligible.sum(-1)
        state.nfe += 1
        if step_end == step_start:  # a forward that only filled the cache (a block-diffusion prompt's prefill)
            cache.end_step(StepOutcome(canvas, step_start, step_end, eligible, eligible, None))
            state.step += 1
            state.fill_steps += 1
            return
        # A row's maximum logit is NaN or +inf when any logit is NaN or +inf (or all are -inf).
        state.nonfinite = (~torch.isfinite(logits.amax(-1)) & eligible).any()
        for processor in rules.processors:
            logits = processor(canvas, logits)
        # 4.3 proposals
        proposal = propose_tokens(
            logits, rules.strategies.alg, rules.draft_temperature, config.top_k, config.top_p, rules.excluded_ids,
            rules.mask_index, need_probability=cache.needs_token_probability,
        )
        scores = cache.rescore(proposal.confidence, proposal.probability, canvas, step_start, step_end)
        # EB-Sampler reads the entropy of each position's distribution
        entropy = token_entropy(logits) if rules.strategies.policy.needs_entropy else None
        if config.position_decay:  # PC-Sampler: confidence decays with the distance from the leftmost committable mask
            offsets = torch.arange(step_end - step_start, device=canvas.device)
            distance = (offsets - eligible.long().argmax(-1, keepdim=True)).clamp_min(0)
            weight = torch.exp(-config.position_decay * distance.float()).to(scores.dtype)
            scores = torch.where(scores >= 0, scores * weight, scores / weight)
            if entropy is not None:  # an uncertainty grows with the distance as a negative score does
                entropy = entropy / weight.to(entropy.dtype)
        confidence = torch.where(eligible, scores, NEG_INF)
        # 4.4 commit
        schedule = rules.strategies.schedule
        denoising_step = state.step - state.fill_steps  # the schedule counts denoising steps only
        ctx = StepContext(step=denoising_step, count=schedule.count(denoising_step, remaining), remaining=remaining,
                          schedule=schedule, entropy=entropy)
        commit, tokens = rules.commit_rule.choose(canvas, proposal.tokens, confidence, eligible, ctx, step_start)
        unseen_later = cache.settled_before() + rules.shift  # later steps of this block see no logits left of it
        if unseen_later > step_start:
            # Masks there get no fresh logits later in this block: they are committed now, greedily or as drawn.
            forced = eligible & (torch.arange(step_start, step_end, device=canvas.device) < unseen_later)
            commit = rules.commit_rule.merge_forced(commit, forced)
        canvas[:, step_start:step_end] = torch.where(commit, tokens, window)
        if state.confidences is not None:
            seen = state.confidences[:, step_start:step_end]
            state.confidences[:, step_start:step_end] = torch.where(commit, proposal.confidence.float(), seen)
        cache.end_step(StepOutcome(canvas, step_start, step_end, eligible, commit, proposal.probability))
        state.step += 1
        # 4.5 finished rows
        state.finished = self._update_finished(canvas, state.finished, state.prompt_len, rules.stop_ids,
                                               rules.criteria, config, rules.tokenizer,
                                               state.block_end if self.diffusion_stop_at_block_end else None)
        self._record_step(state, rules)
        # Finished rows have no eligible masks, so the check of the next plan (the step's only host sync, which also
        # reads this step's non-finite flag) ends the block, and every later block, once all rows are finished.

    def _record_step(self, state: DecodeState, rules: DecodeRules) -> None:
        """After a step: history, commit steps and the streamer's settled text and draft."""
        canvas, prompt_len = state.canvas, state.prompt_len
        if state.history is not None:
            state.history.append(canvas.clone())
        if state.commit_steps is not None:
            settled_now = (state.commit_steps == 0) & (canvas[:, prompt_len:] != rules.mask_id)
            state.commit_steps.masked_fill_(settled_now, state.nfe)
        streamer = state.streamer
        if streamer is not None and canvas.shape[0] == 1:
            state.streamed = self._stream_settled(streamer, canvas, state.streamed, rules.mask_id)
        if state.drafts:  # a one-row streamer's draft follows its settled text; a batch streamer sees it all
            streamer.put_draft(canvas[:, prompt_len if state.full_drafts else state.streamed:].cpu())

    # ------------------------------------------------------------------------------------------ 1. config
    def _prepare_generation_config(self, generation_config: GenerationConfig | None, kwargs: dict,
                                   guided: bool = False, cache: Any = None) -> DiffusionGenerationConfig:
        """Apply the precedence rule once; return a validated, fully resolved config. Consumes `kwargs`.

        When this call asks for AR guidance (`guidance=` in the call or in the passed config, or `guided`: an
        `assistant_model` was passed), the settings guidance replaces (`threshold`, `factor`, a sampling
        `temperature`, `alg='confidence_threshold'`) are dropped if they come only from the model's own
        generation_config or the family defaults: a model that ships a fast threshold configuration still runs
        guided. Set explicitly in the call or the passed config, they raise as before.
        """
        check_known_kwargs(kwargs, MODEL_INPUT_NAMES)
        for source, where in ((self.generation_config, "The model's generation_config"),
                              (generation_config, "The generation_config passed to this call")):
            if isinstance(source, DiffusionGenerationConfig):
                source.check_no_unknown_saved_fields(where)
            elif source is not None:  # a plain GenerationConfig: the fields it carries as attributes
                check_no_unknown_fields(unknown_fields(vars(source)), where)
        call_kwargs = translate_aliases(kwargs)
        kwargs.clear()
        layers = [
            self.diffusion_generation_defaults,
            DiffusionGenerationConfig.from_generation_config(self.generation_config).explicit_fields()
            if self.generation_config is not None else {},
            DiffusionGenerationConfig.from_generation_config(generation_config).explicit_fields()
            if generation_config is not None else {},
        ]
        resolved = dict(LIBRARY_DEFAULTS)
        for layer in layers:
            resolved.update({k: v for k, v in layer.items() if v is not None})
        if guided or call_kwargs.get("guidance") is not None or layers[2].get("guidance") is not None:
            explicit = {k for k, v in call_kwargs.items() if v is not None} | set(layers[2])
            for name in GUIDANCE_REPLACES:
                if name not in explicit:
                    resolved[name] = LIBRARY_DEFAULTS[name]
            if resolved["alg"] == "confidence_threshold" and "alg" not in explicit:
                resolved["alg"] = LIBRARY_DEFAULTS["alg"]
        # Explicit call kwargs win even when None (Dream's call style passes top_p=None, alg_temp=None, ...):
        # None then means "back to the default", the family's if it has one, else the library's.
        defaults = {**LIBRARY_DEFAULTS, **self.diffusion_generation_defaults}
        resolved.update({k: (v if v is not None else defaults.get(k)) for k, v in call_kwargs.items()})
        # A parallel-decoding policy chosen by this call (or its passed config) replaces the alternatives it would
        # only inherit (a model that ships threshold 0.9 still decodes with a call's entropy_bound), and the position
        # decay that calibrates the inherited policy's scores (unless the call sets one too).
        def explicit(name: str) -> bool:
            return call_kwargs.get(name) is not None or layers[2].get(name) is not None

        chosen = {name for name in POLICY_FIELDS if explicit(name)}
        if chosen:
            for name in POLICY_FIELDS:
                if name not in chosen:
                    resolved[name] = None
            if not explicit("position_decay"):
                resolved["position_decay"] = None
        # A cache chosen by this call (a name, or an instance as past_key_values) that plans over the whole canvas
        # drops a suffix window it would only inherit (a model that ships suffix_window still runs a call's d2Cache).
        cache_chosen = cache is not None or explicit("cache_implementation")
        if resolved.get("suffix_window") is not None and cache_chosen and not explicit("suffix_window"):
            if cache is not None:
                supported = cache.honours_forward_end()
            else:
                cache_class = DIFFUSION_CACHE_CLASSES.get(resolved.get("cache_implementation"))
                supported = cache_class is None or cache_class.supports_suffix_window
            if not supported:
                resolved["suffix_window"] = None
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
            if resolved.get(name) is None:
                resolved[name] = getattr(self.config, name, None)
        if resolved["do_sample"] is False:
            resolved["temperature"] = 0.0
        if resolved["alg"] == "confidence_threshold" and resolved["threshold"] is None:
            resolved["threshold"] = DEFAULT_CONFIDENCE_THRESHOLD
        config = DiffusionGenerationConfig(**resolved)  # validates
        return config

    def _prepare_prompt(self, input_ids, attention_mask, config):
        if input_ids is None:
            raise ValueError(
                "diffusion_generate needs a prompt: pass input_ids (batch, prompt_len); for an unconditional sample "
                "pass a single bos token, e.g. torch.tensor([[bos_token_id]])."
            )
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(
                f"input_ids must be an integer tensor of shape (batch, prompt_len); got "
                f"{type(input_ids).__name__} {getattr(input_ids, 'shape', '')}. Use tokenizer(..., return_tensors='pt')."
            )
        if input_ids.device.type == "meta":
            raise ValueError("input_ids is on the meta device (shapes without data); pass real token ids, e.g. "
                             "tokenizer(..., return_tensors='pt').input_ids.")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}: pass at least one prompt of at least one token "
                "(e.g. the bos token)."
            )
        vocab = self.get_input_embeddings().num_embeddings
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"input_ids contains ids outside the model's vocabulary [0, {vocab}).")
        if config.mask_token_id is not None and config.mask_token_id >= vocab:
            raise ValueError(f"mask_token_id {config.mask_token_id} is outside the model's vocabulary [0, {vocab}); "
                             "pass mask_token_id= the id of the model's mask token (tokenizer.mask_token_id), or set "
                             "it in the model's config.")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}; "
                "they must match (1 = token, 0 = left padding)."
            )
        if attention_mask is not None and not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
            raise ValueError(
                "attention_mask has padding after real tokens; diffusion generation appends the canvas after the "
                "prompt, so pad on the left (tokenizer.padding_side = 'left')."
            )
        input_ids = input_ids.to(self.device).long()
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        if config.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        return input_ids, attention_mask

    @staticmethod
    def _pad_id(config) -> int:
        """What fills a finished row: pad_token_id, else the first EOS id (never the mask id: it would read as a
        position still to decode)."""
        if config.pad_token_id is not None:
            return config.pad_token_id
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        return eos if eos is not None else config.mask_token_id

    @staticmethod
    def _unmask_padding(input_ids, attention_mask, config):
        """Padding written with the mask id (a tokenizer whose pad token is the mask) would look like positions to
        fill; the canvas holds another id there (never attended to), and the output gets the given prompt back."""
        if attention_mask is None or config.mask_token_id is None:
            return input_ids
        padded_masks = (input_ids == config.mask_token_id) & ~attention_mask.bool()
        if not bool(padded_masks.any()):
            return input_ids
        filler = next((i for i in (config.pad_token_id, config.eos_token_id, config.bos_token_id, 0)
                       if isinstance(i, int) and i != config.mask_token_id), 0)
        return input_ids.masked_fill(padded_masks, filler)

    def _resolve_lengths(self, config: DiffusionGenerationConfig, prompt_len: int) -> DiffusionGenerationConfig:
        config = copy.deepcopy(config)
        if config.max_new_tokens is None:
            if config.max_length is not None:
                if config.max_length <= prompt_len:
                    raise ValueError(
                        f"max_length ({config.max_length}) leaves no room after the {prompt_len}-token prompt; "
                        "set max_new_tokens instead."
                    )
                config.max_new_tokens = config.max_length - prompt_len
            else:
                config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        limit_name, limit = self._position_limit()
        if limit is not None and prompt_len + config.max_new_tokens > limit:
            raise ValueError(
                f"The prompt ({prompt_len} tokens) plus max_new_tokens ({config.max_new_tokens}) needs "
                f"{prompt_len + config.max_new_tokens} positions, more than the model's {limit} "
                f"({type(self.config).__name__}.{limit_name}); shorten the prompt or lower max_new_tokens."
            )
        if config.steps is None:
            config.steps = config.max_new_tokens
        config.validate()
        config.check_resolved()
        self._check_family_settings(config)
        return config

    def _check_family_settings(self, config: DiffusionGenerationConfig) -> None:
        """Refuse resolved settings that this model family cannot honour (a full-attention model: sub-blocks)."""
        if config.sub_block_length is not None:
            raise ValueError(
                f"sub_block_length={config.sub_block_length} applies to block-diffusion models (Fast-dLLM v2); "
                f"{type(self).__name__} decodes whole blocks, so leave sub_block_length unset (None)."
            )

    def _position_limit(self) -> tuple[str, int | None]:
        """The longest canvas the model's config allows (LLaDA: max_sequence_length; Dream: max_position_embeddings),
        with the field's name."""
        for name in ("max_position_embeddings", "max_sequence_length"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return name, value
        return "", None

    # ------------------------------------------------------------------------------------------ 2-3. set-up
    def _prepare_guidance(self, config, assistant_model, tokenizer, assistant_tokenizer, device):
        """Resolve AR guidance: its options, the guide model, and the dLLM-only token ids the guide never sees.

        Returns (None, None, []) without guidance. The vocabulary check runs once per (model, guide) pair.
        """
        if config.guidance is None and assistant_model is None:
            if assistant_tokenizer is not None:
                raise ValueError("assistant_tokenizer was passed without a guide; pass assistant_model= (or drop it).")
            return None, None, []
        guidance = resolve_guidance_config(config.guidance)
        conflicts = guidance_conflicts(config)
        if conflicts:
            raise ValueError("Invalid AR-guided generation:\n  - " + "\n  - ".join(conflicts))
        if assistant_model is None:
            assistant_model = self._load_guide(guidance["assistant_model_id"])
        if not (hasattr(assistant_model, "config") and callable(assistant_model)
                and hasattr(assistant_model, "get_output_embeddings")):
            raise ValueError(
                f"assistant_model must be a transformers causal LM (e.g. AutoModelForCausalLM.from_pretrained(...)), "
                f"got {type(assistant_model).__name__}."
            )
        if isinstance(assistant_model, DiffusionGenerationMixin):
            raise ValueError("assistant_model is a diffusion model; the guide must be an autoregressive causal LM.")
        guide_device = next(assistant_model.parameters()).device
        if guide_device != device:
            raise ValueError(
                f"The guide is on {guide_device} but the prompt is on {device}; move it with assistant_model.to(...)."
            )
        config.eos_early_stop = True  # a committed stop token ends a guided row
        checked = self.__dict__.setdefault("_dlm_checked_guides", {})
        key = id(assistant_model)
        if key not in checked or checked[key][0] is not assistant_model:
            dllm_tokenizer = tokenizer or self._load_tokenizer(self, "tokenizer")
            guide_tokenizer = assistant_tokenizer or self._load_tokenizer(assistant_model, "assistant_tokenizer")
            checked[key] = (assistant_model, check_shared_vocabulary(dllm_tokenizer, guide_tokenizer))
        return guidance, assistant_model, checked[key][1]

    def _load_guide(self, model_id):
        if model_id is None:
            raise ValueError(
                "guidance needs an autoregressive guide: pass assistant_model=AutoModelForCausalLM.from_pretrained(...)"
                ", or set guidance['assistant_model_id'] in the generation config."
            )
        loaded = self.__dict__.get("_dlm_loaded_guide")
        if loaded is None or loaded[0] != model_id:
            import os

            from transformers import AutoModelForCausalLM

            source = model_id
            beside = os.path.join(str(getattr(self, "name_or_path", "") or "."), model_id)
            if not os.path.exists(model_id) and os.path.isdir(beside):
                source = beside  # a path relative to the model's own folder
            model = AutoModelForCausalLM.from_pretrained(source, dtype=self.dtype).to(self.device).eval()
            self.__dict__["_dlm_loaded_guide"] = loaded = (model_id, model)
        return loaded[1]

    @staticmethod
    def _load_tokenizer(model, argument):
        from transformers import AutoTokenizer

        source = getattr(model, "name_or_path", None)
        try:
            return AutoTokenizer.from_pretrained(source)
        except Exception as error:  # noqa: BLE001 - any loading failure gets the same advice
            raise ValueError(
                f"AR guidance checks that the guide shares the diffusion model's vocabulary, and no tokenizer could be "
                f"loaded from {source!r} ({type(error).__name__}); pass {argument}=... to diffusion_generate."
            ) from None

    @staticmethod
    def _canvas_position_ids(padding_mask, batch, length, device):
        if padding_mask is None:
            return torch.arange(length, device=device).unsqueeze(0).expand(batch, length)
        return (padding_mask.long().cumsum(-1) - 1).clamp_min(0)

    def _prepare_diffusion_cache(self, config, past_key_values) -> DiffusionCache:
        if past_key_values is not None:
            if not isinstance(past_key_values, DiffusionCache):
                raise ValueError(
                    f"past_key_values must be a DiffusionCache (got {type(past_key_values).__name__}); "
                    "autoregressive caches do not apply to diffusion decoding."
                )
            return past_key_values
        if config.cache_implementation is None:
            return DiffusionCache()
        cache_class = DIFFUSION_CACHE_CLASSES[config.cache_implementation]
        if cache_class.block_causal_only:
            raise ValueError(
                f"cache_implementation={config.cache_implementation!r} is the exact KV cache of block-diffusion models "
                f"(Fast-dLLM v2); {type(self).__name__} attends bidirectionally over the whole canvas, so a committed "
                "block's keys change as later positions are decoded. Use 'prefix', 'dual', 'dllm', 'd2cache', "
                "'freecache' or None."
            )
        # The validated config names a registered cache; the instance resolves its cache_config (the call's only
        # resolution: validation only checked it).
        return cache_class(config.cache_config)

    def _prepare_logits_processors(self, config, logits_processor, device) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if config.logits_eos_inf:
            eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
            if eos == [None]:
                raise ValueError("logits_eos_inf=True needs an eos_token_id; pass eos_token_id=...")
            processors.append(SuppressTokensLogitsProcessor(eos, device=device))
        processors.extend(logits_processor or [])
        return processors

    @staticmethod
    def _stop_token_ids(config, device) -> torch.Tensor:
        eos = config.eos_token_id
        ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if config.eot_token_id is not None:
            ids.append(config.eot_token_id)
        return torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)

    # ------------------------------------------------------------------------------------------ 4. step helpers
    def _update_finished(self, canvas, finished, prompt_len, stop_ids, criteria, config, tokenizer, block_end=None):
        """Mark rows as finished; pad what follows a row's stop (eos_early_stop, stop_strings) or its masks. With
        `block_end`, a settled stop token finishes its row only once the row has no mask before `block_end`."""
        pad_id = self._pad_id(config)
        if config.eos_early_stop and stop_ids.numel():
            generated = canvas[:, prompt_len:]
            is_mask = generated == config.mask_token_id
            masks_before = is_mask.long().cumsum(-1) - is_mask.long()
            settled_stop = torch.isin(generated, stop_ids) & (masks_before == 0)
            stopped = settled_stop.any(-1)
            if block_end is not None:
                stopped = stopped & ~is_mask[:, :block_end - prompt_len].any(-1)
            first = torch.where(stopped, settled_stop.long().argmax(-1), generated.shape[1])
            cut = (torch.arange(generated.shape[1], device=canvas.device) > first[:, None]) & ~finished[:, None]
            canvas[:, prompt_len:] = generated.masked_fill(cut, pad_id)
            finished = finished | stopped
        if config.stop_strings:
            finished = self._apply_stop_strings(canvas, finished, prompt_len, config, tokenizer, pad_id)
        if len(criteria):
            done = criteria(canvas, None) & ~finished
            canvas[:, prompt_len:] = canvas[:, prompt_len:].masked_fill(
                done[:, None] & (canvas[:, prompt_len:] == config.mask_token_id), pad_id
            )
            finished = finished | done
        return finished

    @staticmethod
    def _apply_stop_strings(canvas, finished, prompt_len, config, tokenizer, pad_id):
        """A row stops once its settled text (before the first mask) contains a stop string (kept in the output)."""
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer to read the text: pass tokenizer=... as well.")
        stops = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        for row in (~finished).nonzero().flatten().tolist():
            generated = canvas[row, prompt_len:]
            masks = (generated == config.mask_token_id).nonzero()
            settled = generated[: int(masks[0]) if len(masks) else len(generated)].tolist()
            if not any(s in tokenizer.decode(settled) for s in stops):
                continue
            end = next(i for i in range(1, len(settled) + 1) if any(s in tokenizer.decode(settled[:i]) for s in stops))
            canvas[row, prompt_len + end:] = pad_id
            finished[row] = True
        return finished

    @staticmethod
    def _check_streamer(streamer, batch: int) -> bool:
        """Refuse a one-row streamer for a batch (it would show row 0 only); say whether it takes drafts."""
        if streamer is None:
            return False
        if batch > 1 and not getattr(streamer, "supports_batch", False):
            raise ValueError(
                f"streamer={type(streamer).__name__} shows one sequence, but this call decodes {batch} rows "
                "(batch size x num_return_sequences). Stream one prompt at a time, or pass a batch-aware streamer "
                "such as CanvasStreamer from dlm-generation (any streamer whose supports_batch attribute is True)."
            )
        return callable(getattr(streamer, "put_draft", None))

    def _nonfinite_logits_error(self, forward: int, block: int, num_blocks: int) -> ValueError:
        """The error for a forward whose logits held NaN / inf at positions it could commit."""
        dtype = str(self.dtype).replace("torch.", "")
        check = ("check the checkpoint: [n for n, p in model.named_parameters() if not p.isfinite().all()] lists "
                 "the broken weights")
        if self.dtype == torch.float16:
            advice = ("float16 overflows easily: load the model with dtype=torch.bfloat16 or torch.float32, e.g. "
                      f"AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16); if that fails too, {check}")
        elif self.dtype == torch.bfloat16:
            advice = ("load the model with dtype=torch.float32, e.g. AutoModelForCausalLM.from_pretrained(path, "
                      f"dtype=torch.float32); if that fails too, {check}")
        else:
            advice = f"in {dtype} this is rarely the arithmetic's fault, so {check}"
        return ValueError(
            f"diffusion_generate: forward pass {forward} (block {block + 1} of {num_blocks}) produced non-finite "
            f"logits (NaN or inf) at positions to decode; the model's dtype is {dtype}. Decoding stopped instead of "
            f"returning tokens drawn from them: {advice}."
        )

    @staticmethod
    def _stream_settled(streamer, canvas, streamed, mask_id):
        masks = (canvas[0, streamed:] == mask_id).nonzero()
        settled_end = streamed + (int(masks[0]) if len(masks) else canvas.shape[1] - streamed)
        if settled_end > streamed:
            streamer.put(canvas[0, streamed:settled_end].cpu())
        return settled_end

    # ------------------------------------------------------------------------------------------ transformers hooks
    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             cache_dir=None, force_download=False, proxies=None, local_files_only=False, token=None,
                             revision=None, subfolder="", trust_remote_code=None, **kwargs):
        """Load `generation_config.json` as a `DiffusionGenerationConfig` (upstream would load a plain one and drop
        the diffusion fields), falling back to the model config's special tokens when the file is missing."""
        if generation_config is not None:
            self.generation_config = DiffusionGenerationConfig.from_generation_config(generation_config)
        elif pretrained_model_name_or_path is not None:
            try:
                self.generation_config = DiffusionGenerationConfig.from_pretrained(
                    pretrained_model_name_or_path, cache_dir=cache_dir, force_download=force_download,
                    proxies=proxies, local_files_only=local_files_only, token=token, revision=revision,
                    subfolder=subfolder, _from_auto=from_auto_class, _from_pipeline=from_pipeline,
                )
            except OSError:
                self.generation_config = DiffusionGenerationConfig.from_model_config(self.config)
        self._fill_generation_config_defaults()

    def _fill_generation_config_defaults(self) -> None:
        """Write the decoding defaults the model really uses into `generation_config` where it leaves them unset,
        so that what `generation_config.json` (and a pipeline) sees is what the model does: greedy, the family's
        schedule and alg, and the model config's special tokens."""
        if not isinstance(self.generation_config, DiffusionGenerationConfig):
            # A model built from a config (not from_pretrained) starts with transformers' plain GenerationConfig,
            # whose save-time validation rejects temperature=0.0 without do_sample and drops diffusion fields.
            self.generation_config = DiffusionGenerationConfig.from_generation_config(self.generation_config)
        config = self.generation_config
        defaults = {"temperature": 0.0, **self.diffusion_generation_defaults}
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
            defaults[name] = getattr(self.config, name, None)
        for name, value in defaults.items():
            if getattr(config, name, None) is None and value is not None:
                setattr(config, name, value)


# ------------------------------------------------------------------------------------------ shared forwards
class _SharedForwardCache(DiffusionCache):
    """The cache a shared forward is given: each request's rows go to that request's own cache.

    Row block i of the forward holds request i's queries at its right end (left-padded to the forward's length); its
    own cache receives exactly those queries' keys and values and returns the keys and values the request attends
    to, which are left-padded to the forward's key length (the attention mask hides the padding)."""

    def __init__(self, parts: list[tuple[slice, int, DiffusionCache]], key_length: int):
        super().__init__()
        self.parts, self.key_length = parts, key_length

    def update(self, key, value, layer_idx):
        queries = key.shape[2]
        keys, values = [], []
        for rows, length, cache in self.parts:
            own_key, own_value = cache.update(key[rows, :, queries - length:], value[rows, :, queries - length:],
                                              layer_idx)
            pad = self.key_length - own_key.shape[2]
            if pad:
                own_key, own_value = F.pad(own_key, (0, 0, pad, 0)), F.pad(own_value, (0, 0, pad, 0))
            keys.append(own_key)
            values.append(own_value)
        return torch.cat(keys), torch.cat(values)


def forward_buckets(entries: list[tuple[ForwardInputs, DiffusionCache]]) -> list[list[int]]:
    """Group step inputs whose query counts are within a factor of two (the same power-of-two bucket), so that a
    shared forward never pads a few-query step (a cached block) to a whole-canvas one: indices into `entries`."""
    buckets: dict[int, list[int]] = {}
    for index, (inputs, _) in enumerate(entries):
        buckets.setdefault(max(inputs.input_ids.shape[1] - 1, 0).bit_length(), []).append(index)
    return [buckets[key] for key in sorted(buckets)]


def shared_forwards(model, entries: list[tuple[ForwardInputs, DiffusionCache]]) -> tuple[list[torch.Tensor], int]:
    """Each entry's step logits (in order) from one shared forward per bucket (`forward_buckets`), and the number
    of forwards run."""
    results: list[torch.Tensor | None] = [None] * len(entries)
    buckets = forward_buckets(entries)
    for bucket in buckets:
        for index, logits in zip(bucket, shared_forward(model, [entries[i] for i in bucket])):
            results[index] = logits
    return results, len(buckets)


def shared_forward(model, entries: list[tuple[ForwardInputs, DiffusionCache]]) -> list[torch.Tensor]:
    """Run several requests' step inputs as one forward; returns each request's step logits, as
    `model._forward_logits(inputs, cache)` would give them alone (up to float rounding)."""
    if len(entries) == 1:
        inputs, cache = entries[0]
        return [model._forward_logits(inputs, cache)]
    queries = max(inputs.input_ids.shape[1] for inputs, _ in entries)
    key_length = max(inputs.key_end for inputs, _ in entries)
    blockwise = any(i.attention_mask is not None and i.attention_mask.dim() == 4 for i, _ in entries)
    ids, positions, masks, keeps, parts = [], [], [], [], []
    needs_mask = blockwise
    first_row = 0
    for inputs, cache in entries:
        rows, length = inputs.input_ids.shape
        pad = queries - length
        ids.append(F.pad(inputs.input_ids, (pad, 0)))
        positions.append(F.pad(inputs.position_ids, (pad, 0)))
        own = inputs.attention_mask
        device = inputs.input_ids.device
        if own is None:
            own = torch.ones((rows, inputs.key_end), dtype=torch.bool, device=device)
        own = own.bool()
        needs_mask = needs_mask or inputs.key_end < key_length or not bool(own.all())
        if blockwise:  # (rows, 1, queries, keys): each query row keeps its own mask; padded query rows see the row's
            # keys (their outputs are never read), padded keys are hidden from every query
            if own.dim() == 2:
                own = own[:, None, None, :].expand(rows, 1, length, inputs.key_end)
            full = torch.zeros((rows, 1, queries, key_length), dtype=torch.bool, device=device)
            full[:, :, :pad, key_length - inputs.key_end:] = True
            full[:, :, pad:, key_length - inputs.key_end:] = own
            masks.append(full)
        else:
            masks.append(F.pad(own, (key_length - inputs.key_end, 0), value=False))
        keeps.append(inputs.keep + pad)
        parts.append((slice(first_row, first_row + rows), length, cache))
        first_row += rows
    union = torch.unique(torch.cat([keep.reshape(-1) for keep in keeps]))  # sorted
    logits = model(input_ids=torch.cat(ids), position_ids=torch.cat(positions),
                   attention_mask=torch.cat(masks) if needs_mask else None,
                   past_key_values=_SharedForwardCache(parts, key_length), logits_to_keep=union).logits
    results = []
    for (inputs, _), keep, (rows, _, _) in zip(entries, keeps, parts):
        columns = torch.searchsorted(union, keep)
        own = logits[rows]
        if columns.dim() == 1:
            own = own[:, columns]
        else:
            own = own.gather(1, columns[..., None].expand(-1, -1, own.shape[-1]))
        results.append(inputs.combine(own))
    return results
