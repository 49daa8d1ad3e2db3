"""Feature caches: dLLM-Cache (arXiv 2506.06295), which reuses per-layer attention and FFN outputs and recomputes,
per layer, only the rows that need it.

Every step runs the whole canvas through every layer, but a layer recomputes attention and FFN only for some rows
and takes the others' outputs from what it cached (hidden states are never cached: each layer still adds the
cached or fresh outputs to its input). Per layer and position it keeps the keys and values (rotated), the
attention output (after the output projection) and the FFN output, separately refreshed for the prompt and the
response (the generated part):

* forwards are counted from 1 over the whole call (not per block); forward n refreshes the prompt when
  (n - 1) % kp == 0 and the response when (n - 1) % kr == 0, so the first forward refreshes everything. In a batch
  each row counts only the forwards in which it still had masks in the block (the forwards of its solo run) and
  follows its own schedule; every row runs as many rows as the row that needs most, and the results of the padding
  rows are discarded, so each row of a batch equals its solo run;
* layer 0 is refreshed at every forward, as in the reference code (the paper does not say so);
* a forward that refreshes the response but not the prompt recomputes the response rows only; the prompt keeps its
  cached keys, values and outputs;
* a forward that does not refresh the response ("V-verify") computes the values of every response row, compares
  them with the cached ones by cosine similarity (over all heads), and recomputes queries, keys, attention and FFN
  for the int(response_length * rou) least similar rows; the new keys are written at those rows, the new values at
  every response row; the other rows reuse their cached attention and FFN outputs.

With kp = kr = 1 every forward refreshes everything and the cache equals no cache exactly. The step's logits come
from every position, so every scorer, policy, schedule and block length works with it.

This file travels with saved models, so it imports only torch and siblings.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .diffusion_cache import CacheStep, DiffusionCache, LayerKVStore, is_int, is_number, scatter_rows


def padded_rows(chosen: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the positions where `chosen` (batch, length) is True, in order, padded to `count` with positions
    where it is False; and which entries are real."""
    order = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices[:, :count]
    return order, chosen.gather(1, order)


