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

import torch
import torch.nn.functional as F

from .diffusion_cache import DiffusionCache, resolve_cache_config


class DLLMCache(DiffusionCache):
    """dLLM-Cache: long-interval prompt refresh (`kp`), short-interval response refresh (`kr`) and, in between,
    recomputation of the `rou` share of response rows whose values drifted most (see the module docstring)."""

    cache_name = "dllm"

    def __init__(self, cache_config: dict | None = None):
        super().__init__(resolve_cache_config(self.cache_name, cache_config))

    # ----------------------------------------------------------------------------------------- loop side
    def begin_generation(self, canvas, attention_mask, mask_token_id, prompt_length=None):
        super().begin_generation(canvas, attention_mask, mask_token_id, prompt_length)
        self.mask_token_id = mask_token_id
        self.block_start, self.block_end = self.prompt_length, self.canvas_length
        self.forwards = torch.zeros(canvas.shape[0], dtype=torch.long, device=canvas.device)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def begin_block(self, block_start, block_end):
        self.block_start, self.block_end = block_start, block_end

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
        self.keys, self.values, self.outputs, self.rows = {}, {}, {}, {}

    # ----------------------------------------------------------------------------------------- model side
    def _per_row(self, flags: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-row flags of the canvas rows for the forward's rows (CFG runs the canvas twice: cond, uncond)."""
        return flags.repeat(batch // flags.shape[0])

    def recompute_rows(self, layer_idx, value):
        if self.everything or layer_idx == 0 or layer_idx not in self.keys:
            self.rows[layer_idx] = None  # everything recomputed (layer 0 always, as in the reference)
            return None
        batch, _, length, _ = value.shape
        prompt = self.prompt_length
        is_prompt = torch.arange(length, device=value.device) < prompt
        chosen = ((self._per_row(self.refresh_prompt, batch)[:, None] & is_prompt)
                  | (self._per_row(self.refresh_response, batch)[:, None] & ~is_prompt))
        if self.verify_count:  # V-verify: the response rows whose values drifted most from the cached ones
            fresh = value[:, :, prompt:].transpose(1, 2).flatten(2)  # (batch, response, kv_heads * head_dim)
            cached = self.values[layer_idx][:, :, prompt:].transpose(1, 2).flatten(2)
            similarity = F.cosine_similarity(fresh.float(), cached.float(), dim=-1)
            least = similarity.topk(self.verify_count, dim=-1, largest=False).indices + prompt
            drifted = torch.zeros_like(chosen).scatter_(1, least, True)
            chosen |= drifted & self._per_row(self.verify, batch)[:, None]
        # Every row runs `most` rows: its own chosen ones in order, then (padding) unchosen ones whose results are
        # discarded, so that padding never changes what a row computes.
        order = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices[:, : self.most]
        valid = torch.arange(self.most, device=value.device) < self._per_row(self.counts, batch)[:, None]
        self.rows[layer_idx] = order, valid
        return order

    @staticmethod
    def _write(stored: torch.Tensor, dim: int, rows: torch.Tensor, valid: torch.Tensor, fresh: torch.Tensor) -> None:
        """stored[rows] = fresh along `dim`, where valid (elsewhere stored keeps its value)."""
        shape = [1] * stored.dim()
        shape[0], shape[dim] = rows.shape
        expand = list(stored.shape)
        expand[dim] = rows.shape[1]
        index = rows.view(shape).expand(expand)
        kept = stored.gather(dim, index)
        stored.scatter_(dim, index, torch.where(valid.view(shape), fresh, kept))

    def update(self, key, value, layer_idx):
        selection = self.rows.get(layer_idx)
        if selection is None:  # a full refresh: this forward's tensors become the cache (no copy)
            self.keys[layer_idx], self.values[layer_idx] = key, value
            return key, value
        rows, valid = selection
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        self._write(keys, 2, rows, valid, key)
        batch, prompt = key.shape[0], self.prompt_length
        # Values: the prompt's when it is refreshed, every response row's when the response is refreshed or verified.
        write_prompt = self._per_row(self.refresh_prompt, batch)[:, None, None, None]
        verified = self.verify if self.cache_config["rou"] > 0 else torch.zeros_like(self.verify)
        write_response = self._per_row(self.refresh_response | verified, batch)[:, None, None, None]
        values[:, :, :prompt] = torch.where(write_prompt, value[:, :, :prompt], values[:, :, :prompt])
        values[:, :, prompt:] = torch.where(write_response, value[:, :, prompt:], values[:, :, prompt:])
        return keys, values

    def reuse(self, layer_idx, name, output):
        selection = self.rows.get(layer_idx)
        if selection is None:
            self.outputs[layer_idx, name] = output
            return output
        stored = self.outputs[layer_idx, name]
        self._write(stored, 1, *selection, output)
        return stored
