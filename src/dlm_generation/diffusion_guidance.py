"""AR-guided diffusion (FlashDLM, arXiv 2505.21467): a small autoregressive model decides which proposals to commit.

Each denoising step the diffusion model proposes a token at every masked position it computed (one forward, drafts
drawn at `draft_temperature`). For each row, the run of proposals that starts at the row's first masked position
is checked by the guide (an autoregressive LM that shares the vocabulary) left to right, in chunks of
`verify_chunk` proposals: one causal forward scores a whole chunk, and the next chunk is scored only if every
proposal of the previous one was accepted. The guide keeps a `transformers.DynamicCache` of the committed prefix,
cropped after every step to what all rows have committed, so each forward runs only the new tokens.

Strategies (the acceptance rule and what a rejection commits):

* `"deterministic"`: a proposal is accepted when it is the guide's argmax. The accepted prefix is committed, and
  the first proposal is committed even when rejected (every step commits at least one token). The guide's own
  token is never written: the text comes from the diffusion model.
* `"topk_relative"`: accepted when the proposal is among the guide's `top_k` tokens and its guide probability is at
  least `relative_threshold` x the guide's top probability. Otherwise as deterministic.
* `"speculative"`: deterministic acceptance, and the guide's token replaces the first rejected proposal. Every
  committed token is then the guide's greedy choice, so the output equals the guide's greedy decoding (lossless
  with respect to the guide) while the diffusion model drafts.

A committed stop token ends its row (guidance implies `eos_early_stop`). Guided decoding commits left to right,
so the canvas of a row is always prompt + committed tokens + masks.

This file travels with saved models, so it imports only torch, transformers and a sibling file.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .modeling_diffusion_utils import CACHE_FIELD

GUIDANCE_STRATEGIES = ("deterministic", "topk_relative", "speculative")
GUIDANCE_DEFAULTS: dict[str, Any] = {
    "strategy": "deterministic",
    "top_k": 2,
    "relative_threshold": 0.5,
    "verify_chunk": 32,
    "draft_temperature": 0.0,
    "assistant_model_id": None,
}
TOPK_ONLY_KEYS = ("top_k", "relative_threshold")


def resolve_guidance_config(guidance: dict[str, Any] | None) -> dict[str, Any]:
    """Validate a `guidance` dict and fill in the defaults; raise `ValueError` naming every bad key or value."""
    if guidance is None:
        guidance = {}
    if not isinstance(guidance, dict):
        raise ValueError(
            f"guidance must be a dict such as {{'strategy': 'deterministic'}}, got {guidance!r}; the guide model "
            "itself is passed as assistant_model=."
        )
    errors = []
    unknown = sorted(set(guidance) - set(GUIDANCE_DEFAULTS))
    if unknown:
        errors.append(f"unknown guidance key(s) {unknown}; valid keys are {sorted(GUIDANCE_DEFAULTS)}.")
    resolved = {**GUIDANCE_DEFAULTS, **{k: v for k, v in guidance.items() if k in GUIDANCE_DEFAULTS}}
    strategy = resolved["strategy"]
    if strategy not in GUIDANCE_STRATEGIES:
        errors.append(f"guidance strategy={strategy!r} is unknown; choose one of {GUIDANCE_STRATEGIES}.")
    elif strategy != "topk_relative":
        given = [key for key in TOPK_ONLY_KEYS if key in guidance]
        if given:
            errors.append(f"guidance keys {given} are read only by strategy='topk_relative'; drop them or switch"
                          f" strategy (got {strategy!r}).")
    top_k = resolved["top_k"]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        errors.append(f"guidance top_k must be an integer >= 1, got {top_k!r} (FlashDLM uses 2).")
    relative = resolved["relative_threshold"]
    if isinstance(relative, bool) or not isinstance(relative, (int, float)) or not 0 < relative <= 1:
        errors.append(f"guidance relative_threshold must be in (0, 1], got {relative!r} (FlashDLM uses 0.5).")
    chunk = resolved["verify_chunk"]
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        errors.append(f"guidance verify_chunk must be an integer >= 1, got {chunk!r} (FlashDLM uses 32).")
    temperature = resolved["draft_temperature"]
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0 <= temperature < math.inf):
        errors.append(f"guidance draft_temperature must be a finite number >= 0 (0 = argmax), got {temperature!r}.")
    model_id = resolved["assistant_model_id"]
    if model_id is not None and (not isinstance(model_id, str) or not model_id):
        errors.append(f"guidance assistant_model_id must be a Hub id or a local path, got {model_id!r}.")
    if errors:
        raise ValueError("Invalid guidance:\n  - " + "\n  - ".join(errors))
    return resolved


# ------------------------------------------------------------------------------------------------ vocabulary
def check_shared_vocabulary(dllm_tokenizer, guide_tokenizer) -> list[int]:
    """Check that the guide reads token ids as the diffusion model does; return the dLLM-only ids.

    The two vocabularies must hold the same token at every id, except ids that only the diffusion model has and
    that are special tokens of its tokenizer (the mask token; Dream's extra bos). Those are returned: the guide
    never attends to them. Anything else raises a `ValueError` naming the first mismatching ids.
    """
    dllm_vocab = {index: token for token, index in dllm_tokenizer.get_vocab().items()}
    guide_vocab = {index: token for token, index in guide_tokenizer.get_vocab().items()}
    special = set(getattr(dllm_tokenizer, "all_special_tokens", []))
    dllm_only, mismatches = [], []
    for index in sorted(set(dllm_vocab) | set(guide_vocab)):
        mine, theirs = dllm_vocab.get(index), guide_vocab.get(index)
        if mine == theirs:
            continue
        if theirs is None and mine in special:
            dllm_only.append(index)
            continue
        mismatches.append(f"id {index}: diffusion model {mine!r}, guide {theirs!r}")
    if mismatches:
        raise ValueError(
            f"The guide's vocabulary differs from the diffusion model's at {len(mismatches)} id(s), first: "
            + "; ".join(mismatches[:5])
            + ". AR guidance compares token ids, so the guide must share the tokenizer (apart from the diffusion "
            "model's extra special tokens such as the mask); pick a guide from the same tokenizer family (e.g. "
            "Qwen2.5 for Dream). Text is never re-encoded as a fallback."
        )
    return dllm_only


# ------------------------------------------------------------------------------------------------ the guide
def guide_cache_argument(model) -> str:
    """The keyword under which the guide's `forward` takes its KV cache, so that calling it warns on no release.

    transformers 5.24 renamed the argument from `past_key_values` to `cache` (the old name still works there but
    raises a FutureWarning on every call). A forward that names either parameter gets that name; one that only takes
    `**kwargs` (a wrapper such as a PEFT model) gets the installed transformers' name (`CACHE_FIELD`).
    """
    forward = model.forward
    while hasattr(forward, "__wrapped__"):  # transformers' decorators (functools.wraps) keep the original here
        forward = forward.__wrapped__
    code = getattr(forward, "__code__", None)
    named = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount] if code is not None else ()
    for name in ("cache", "past_key_values"):
        if name in named:
            return name
    return CACHE_FIELD


class ARGuide:
    """The guide's side of one `diffusion_generate` call: its KV cache and the acceptance rule.

    `select(canvas, tokens, eligible, start)` takes the step's proposals `tokens` (batch, window) for canvas
    positions [start, start + window) and the positions that may be committed, and returns the positions to commit
    and the tokens to write there (the proposals, or the guide's tokens for the speculative strategy).
    """

    def __init__(self, model, guidance: dict[str, Any], canvas: torch.Tensor, padding_mask: torch.Tensor | None,
                 mask_token_id: int, stop_ids: torch.Tensor, hidden_ids: list[int]):
        from transformers import DynamicCache

        self.model = model
        self.strategy = guidance["strategy"]
        self.top_k = guidance["top_k"]
        self.relative_threshold = float(guidance["relative_threshold"])
        self.chunk = guidance["verify_chunk"]
        self.mask_token_id = mask_token_id
        self.stop_ids = stop_ids
        self.vocab_size = model.get_output_embeddings().out_features if model.get_output_embeddings() is not None \
            else model.config.vocab_size
        attend = torch.ones_like(canvas, dtype=torch.bool) if padding_mask is None else padding_mask.bool().clone()
        if hidden_ids:  # tokens only the diffusion model knows (its mask, Dream's extra bos): the guide skips them
            attend &= ~torch.isin(canvas, torch.tensor(hidden_ids, device=canvas.device))
        self.attention_mask = attend.long()
        # The guide never proposes those tokens nor the mask id (even when its vocabulary has one): a speculative
        # replacement by the mask would undo the step.
        self.hidden_ids = torch.tensor(sorted({i for i in [*hidden_ids, mask_token_id] if i < self.vocab_size}),
                                       dtype=torch.long, device=canvas.device)
        self.position_ids = (self.attention_mask.cumsum(-1) - 1).clamp_min(0)
        self.filler = int(stop_ids[0]) if stop_ids.numel() else 0  # stands in for masks beyond a row's run
        self.cache = DynamicCache(config=model.config)
        self.cache_argument = guide_cache_argument(model)  # `cache` or `past_key_values`, as the guide names it
        self.fed = torch.full_like(canvas, -1)  # the tokens the guide's cache was computed from, per position
        self.forwards = 0

    def _guide_view(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens as the guide reads them: masks and ids outside its vocabulary become a filler token (the guide
        never attends to the positions where that matters)."""
        tokens = tokens.masked_fill(tokens == self.mask_token_id, self.filler)
        return tokens.masked_fill(tokens >= self.vocab_size, self.filler)

    def _sync_cache(self, canvas: torch.Tensor, first_mask: torch.Tensor) -> int:
        """Crop the guide's cache to the longest prefix that every open row has committed exactly as it was fed,
        less the position before the earliest first mask (whose logits the step reads). Returns its length.

        Checking the canvas (instead of trusting what the guide chose) keeps the cache right whatever the loop
        committed: a speculative replacement, or positions that a cache forces to be committed."""
        held = self.cache.get_seq_length()
        open_rows = first_mask < canvas.shape[1]
        if held == 0 or not bool(open_rows.any()):
            return held
        differs = (self.fed[:, :held] != self._guide_view(canvas[:, :held])) & open_rows[:, None]
        first_diff = torch.where(differs.any(-1), differs.long().argmax(-1), held)
        keep = min(int(first_diff[open_rows].min()), int(first_mask[open_rows].min()) - 1, held)
        keep = max(keep, 0)
        if keep < held:
            self.cache.crop(keep - held)  # transformers >= 5: a negative count of positions to drop
        return keep

    def _accepts(self, logits: torch.Tensor, following: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For guide logits at positions j (batch, n, vocab) and the drafted tokens at j + 1 (batch, n): whether
        each draft is accepted, and the guide's own greedy token for j + 1."""
        logits = logits.float()
        if self.hidden_ids.numel():
            logits = logits.index_fill(-1, self.hidden_ids, float("-inf"))
        greedy = logits.argmax(-1)
        in_vocab = following < logits.shape[-1]
        drafted = following.clamp_max(logits.shape[-1] - 1)
        if self.strategy == "topk_relative":
            probs = logits.softmax(-1)
            top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
            in_top = (top.indices == drafted[..., None]).any(-1)
            share = probs.gather(-1, drafted[..., None]).squeeze(-1) >= self.relative_threshold * top.values[..., 0]
            accepted = in_top & share
        else:
            accepted = greedy == drafted
        return accepted & in_vocab, greedy

    # The commit-rule protocol of a denoising step (diffusion_strategies.PolicyCommitRule): the guide's acceptance
    # rule decides, and may write its own tokens.
    def choose(self, canvas: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor, eligible: torch.Tensor,
               ctx, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.select(canvas, tokens, eligible, start)

    def merge_forced(self, commit: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """Forced positions join the accepted run (guided commits start at the first mask, so they stay
        contiguous)."""
        return commit | forced

    def select(self, canvas: torch.Tensor, tokens: torch.Tensor, eligible: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, width = tokens.shape
        length = canvas.shape[1]
        device = canvas.device
        columns = torch.arange(width, device=device)
        # Each row's run: the eligible positions from its first eligible one up to the first gap. The guide reads
        # the text before the run, so it must be mask-free (guided rows commit left to right, so it is).
        has = eligible.any(-1)
        first = torch.where(has, eligible.long().argmax(-1), width)
        is_mask = canvas == self.mask_token_id
        first_mask = torch.where(is_mask.any(-1), is_mask.long().argmax(-1), length)
        contiguous = first_mask == start + first
        if bool((has & ~contiguous).any()):
            raise RuntimeError(
                "AR guidance needs every row's first masked position among the positions this step computes; the "
                "cache left it out. Please report this with the cache_implementation and cache_config."
            )
        after = columns >= first[:, None]
        run = after & eligible & ((after & ~eligible).long().cumsum(-1) == 0)
        run_length = run.sum(-1)

        proposed = canvas.clone()
        proposed[:, start:start + width] = torch.where(run, tokens, proposed[:, start:start + width])
        draft = self._guide_view(proposed)  # what the guide reads; acceptance checks the proposals themselves

        # Guide forwards, chunk by chunk, over positions [self.cached, end); keep per position j whether the draft
        # at j + 1 is accepted and the guide's greedy token for j + 1.
        accepted_next = torch.zeros(batch, length, dtype=torch.bool, device=device)
        greedy_next = torch.zeros(batch, length, dtype=torch.long, device=device)
        fed = self._sync_cache(canvas, first_mask)
        chunks = 1
        window_accepted = torch.zeros_like(run)
        rows = has
        while True:
            reach = torch.where(rows, start + first + run_length.clamp_max(chunks * self.chunk), 0)
            end = int(reach.max())  # the positions whose drafts this chunk checks end here; logits needed up to end-1
            if end - 1 > fed:
                out = self.model(
                    input_ids=draft[:, fed:end - 1], attention_mask=self.attention_mask[:, :end - 1],
                    position_ids=self.position_ids[:, fed:end - 1], use_cache=True, **{self.cache_argument: self.cache},
                )
                self.forwards += 1
                self.fed[:, fed:end - 1] = draft[:, fed:end - 1]
                ok, greedy = self._accepts(out.logits, proposed[:, fed + 1:end])
                accepted_next[:, fed:end - 1] = ok
                greedy_next[:, fed:end - 1] = greedy
                fed = end - 1
            # a window position q is verified by the guide's logits at q - 1
            verified = accepted_next[:, start - 1:start - 1 + width] if start >= 1 else \
                torch.cat([accepted_next.new_zeros(batch, 1), accepted_next[:, :width - 1]], 1)
            window_accepted = run & ((run & ~verified).long().cumsum(-1) == 0)
            count = window_accepted.sum(-1)
            rows = has & (count == run_length.clamp_max(chunks * self.chunk)) & (run_length > chunks * self.chunk)
            if not bool(rows.any()):
                break
            chunks += 1

        accepted = window_accepted.sum(-1)
        commit = window_accepted.clone()
        out_tokens = tokens
        rejected_at = first + accepted  # window index of the first rejected proposal (where the run has one)
        has_rejection = has & (accepted < run_length)
        at_rejection = has_rejection[:, None] & (columns == rejected_at[:, None])
        if self.strategy == "speculative":
            greedy_window = greedy_next[:, start - 1:start - 1 + width]
            out_tokens = torch.where(at_rejection, greedy_window, tokens)
            commit |= at_rejection
        else:
            commit |= at_rejection & (accepted == 0)[:, None]  # at least the first proposal
        # A committed stop token ends the row: nothing after it is committed.
        stops = torch.isin(out_tokens, self.stop_ids) & commit if self.stop_ids.numel() else torch.zeros_like(commit)
        commit &= (stops.long().cumsum(-1) - stops.long()) == 0

        return commit, out_tokens
