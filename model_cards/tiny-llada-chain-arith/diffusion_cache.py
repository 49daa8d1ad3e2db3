"""The diffusion cache protocol and its null object.

A diffusion cache decides, per denoising step, which canvas positions the model recomputes, and keeps whatever it
needs between steps. The denoising loop talks to it through a few lifecycle hooks; a model talks to it at exactly
one place, `past_key_values.update(key, value, layer_idx)` inside attention (see `modeling_diffusion_utils`).

`DiffusionCache` itself is the null cache: every step recomputes the whole canvas and nothing is stored. A real
cache (prefix, dual, ...) is a subclass that overrides only the hooks it needs and registers itself under its
`cache_implementation` name in `DIFFUSION_CACHE_CLASSES`; the loop never changes.

This file travels with saved models, so it imports only torch.
"""

from __future__ import annotations

import torch

# Every cache name the configuration accepts, whether or not this version implements it.
KNOWN_CACHE_IMPLEMENTATIONS = ("prefix", "dual", "dllm", "d2cache", "freecache")


class DiffusionCache:
    """Null cache: recompute the whole canvas at every step, store nothing."""

    def __init__(self, cache_config: dict | None = None):
        self.cache_config = dict(cache_config or {})

    def begin_generation(self, canvas: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Called once before the first step, with the initial canvas (batch, length)."""

    def begin_block(self, block_start: int, block_end: int) -> None:
        """Called when the loop moves to the block [block_start, block_end) of the canvas."""

    def query_range(self, canvas_length: int, block_start: int, block_end: int) -> tuple[int, int]:
        """Canvas positions [start, end) the model recomputes this step (the null cache: all of them)."""
        return 0, canvas_length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-side contact point: take this step's keys/values of one layer, return the ones to attend to."""
        return key, value

    def end_step(self) -> None:
        """Called after the step's tokens were committed."""


# cache_implementation name -> class. Filled by the cache modules of later releases.
DIFFUSION_CACHE_CLASSES: dict[str, type[DiffusionCache]] = {}