class LayerRowsCache(DiffusionCache):
    """A cache that runs every position through every layer but recomputes only some rows per layer
    (`recompute_rows` fills `self.rows[layer_idx]`: None for all of them, else `padded_rows`' rows and validity), and
    reuses the stored attention / FFN outputs of the others. Subclasses set `self.outputs = {}` and `self.rows = {}`
    in `begin_generation`."""

    def _per_row(self, values: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-row values of the canvas rows for the forward's rows (CFG runs the canvas twice: cond, uncond)."""
        return values.repeat(batch // values.shape[0], *([1] * (values.dim() - 1)))

    def reuse(self, layer_idx, name, output):
        selection = self.rows.get(layer_idx)
        if selection is None:
            self.outputs[layer_idx, name] = output
            return output
        stored = self.outputs[layer_idx, name]
        scatter_rows(stored, 1, *selection, output)
        return stored


class DLLMCache(LayerRowsCache):
    """dLLM-Cache: long-interval prompt refresh (`kp`), short-interval response refresh (`kr`) and, in between,
    recomputation of the `rou` share of response rows whose values drifted most (see the module docstring)."""

    cache_name = "dllm"
    cache_config_defaults = {"kp": 50, "kr": 2, "rou": 0.25}  # the reference code's defaults
    cache_config_aliases = {"rho": "rou"}
    cache_config_checks = {
        "kp": (lambda v: is_int(v) and v >= 1, "a positive integer (a refresh interval in forwards)"),
        "kr": (lambda v: is_int(v) and v >= 1, "a positive integer (a refresh interval in forwards)"),
        "rou": (lambda v: is_number(v) and 0.0 <= v <= 1.0,
                "a share between 0 and 1 (the response rows recomputed between refreshes)"),
    }

    # ----------------------------------------------------------------------------------------- loop side
    def begin_generation(self, canvas, attention_mask, mask_token_id, **details):
        super().begin_generation(canvas, attention_mask, mask_token_id, **details)
        self.forwards = torch.zeros(canvas.shape[0], dtype=torch.long, device=canvas.device)
        self.kv = LayerKVStore()
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def plan_step(self, canvas, step):
        # Each row keeps its own schedule: it counts the forwards in which it still had masks in the block, which
        # are exactly the forwards of its solo run, so a batch row equals its solo run.
        self.active = (canvas[:, self.block_start:self.block_end] == self.mask_token_id).any(-1)
        self.forwards += self.active.long()
        passed = self.forwards - 1
        self.refresh_prompt = self.active & (passed % self.cache_config["kp"] == 0)
        self.refresh_response = self.active & (passed % self.cache_config["kr"] == 0)
        response = self.canvas_length - self.prompt_length
        self.verify_count = int(response * self.cache_config["rou"])
        self.verify = self.active & ~self.refresh_response
        counts = (self.refresh_prompt.long() * self.prompt_length + self.refresh_response.long() * response
                  + self.verify.long() * self.verify_count)
        self.counts = counts
        self.most = int(counts.max())  # the step's one host synchronisation
        self.everything = self.most == self.canvas_length and bool((counts == self.canvas_length).all())
        return super().plan_step(canvas, step)

    def end_generation(self):
        self.kv.clear()
        self.outputs, self.rows = {}, {}

    # ----------------------------------------------------------------------------------------- model side
    def recompute_rows(self, layer_idx, value):
        if self.everything or layer_idx == 0 or layer_idx not in self.kv:
            self.rows[layer_idx] = None  # everything recomputed (layer 0 always, as in the reference)
            return None
        batch, _, length, _ = value.shape
        prompt = self.prompt_length
        is_prompt = torch.arange(length, device=value.device) < prompt
        chosen = ((self._per_row(self.refresh_prompt, batch)[:, None] & is_prompt)
                  | (self._per_row(self.refresh_response, batch)[:, None] & ~is_prompt))
        if self.verify_count:  # V-verify: the response rows whose values drifted most from the cached ones
            fresh = value[:, :, prompt:].transpose(1, 2).flatten(2)  # (batch, response, kv_heads * head_dim)
            cached = self.kv.values[layer_idx][:, :, prompt:].transpose(1, 2).flatten(2)
            similarity = F.cosine_similarity(fresh.float(), cached.float(), dim=-1)
            least = similarity.topk(self.verify_count, dim=-1, largest=False).indices + prompt
            drifted = torch.zeros_like(chosen).scatter_(1, least, True)
            chosen |= drifted & self._per_row(self.verify, batch)[:, None]
        # Every row runs `most` rows: its own chosen ones in order, then (padding) unchosen ones whose results are
        # discarded, so that padding never changes what a row computes.
        self.rows[layer_idx] = padded_rows(chosen, self.most)
        return self.rows[layer_idx][0]

    def update(self, key, value, layer_idx):
        selection = self.rows.get(layer_idx)
        if selection is None:  # a full refresh: this forward's tensors become the cache (no copy)
            self.kv.adopt(layer_idx, key, value)
            return key, value
        self.kv.write_rows(layer_idx, *selection, key=key)
        batch, prompt = key.shape[0], self.prompt_length
        # Values: the prompt's when it is refreshed, every response row's when the response is refreshed or verified.
        verified = self.verify if self.cache_config["rou"] > 0 else torch.zeros_like(self.verify)
        self.kv.write(layer_idx, 0, value=value[:, :, :prompt], own=self._per_row(self.refresh_prompt, batch)[:, None])
        self.kv.write(layer_idx, prompt, value=value[:, :, prompt:],
                      own=self._per_row(self.refresh_response | verified, batch)[:, None])
        return self.kv.read(layer_idx)


# ---------------------------------------------------------------------------------------------------------- d2Cache
def certainty_density(decoded: torch.Tensor, sigma: float) -> torch.Tensor:
    """d2Cache's certainty density of every generated position (batch, G): the Gaussian-weighted (`sigma`) share of
    decoded neighbours. Left of the canvas counts as decoded; right of it as decoded when the last position is.
    (within one canvas length, zero beyond). The normaliser is the kernel's sum over 6G positions, as in the
    reference's FFT formulation; contributions beyond 8 sigma (below 1e-13) are left out."""
    batch, length = decoded.shape
    kernel, reach = _density_kernel(length, float(sigma), decoded.device)
    radius = reach.shape[0]
    signal = decoded.to(torch.float32)
    left = reach.flip(0).expand(batch, radius)
    right = signal[:, -1:] * reach
    extended = torch.cat([left, signal, right], dim=1)
    return F.conv1d(extended[:, None], kernel)[:, 0]


@functools.lru_cache(maxsize=32)
def _density_kernel(length: int, sigma: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised Gaussian kernel (1, 1, 2r + 1) of `certainty_density` and which of the r padding positions on
    each side lie within one canvas length of the edge (1.0) or beyond it (0.0)."""
    radius = min(2 * length - 1, math.ceil(8 * sigma))  # the reference sees one canvas length of padding each way
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    wide = torch.arange(-3 * length, 3 * length, device=device, dtype=torch.float64)
    normaliser = torch.exp(-(wide**2) / (2 * sigma**2)).sum()
    kernel = (torch.exp(-(offsets**2) / (2 * sigma**2)) / normaliser).to(torch.float32)[None, None]
    reach = (torch.arange(radius, device=device) < length).to(torch.float32)
    return kernel, reach


def nucleus_select(scores: torch.Tensor, top_p: float, allowed: torch.Tensor) -> torch.Tensor:
    """Among `allowed` positions, the smallest set of highest `scores` whose normalised sum reaches `top_p`, and at
    least one (the reference's rollout selection)."""
    scores = torch.where(allowed, scores, 0.0)
    shares = scores / (scores.sum(-1, keepdim=True) + 1e-9)
    ordered, order = shares.sort(dim=-1, descending=True)
    keep = ordered.cumsum(-1) <= top_p
    keep[:, 0] = True
    keep &= allowed.gather(1, order)
    return torch.zeros_like(allowed).scatter_(1, order, keep)


def inflate(chosen: torch.Tensor, width: int) -> torch.Tensor:
    """Also choose every position between two chosen ones at most `width` apart (gap counted end to end)."""
    length = chosen.shape[1]
    index = torch.arange(length, device=chosen.device).expand_as(chosen)
    following = torch.where(chosen, index, length).flip(-1).cummin(-1).values.flip(-1)
    preceding = torch.where(chosen, index, -1).cummax(-1).values
    gap = following - preceding
    return chosen | ((gap <= width) & (preceding >= 0) & (following < length))


class D2Cache(DiffusionCache):
    """d2Cache (arXiv 2509.23094): keys and values of every position, per layer; after one full forward each step
    recomputes only the positions chosen at the end of the previous step, attending to the cached rest.

    The choice, made per row from what the step did (`end_step`):

    1. the `current_k` masked positions with the highest confidence x certainty density, searched from the current
       block to the first block boundary that holds `current_k` masks (the current block's masks first); for a
       shifted model (Dream) the position before each, whose logits predict it;
    2. every position committed in this step (its token changed, so its keys and values must);
    3. the smallest set of the remaining positions whose attention-rollout importance (head-averaged attention,
       identity added for the residual, rows renormalised, multiplied through the layers; column sums) reaches
       `rollout_p` of the total;
    4. with `inflate_w` > 0, every position between two chosen ones at most that far apart.

    Only positions with fresh logits can be committed (the loop enforces it). Confidences are the model's token
    probabilities, kept per position and updated whenever a position is recomputed while masked (the reference
    keeps the first step's values forever, an indexing bug; see the README). Decoding uses the certainty prior
    (scores = probability x density) unless `certainty_prior=False`.

    The attention weights come from an explicit softmax over the queries a forward runs (the model calls
    `observe_attention`), which is also the attention output; rollout costs O(queries x length) per layer: the
    column sums are propagated as a vector through the layers instead of multiplying length x length matrices.

    Batches: every row keeps its own selection and confidences; a row runs as many positions as the row that needs
    most, the padding positions' results are discarded, and a row with no masks left in the block runs nothing of
    its own, so each row equals its solo run.
    """

    cache_name = "d2cache"
    # `certainty_prior` is this library's switch for the decoding half of d2Cache (confidence x certainty density);
    # False decodes with the scorer's plain confidence (for threshold / factor policies and semi-AR blocks).
    cache_config_defaults = {"rollout_p": 0.1, "current_k": 32, "sigma": 10.0, "inflate_w": 4, "certainty_prior": True}
    cache_config_checks = {
        "rollout_p": (lambda v: is_number(v) and 0.0 <= v <= 1.0,
                      "a share between 0 and 1 (the attention-rollout mass recomputed)"),
        "current_k": (lambda v: is_int(v) and v >= 1, "a positive integer (masked positions recomputed per step)"),
        "sigma": (lambda v: is_number(v) and v > 0, "a positive number (the width of the certainty-density kernel)"),
        "inflate_w": (lambda v: is_int(v) and v >= 0, "a non-negative integer (0: no inflation)"),
        "certainty_prior": (lambda v: isinstance(v, bool), "True or False"),
    }
    needs_attention_weights = True
    needs_token_probability = True

    # ----------------------------------------------------------------------------------------- loop side
    def begin_generation(self, canvas, attention_mask, mask_token_id, **details):
        super().begin_generation(canvas, attention_mask, mask_token_id, **details)
        self.kv = LayerKVStore()
        self.attention: dict[int, torch.Tensor] = {}
        self.chosen: torch.Tensor | None = None  # (batch, length): positions the next step recomputes
        self.confidence = torch.ones(canvas.shape[0], self.canvas_length - self.prompt_length,
                                     device=canvas.device)  # never computed yet: neutral
        # Left padding takes no part in the rollout (as in the row's solo run, where it does not exist).
        self.real = None if attention_mask is None else attention_mask[:, : self.canvas_length].bool()
        self.current = CacheStep(0, self.canvas_length, self.canvas_length)

    def plan_step(self, canvas, step):
        length = self.canvas_length
        if self.chosen is None:  # the call's first forward: everything
            self.current = CacheStep(0, length, length)
            return self.current
        active = (canvas[:, self.block_start:self.block_end] == self.mask_token_id).any(-1)
        chosen = self.chosen & active[:, None]  # a row without masks in the block runs nothing of its own
        count = max(1, int(chosen.sum(-1).max()))  # the step's host synchronisation
        positions, _ = padded_rows(chosen, count)
        self.current = CacheStep(0, length, length, row_queries=chosen, positions=positions)
        return self.current

    def settled_before(self):
        return 0

    def rescore(self, confidence, probability, canvas, start, end):
        if not self.cache_config["certainty_prior"] or probability is None:
            return confidence
        prompt = self.prompt_length
        density = certainty_density(canvas[:, prompt:] != self.mask_token_id, self.cache_config["sigma"])
        return probability * density[:, start - prompt:end - prompt]

    def end_step(self, outcome):
        config, prompt, length = self.cache_config, self.prompt_length, self.canvas_length
        batch, generated = outcome.canvas.shape[0], length - prompt
        active = outcome.eligible.any(-1)
        device = outcome.canvas.device
        # confidences of the masked positions this step computed
        fresh = torch.zeros(batch, generated, dtype=torch.bool, device=device)
        fresh[:, outcome.start - prompt:outcome.end - prompt] = outcome.eligible
        if outcome.probability is not None:
            window = torch.zeros_like(self.confidence)
            window[:, outcome.start - prompt:outcome.end - prompt] = outcome.probability.float()
            self.confidence = torch.where(fresh, window, self.confidence)
        remaining = outcome.canvas[:, prompt:] == self.mask_token_id
        # 1. masked positions: confidence x certainty density, inside the search window
        columns = torch.arange(generated, device=device)
        block_start, block_size = self.block_start - prompt, self.block_end - self.block_start
        enough = remaining.long().cumsum(-1) >= config["current_k"]
        first_enough = torch.where(enough.any(-1), enough.long().argmax(-1), generated - 1)
        search_end = (first_enough // block_size + 1) * block_size - 1
        candidates = remaining & (columns >= block_start) & (columns <= search_end[:, None])
        scores = self.confidence * certainty_density(~remaining, config["sigma"])
        in_block = (columns >= block_start) & (columns < self.block_end - prompt)
        scores = scores + in_block * scores.amax(-1, keepdim=True)  # the block's masks first (per row)
        scores = torch.where(candidates, scores, float("-inf"))
        top = scores.topk(min(config["current_k"], generated), dim=-1).indices
        selected = torch.zeros_like(remaining).scatter_(1, top, True) & candidates
        chosen = torch.zeros(batch, length, dtype=torch.bool, device=device)
        chosen[:, prompt - self.logits_shift:length - self.logits_shift] = selected  # a shifted model reads i at i - 1
        if self.guided_frontier:  # AR guidance verifies from each row's first mask on
            frontier = remaining & (remaining.long().cumsum(-1) <= self.guided_frontier)
            chosen[:, prompt - self.logits_shift:length - self.logits_shift] |= frontier
        # 2. every position committed this step
        chosen[:, outcome.start:outcome.end] |= outcome.committed
        # 3. attention rollout over the rest
        allowed = ~chosen if self.real is None else ~chosen & self.real
        chosen |= nucleus_select(self.rollout_importance(batch), config["rollout_p"], allowed)
        # 4. inflation
        if config["inflate_w"]:
            chosen = inflate(chosen, config["inflate_w"])
        self.chosen = chosen if self.chosen is None else torch.where(active[:, None], chosen, self.chosen)
        self.attention = {}

    def rollout_importance(self, batch: int) -> torch.Tensor:
        """Column sums of the attention rollout of the last forward (batch, length): 1^T R_L ... R_1, where R_l is
        the identity except at the rows the forward ran, which hold (attention + identity) / 2."""
        step = self.current
        importance = torch.ones(batch, self.canvas_length, device=next(iter(self.attention.values())).device)
        if self.real is not None:  # padding columns start (and, never attended to, stay) at zero; its rows carry none
            importance = importance * self.real
        for layer in sorted(self.attention, reverse=True):
            weights = self.attention[layer][:batch].float()  # (batch, queries, keys); CFG's second half left out
            keys = weights.shape[-1]
            if step.positions is None:
                rows = torch.arange(weights.shape[1], device=weights.device).expand(batch, -1)
                valid = torch.ones_like(rows, dtype=torch.bool)
            else:
                rows, valid = step.positions, step.row_queries.gather(1, step.positions)
            carried = importance.gather(1, rows) * valid  # u[q] of the rows that ran
            update = 0.5 * torch.einsum("bq,bqk->bk", carried, weights)
            importance = importance.clone()
            importance[:, :keys] += update
            importance.scatter_add_(1, rows, -0.5 * carried)
        return importance

    def end_generation(self):
        self.kv.clear()
        self.attention, self.chosen, self.real = {}, None, None

    # ----------------------------------------------------------------------------------------- model side
    def observe_attention(self, layer_idx, weights):
        self.attention[layer_idx] = weights

    def update(self, key, value, layer_idx):
        step = self.current
        if step.positions is None:  # a full forward: its tensors become the cache (no copy)
            self.kv.adopt(layer_idx, key, value)
            return key, value
        copies = key.shape[0] // step.positions.shape[0]  # CFG runs the canvas twice
        rows = step.positions.repeat(copies, 1)
        valid = step.row_queries.gather(1, step.positions).repeat(copies, 1)
        self.kv.write_rows(layer_idx, rows, valid, key, value)
        return self.kv.read(layer_idx, step.key_end)


class ElasticCache(LayerRowsCache):
    """Elastic-Cache (arXiv 2510.14973): keys, values and per-layer outputs of every position; each step recomputes
    only the decoding window, and refreshes the cache of the other positions from the layer where attention drifts.

    Per step and row (the first forward of every block refreshes everything):

    * the window: the positions of the block (as the dual cache runs them), or, with `window_size`, the
      `window_size` positions from the row's first mask in the block on (a window that slides through the block, or
      through the canvas with a single block); for a shifted model (Dream) also the position before each, whose
      logits predict it; plus every position committed at the previous step (its token changed). Only these run
      through the layers; every other position (prompt, settled tokens, the masked suffix after the window) reuses
      its cached keys, values, attention and FFN outputs;
    * the drift test, at every layer: per layer the cache tracks the `track_num` keys that received the most
      attention from the window's masked queries at the previous step. It compares the attention those queries
      (the ones still masked, present at both steps) give them now with what they gave them then (cosine
      similarity over queries x tracked keys). The first layer whose similarity falls below `gamma` triggers the
      refresh: every later layer recomputes every position of that row (layers up to it keep their caches). No
      common query while the window holds masks (the window jumped) counts as drift; a row without masks
      in its window refreshes nothing.

    `gamma` = 1 refreshes from the second layer at every step; `gamma` = -1 never refreshes inside a block, which
    (with the block as window) is exactly the dual cache.
    Only window positions can be committed (the loop enforces it). Attention runs through SDPA; the weights of the
    window's masked queries are computed once more explicitly for the test (`attention_weight_rows`); deciding how
    many rows a layer runs costs one host synchronisation per layer. Batches: every row keeps its own window, tracked keys and refresh layer; a row runs as
    many positions as the row that needs most (padding results are discarded), so each row equals its solo run.

    The authors' code (VILA-Lab/Elastic-Cache) names these settings `gamma`, `track_num` and `window_size`; this class
    follows the paper's description (see docs/caches.md for what differs).
    """

    cache_name = "elastic"
    cache_config_defaults = {"gamma": 0.9, "track_num": 1, "window_size": None}
    cache_config_checks = {
        "gamma": (lambda v: is_number(v) and -1.0 <= v <= 1.0,
                  "a cosine similarity between -1 and 1 (below it, attention has drifted and the cache refreshes)"),
        "track_num": (lambda v: is_int(v) and v >= 1, "a positive integer (most-attended keys tracked per layer)"),
        "window_size": (lambda v: v is None or (is_int(v) and v >= 1),
                        "a positive integer (positions of the sliding window) or None (the block)"),
    }
    needs_attention_weights = True
    supports_suffix_window = True

    # ----------------------------------------------------------------------------------------- loop side
    def begin_generation(self, canvas, attention_mask, mask_token_id, **details):
        super().begin_generation(canvas, attention_mask, mask_token_id, **details)
        self.kv = LayerKVStore()
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.committed = torch.zeros_like(canvas, dtype=torch.bool)  # positions committed at the previous step
        self.tracked: dict[int, torch.Tensor] = {}  # layer -> (batch, track_num) most-attended keys
        self.previous: dict[int, torch.Tensor] = {}  # layer -> (batch, length, track_num) their attention last step
        self.previous_queries: torch.Tensor | None = None  # (batch, length) the window's masked queries last step
        # Per row: cached steps (after a block's full forward) and how many of them drift refreshed (observability:
        # the benchmark reports the share).
        self.cached_steps = torch.zeros(canvas.shape[0], dtype=torch.long, device=canvas.device)
        self.drift_refreshes = torch.zeros_like(self.cached_steps)
        self.full_next = True

    def begin_block(self, block_start, block_end):
        super().begin_block(block_start, block_end)
        self.full_next = True

    def plan_step(self, canvas, step):
        end = self.forward_end
        masked = canvas[:, :end] == self.mask_token_id
        positions = torch.arange(end, device=canvas.device)
        window = ((positions >= self.block_start) & (positions < self.block_end)).expand_as(masked)
        block_masks = masked & window
        if self.cache_config["window_size"] is not None:  # slides: from the row's first mask in the block on
            first = torch.where(block_masks, positions, end).min(-1, keepdim=True).values
            window = window & (positions >= first) & (positions < first + self.cache_config["window_size"])
            if self.guided_frontier:  # AR guidance verifies each row's first `guided_frontier` masks
                window = window | (block_masks & (block_masks.long().cumsum(-1) <= self.guided_frontier))
        self.window = window & masked  # the masked queries whose attention the drift test reads
        queries = window | self.committed[:, :end]
        if self.logits_shift:  # position i is predicted at i - shift
            queries[:, :-self.logits_shift] |= window[:, self.logits_shift:]
        self.full = self.full_next
        self.full_next = False
        self.refresh_from = torch.full((canvas.shape[0],), -1 if self.full else 1 << 30, device=canvas.device)
        self.queries = torch.ones_like(queries) if self.full else queries
        self.length = end
        self.query_rows = self.query_weight_rows = self.weight_rows = None
        self.query_built = False  # the step's query rows (the same for every layer that does not refresh)
        # The loop commits only inside the window (its queries), even when a full forward computes every position.
        self.current = CacheStep(0, end, end, row_queries=queries)
        return self.current

    def settled_before(self):
        return 0

    def end_step(self, outcome):
        self.committed = torch.zeros_like(self.committed)
        self.committed[:, outcome.start:outcome.end] = outcome.committed
        self.previous_queries = self.window
        if not self.full:
            active = self.window.any(-1)
            self.cached_steps += active.long()
            self.drift_refreshes += (active & (self.refresh_from < (1 << 30))).long()

    def end_generation(self):
        self.kv.clear()
        self.outputs, self.rows, self.tracked, self.previous = {}, {}, {}, {}

    # ----------------------------------------------------------------------------------------- model side
    def recompute_rows(self, layer_idx, value):
        batch = value.shape[0]
        refreshing = self._per_row(self.refresh_from, batch) < layer_idx  # rows refreshing from before this layer
        if not bool(refreshing.any()):  # the layer's host synchronisation; the step's queries (rows built once)
            if not self.query_built:
                self.query_built = True
                chosen = self._per_row(self.queries, batch)
                count = int(chosen.sum(-1).max())
                self.query_rows = None if count == self.length else padded_rows(chosen, max(count, 1))
                self.query_weight_rows = self._weight_rows(self.query_rows)
            self.rows[layer_idx], self.weight_rows = self.query_rows, self.query_weight_rows
        else:
            chosen = self._per_row(self.queries, batch) | refreshing[:, None]
            count = int(chosen.sum(-1).max())
            self.rows[layer_idx] = None if count == self.length else padded_rows(chosen, count)
            self.weight_rows = self._weight_rows(self.rows[layer_idx])
        return None if self.rows[layer_idx] is None else self.rows[layer_idx][0]

    def _weight_rows(self, selection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a layer's rows (None: every position), the forward rows of the window's masked queries (the drift
        test's queries), padded per row: (index into the forward's rows, validity, canvas positions)."""
        batch = self.window.shape[0]
        if selection is None:
            forward_rows = torch.arange(self.length, device=self.window.device).expand(batch, -1)
            counted = self.window
        else:
            forward_rows = selection[0][:batch]
            counted = self.window.gather(1, forward_rows) & selection[1][:batch]
        index, valid = padded_rows(counted, max(1, int(counted.sum(-1).max())))
        return index, valid, forward_rows.gather(1, index)

    def update(self, key, value, layer_idx):
        self.kv.allocate(layer_idx, key, value, self.canvas_length)
        selection = self.rows[layer_idx]
        if selection is None:
            self.kv.write(layer_idx, 0, key, value)
        else:  # values of every row are given (a row left out runs on its cached input: its value is unchanged)
            self.kv.write_rows(layer_idx, *selection, key=key)
            self.kv.write(layer_idx, 0, value=value)
        return self.kv.read(layer_idx, self.length)

    def attention_weight_rows(self, layer_idx, batch):
        return self._per_row(self.weight_rows[0], batch)  # built with the layer's rows (`recompute_rows`)

    def observe_attention(self, layer_idx, weights):
        batch, length = self.window.shape
        weights = weights[:batch].float()  # (batch, window queries, keys); CFG's second half left out
        _, valid, positions = self.weight_rows

        def at_canvas(values: torch.Tensor) -> torch.Tensor:
            """(batch, window queries, n) -> (batch, length, n) at their canvas positions, zeros elsewhere."""
            dense = values.new_zeros(batch, length, values.shape[-1])
            return dense.scatter_(1, positions[..., None].expand_as(values), values * valid[..., None])

        tracked = self.tracked.get(layer_idx)
        if tracked is not None and self.previous_queries is not None and not self.full:
            common = (self.window & self.previous_queries)[..., None]  # (batch, length, 1)
            now = at_canvas(weights.gather(2, tracked[:, None, :].expand(-1, weights.shape[1], -1))) * common
            before = self.previous[layer_idx] * common
            similarity = F.cosine_similarity(now.flatten(1), before.flatten(1), dim=-1, eps=1e-12)
            # a row whose window holds masks, none of them queried at the previous step (the window jumped): drift
            similarity = torch.where(common.flatten(1).any(-1), similarity, -2.0)
            drifted = ((similarity < self.cache_config["gamma"]) & self.window.any(-1)
                       & (self.refresh_from > layer_idx))
            self.refresh_from = torch.where(drifted, layer_idx, self.refresh_from)
        # this step's most-attended keys of the layer and the attention they get, for the next step's test
        column = torch.einsum("bq,bqk->bk", valid.to(weights.dtype), weights)
        top = column.topk(min(self.cache_config["track_num"], column.shape[-1]), dim=-1).indices
        self.tracked[layer_idx] = top
        self.previous[layer_idx] = at_canvas(weights.gather(2, top[:, None, :].expand(-1, weights.shape[1], -1)))
