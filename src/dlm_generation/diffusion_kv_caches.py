"""Approximate KV caches that recompute a contiguous range of positions: Fast-dLLM's prefix and dual caches, and
FlashDLM's FreeCache.

All three keep the keys and values of every canvas position, per layer, in a `LayerKVStore` whose tensors are
allocated once per call (batch x kv_heads x canvas x head_dim), and write each step's fresh keys/values into them in
place, so the steps of a block run with unchanged tensor shapes. With the prefix and dual caches the first step of
every block recomputes the whole canvas (which refreshes everything and also decodes); later steps of the block run:

* prefix (`PrefixCache`): the block and everything after it, attending to the cached keys/values of the prefix;
* dual (`DualCache`): the block only, attending to the cached prefix and the cached (stale) suffix.

Positions before the block get no fresh logits after the block's first step; for a model whose logits are shifted
(Dream) that includes the block's first position, which the loop therefore commits at that first step.

FreeCache (`FreeCache`) recomputes the whole canvas only at the first step of the call; every later step runs a
window around the decoding frontier (the last committed position before the first mask), keys and values left of
the window stay frozen, and positions right of the window are left out of the forward altogether.

This file travels with saved models, so it imports only torch and siblings.
"""

from __future__ import annotations

import torch

from .diffusion_cache import CacheStep, DiffusionCache, LayerKVStore, is_int


