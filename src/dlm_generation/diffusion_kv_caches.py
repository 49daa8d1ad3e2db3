"""Approximate KV caches that recompute a contiguous range of positions: Fast-dLLM's prefix and dual caches.

Both keep the keys and values of every canvas position, per layer, in tensors allocated once per call
(batch x kv_heads x canvas x head_dim), and write each step's fresh keys/values into them in place, so the steps of
a block run with unchanged tensor shapes. At the first step of every block the whole canvas is recomputed (which
refreshes everything and also decodes); later steps of the block run:

* prefix (`PrefixCache`): the block and everything after it, attending to the cached keys/values of the prefix;
* dual (`DualCache`): the block only, attending to the cached prefix and the cached (stale) suffix.

Positions before the block get no fresh logits after the block's first step; for a model whose logits are shifted
(Dream) that includes the block's first position, which the loop therefore commits at that first step.

This file travels with saved models, so it imports only torch and siblings.
"""

from __future__ import annotations

import torch

from .diffusion_cache import CacheStep, DiffusionCache


class CanvasKVCache(DiffusionCache):
    """Per-layer keys and values of the whole canvas; subclasses choose the query range of the block's steps."""

    def begin_generation(self, canvas, attention_mask):
        super().begin_generation(canvas, attention_mask)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.block_start, self.block_end = 0, self.canvas_length
        self.current = CacheStep(0, self.canvas_length, self.canvas_length)

    def begin_block(self, block_start, block_end):
        self.block_start, self.block_end = block_start, block_end

    def plan_step(self, canvas, step):
        full = CacheStep(0, self.canvas_length, self.canvas_length)
        self.current = full if step == 0 else self.cached_step()
        return self.current

    def cached_step(self) -> CacheStep:
        raise NotImplementedError

    def settled_before(self):
        return self.block_start

    def end_generation(self):
        self.keys, self.values = {}, {}

    def update(self, key, value, layer_idx):
        stored_keys = self.keys.get(layer_idx)
        if stored_keys is None or stored_keys.shape[0] != key.shape[0]:
            shape = (key.shape[0], key.shape[1], self.canvas_length, key.shape[3])
            stored_keys = self.keys[layer_idx] = key.new_empty(shape)
            self.values[layer_idx] = value.new_empty(shape)
        stored_values = self.values[layer_idx]
        step = self.current
        stored_keys[:, :, step.query_start : step.query_end] = key
        stored_values[:, :, step.query_start : step.query_end] = value
        return stored_keys[:, :, : step.key_end], stored_values[:, :, : step.key_end]


class PrefixCache(CanvasKVCache):
    """Fast-dLLM prefix cache: later steps of a block run the block and the suffix; the prefix is cached."""

    def cached_step(self):
        return CacheStep(self.block_start, self.canvas_length, self.canvas_length)


class DualCache(CanvasKVCache):
    """Fast-dLLM dual cache: later steps of a block run the block only; prefix and suffix are cached."""

    def cached_step(self):
        return CacheStep(self.block_start, self.block_end, self.canvas_length)