class CanvasKVCache(DiffusionCache):
    """Per-layer keys and values of the whole canvas; subclasses choose the query range of the block's steps.
    Forwards end at `forward_end` (`suffix_window`): the keys after it are neither written nor read."""

    supports_suffix_window = True

    def begin_generation(self, canvas, attention_mask, mask_token_id, **details):
        super().begin_generation(canvas, attention_mask, mask_token_id, **details)
        self.kv = LayerKVStore()
        self.current = CacheStep(0, self.canvas_length, self.canvas_length)

    def plan_step(self, canvas, step):
        full = CacheStep(0, self.forward_end, self.forward_end)
        self.current = full if step == 0 else self.cached_step()
        return self.current

    def cached_step(self) -> CacheStep:
        raise NotImplementedError

    def settled_before(self):
        return self.block_start

    def end_generation(self):
        self.kv.clear()

    def update(self, key, value, layer_idx):
        step = self.current
        self.kv.allocate(layer_idx, key, value, self.canvas_length)
        own = None  # a row keeps what it holds outside its own window (CFG runs the canvas twice)
        if step.row_queries is not None:
            own = step.row_queries.repeat(key.shape[0] // step.row_queries.shape[0], 1)
        self.kv.write(layer_idx, step.query_start, key, value, own)
        return self.kv.read(layer_idx, step.key_end)


class PrefixCache(CanvasKVCache):
    """Fast-dLLM prefix cache: later steps of a block run the block and the suffix; the prefix is cached."""

    cache_name = "prefix"

    def cached_step(self):
        return CacheStep(self.block_start, self.forward_end, self.forward_end)


class DualCache(CanvasKVCache):
    """Fast-dLLM dual cache: later steps of a block run the block only; prefix and suffix are cached."""

    cache_name = "dual"

    def cached_step(self):
        return CacheStep(self.block_start, self.block_end, self.forward_end)


class FreeCache(CanvasKVCache):
    """FlashDLM FreeCache: after one full forward, each step runs `[last - window_left, last + window_right]` around
    the last committed position before the first mask (`window_right=None`: to the canvas end), attends to the
    frozen keys/values left of it, and leaves everything right of it out. In a batch the window spans every
    unfinished row's frontier. Finding the frontier costs one host synchronisation per step."""

    cache_name = "freecache"
    cache_config_defaults = {"window_left": 64, "window_right": None}  # the reference API's defaults
    cache_config_checks = {
        "window_left": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
        "window_right": (lambda v: v is None or (is_int(v) and v >= 1),
                         "a positive integer (or None: every remaining position)"),
    }

    def begin_generation(self, canvas, attention_mask, mask_token_id, **details):
        super().begin_generation(canvas, attention_mask, mask_token_id, **details)
        self.window_left = self.cache_config["window_left"]
        self.window_right = self.cache_config["window_right"]
        self.started = False

    def plan_step(self, canvas, step):
        length = self.forward_end
        if not self.started:  # the first forward of the call refreshes everything
            self.started = True
            self.current = CacheStep(0, length, length)
            return self.current
        is_mask = canvas == self.mask_token_id
        has_mask = is_mask.any(-1)
        last = is_mask.long().argmax(-1) - 1  # per row: the last committed position before its first mask
        starts = (last - self.window_left).clamp_min(0)
        ends = torch.full_like(last, length) if self.window_right is None else (last + self.window_right + 1).clamp_max(length)
        # The union over rows that still have masks (one host synchronisation).
        start, end = torch.stack([torch.where(has_mask, starts, length).min(),
                                  torch.where(has_mask, ends, 0).max()]).tolist()
        end = max(end, start + 1)
        positions = torch.arange(length, device=canvas.device)
        row_keys = positions[:end] < ends[:, None]
        row_queries = (positions[start:end] >= starts[:, None]) & row_keys[:, start:end]
        self.current = CacheStep(start, end, end, row_queries, row_keys)
        return self.current

    def settled_before(self):
        return 0  # the window starts left of the first mask: nothing eligible is ever frozen


class BlockKVCache(CanvasKVCache):
    """The exact KV cache of block-diffusion models (Fast-dLLM v2): committed blocks enter the cache as an AR
    model's tokens do, and every step runs only the block in progress against it.

    The model's blocks are aligned to its block length from the sequence start (`block_length` positions each), so
    the first block may begin inside the prompt; the loop's blocks (`begin_block`) are the part of each aligned block
    after the prompt. Per block of the loop, the cache plans:

    * an entry forward, first: for the first block, the prefill (the prompt's whole aligned blocks, block-causal),
      for every later block, the previous block once more with its committed tokens (its clean keys and values are
      what later blocks attend to). Its last position's logits predict the block's first position, which the loop
      commits at that step (greedily: `settled_before`). A prompt that ends inside an aligned block has nothing to
      commit at its prefill (an empty window: the forward only fills the cache). Without whole prompt blocks there
      is no prefill.
    * then denoising forwards over the aligned block (prompt tail included), attending to the cached blocks.

    Keys and values of the block in progress are written into the store at every step and overwritten by its entry
    forward's clean ones before any later block reads them, so the cache never holds a stale position that a query
    attends to. Only for models with block-causal attention (`diffusion_block_causal`); a full-attention model
    refuses it.
    """

    cache_name = "block"
    block_causal_only = True
    supports_suffix_window = False  # block-causal: the suffix never enters a forward anyway

    def __init__(self, cache_config=None, block_length: int | None = None):
        super().__init__(cache_config)
        self.block_length = block_length

    def begin_generation(self, canvas, attention_mask, mask_token_id, **details):
        super().begin_generation(canvas, attention_mask, mask_token_id, **details)
        if self.block_length is None:
            raise ValueError("BlockKVCache needs the model's block length: BlockKVCache(block_length=...).")
        self.origin, self.aligned_end, self.entry, self.started, self.entering = 0, 0, None, False, False

    def begin_block(self, block_start, block_end):
        previous = (self.origin, self.aligned_end) if self.started else None
        super().begin_block(block_start, block_end)
        self.origin = block_start // self.block_length * self.block_length
        self.aligned_end = block_end
        if previous is None:  # the first block: prefill the prompt's whole aligned blocks, if any
            previous = (0, self.origin) if self.origin > 0 else None
        self.entry, self.started = previous, True

    def plan_step(self, canvas, step):
        self.entering = step == 0 and self.entry is not None
        if self.entering:
            start, end = self.entry
            self.current = CacheStep(start, end, end)
        else:
            self.current = CacheStep(self.origin, self.aligned_end, self.aligned_end)
        return self.current

    def settled_before(self):
        # At the entry forward the block's first position is committed from the previous position's logits (the
        # reference's argmax of the completed block's last logit); denoising forwards see every position again.
        return self.block_start if self.entering else 0
