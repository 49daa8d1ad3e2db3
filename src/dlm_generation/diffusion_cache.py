"""The diffusion cache protocol and its null object.

A diffusion cache decides, per denoising step, which canvas positions the model recomputes, and keeps whatever it
needs between steps. Two sides talk to it:

* The denoising loop, through lifecycle hooks: `begin_generation` (once), `begin_block` (per semi-AR block),
  `plan_step` (before every forward: which positions to run, which keys to attend to), `end_step` (after the
  step's commits) and `end_generation` (frees what the cache holds).
* The model, at four points per layer (the same in every model file):
  - `recompute_rows(layer_idx, value)`: given the fresh values of every position of the forward, which rows the
    layer recomputes (None: all of them; feature caches such as dLLM-Cache choose a subset per layer);
  - `update(key, value, layer_idx)` inside attention (`modeling_diffusion_utils.diffusion_attention`): the keys
    of the recomputed rows and the values of every row in, the keys and values to attend to out;
  - `reuse(layer_idx, "attention" | "ffn", output)`: the recomputed rows' attention / FFN output in, the output
    of every row of the forward out (the cache fills in the rows it did not recompute).

`DiffusionCache` itself is the null cache: every step runs the whole canvas and nothing is stored. A real cache
(`diffusion_kv_caches.py`) is a subclass that overrides only the hooks it needs and is registered under its
`cache_implementation` name in `diffusion_caches.DIFFUSION_CACHE_CLASSES`; the loop never branches on the cache
type. See docs/write-your-own-cache.md.

This file travels with saved models, so it imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Every cache name the configuration accepts, with its `cache_config` keys and their defaults (DESIGN.md; the
# defaults of the papers' code). `None` for freecache's window_right means "every remaining position". d2cache's
# `certainty_prior` is this library's switch for the decoding half of d2Cache (confidence x certainty density);
# False decodes with the scorer's plain confidence (for threshold / factor policies and semi-AR blocks).
CACHE_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "prefix": {},
    "dual": {},
    "dllm": {"kp": 50, "kr": 2, "rou": 0.25},
    "d2cache": {"rollout_p": 0.1, "current_k": 32, "sigma": 10.0, "inflate_w": 4, "certainty_prior": True},
    "freecache": {"window_left": 64, "window_right": None},
}
CACHE_CONFIG_ALIASES: dict[str, dict[str, str]] = {"dllm": {"rho": "rou"}}
KNOWN_CACHE_IMPLEMENTATIONS = tuple(CACHE_CONFIG_DEFAULTS)


@dataclass(frozen=True)
class CacheStep:
    """What one forward computes: the model runs canvas positions [query_start, query_end) and they attend to the
    keys of positions [0, key_end) (the cache supplies those outside the query range).

    A cache that recomputes scattered positions gives `positions` (batch, n): each row runs exactly those canvas
    positions (within [query_start, query_end); padded rows repeat positions marked False in `row_queries`), and
    `row_queries` must be given too.

    A cache whose rows need different ranges (a batch in which each row has its own window) runs their union and
    says per row which of it is the row's own: `row_queries` (batch, query_end - query_start) marks the positions
    whose fresh keys/values and logits count for that row (the others keep what the cache holds and cannot be
    committed), and `row_keys` (batch, key_end) the keys the row may attend to. None means every row, everywhere.
    """

    query_start: int
    query_end: int
    key_end: int
    row_queries: torch.Tensor | None = None
    row_keys: torch.Tensor | None = None
    positions: torch.Tensor | None = None


@dataclass
class StepOutcome:
    """What a denoising step did, for caches that choose the next step's positions from it (`end_step`).

    `canvas` is the canvas after the step's commits; the other tensors cover the step's window, canvas positions
    [start, end): `eligible` the masked positions the step could commit (fresh logits), `committed` those it
    committed, `probability` the model's probability of the proposed token there (NaN where not computed).
    """

    canvas: torch.Tensor
    start: int
    end: int
    eligible: torch.Tensor
    committed: torch.Tensor
    probability: torch.Tensor | None


class DiffusionCache:
    """Null cache: run the whole canvas at every step, store nothing.

    Subclasses override what they need:

    * `plan_step(canvas, step)`: the `CacheStep` of the next forward (`step` counts from 0 inside the block).
    * `settled_before()`: this block's later steps give no fresh logits left of this position (caches that freeze
      the prefix return the block start). The loop commits eligible masks there at the step that still sees them.
    * `update(key, value, layer_idx)`: store / splice keys and values (already rotated), return those to attend to.
    * `recompute_rows(layer_idx, value)` and `reuse(layer_idx, name, output)`: recompute only some rows of a layer
      and reuse cached attention / FFN outputs for the others (the null cache: every row, nothing reused).
    * `begin_generation`, `begin_block`, `end_step`, `end_generation`: reset, move, release state.
    """

    # Capabilities (the loop and the model read these flags; they never ask for a cache's type):
    needs_attention_weights = False  # attention hands the head-averaged weights to `observe_attention`
    needs_token_probability = False  # StepOutcome.probability is filled for every scorer (alg)
    # Set by the loop for AR-guided decoding: guided rows commit left to right from their first mask, so a cache that
    # chooses which masked positions to compute must include each row's first `guided_frontier` masked positions.
    guided_frontier = 0

    cache_name: str | None = None  # a registered `cache_implementation` name: its cache_config is checked, filled in

    def __init__(self, cache_config: dict | None = None):
        if self.cache_name is not None:
            cache_config = resolve_cache_config(self.cache_name, cache_config)
        self.cache_config = dict(cache_config or {})
        self.canvas_length = 0

    # ----------------------------------------------------------------------------------------- loop side
    def begin_generation(self, canvas: torch.Tensor, attention_mask: torch.Tensor | None, mask_token_id: int,
                         prompt_length: int | None = None, logits_shift: int = 0) -> None:
        """Called once before the first step, with the initial canvas (batch, length), the padding mask (or None),
        the mask id, the (left-padded) prompt length (positions from it on are generated) and the model's logit
        shift (1 for Dream: position i's prediction is read at i - 1)."""
        self.canvas_length = canvas.shape[1]
        self.prompt_length = canvas.shape[1] if prompt_length is None else prompt_length
        self.logits_shift = logits_shift
        self.mask_token_id = mask_token_id
        self.block_start, self.block_end = self.prompt_length, self.canvas_length

    def begin_block(self, block_start: int, block_end: int) -> None:
        """Called when the loop moves to the block [block_start, block_end) of the canvas (kept as block_start /
        block_end)."""
        self.block_start, self.block_end = block_start, block_end

    def plan_step(self, canvas: torch.Tensor, step: int) -> CacheStep:
        """The positions the next forward runs and the keys they see (the null cache: everything)."""
        return CacheStep(0, canvas.shape[1], canvas.shape[1])

    def settled_before(self) -> int:
        """Positions left of this get no fresh logits in the current block's later steps (the null cache: none)."""
        return 0

    def rescore(self, confidence: torch.Tensor, probability: torch.Tensor | None, canvas: torch.Tensor, start: int,
                end: int) -> torch.Tensor:
        """The scores the commit policy ranks the window [start, end) by, before this step's commits (the null
        cache: the scorer's confidence unchanged; d2Cache's certainty prior multiplies in a density)."""
        return confidence

    def end_step(self, outcome: StepOutcome) -> None:
        """Called after the step's tokens were committed, with what the step did."""

    def end_generation(self) -> None:
        """Called when the call returns (also on error): release stored tensors."""

    # ----------------------------------------------------------------------------------------- model side
    def recompute_rows(self, layer_idx: int, value: torch.Tensor) -> torch.Tensor | None:
        """Model side, first in every layer: the rows (batch, n) of this forward that the layer recomputes, given the
        fresh values of all of them (batch, kv_heads, length, head_dim); None = every row (the null cache)."""
        return None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Model side, in attention: this step's keys (of the recomputed rows) and values (of every row) of one
        layer in, the keys and values to attend to out."""
        return key, value

    def observe_attention(self, layer_idx: int, weights: torch.Tensor) -> None:
        """Model side, with `needs_attention_weights`: the head-averaged attention weights (batch, queries, keys)
        of one layer of this forward."""

    def reuse(self, layer_idx: int, name: str, output: torch.Tensor) -> torch.Tensor:
        """Model side, after attention (`name="attention"`) and after the FFN (`"ffn"`): the recomputed rows' output
        (batch, n, hidden) in, the output of every row of the forward out (the null cache: unchanged)."""
        return output


def resolve_cache_config(name: str, cache_config: dict | None) -> dict[str, Any]:
    """`cache_config` with aliases translated and defaults filled in; unknown keys raise (config validation)."""
    aliases = CACHE_CONFIG_ALIASES.get(name, {})
    resolved = dict(CACHE_CONFIG_DEFAULTS[name])
    for key, value in (cache_config or {}).items():
        canonical = aliases.get(key, key)
        if canonical not in resolved:
            known = sorted([*resolved, *aliases]) or "none"
            raise ValueError(f"cache_config key {key!r} is not a setting of the {name!r} cache (its keys: {known}).")
        resolved[canonical] = value
    if name == "freecache":
        for key, least in (("window_left", 0), ("window_right", 1)):
            value = resolved[key]
            if (value is not None or key == "window_left") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < least):
                kind = "a non-negative integer" if least == 0 else "a positive integer (or None: every remaining position)"
                raise ValueError(f"cache_config {key} of the 'freecache' cache must be {kind}, got {value!r}.")
    if name == "dllm":
        for key in ("kp", "kr"):
            if isinstance(resolved[key], bool) or not isinstance(resolved[key], int) or resolved[key] < 1:
                raise ValueError(f"cache_config {key} of the 'dllm' cache must be a positive integer (a refresh"
                                 f" interval in forwards), got {resolved[key]!r}.")
        rou = resolved["rou"]
        if isinstance(rou, bool) or not isinstance(rou, (int, float)) or not 0.0 <= rou <= 1.0:
            raise ValueError(f"cache_config rou of the 'dllm' cache must be a share between 0 and 1 (the response"
                             f" rows recomputed between refreshes), got {rou!r}.")
    if name == "d2cache":
        checks = {
            "rollout_p": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0,
                          "a share between 0 and 1 (the attention-rollout mass recomputed)"),
            "current_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                          "a positive integer (masked positions recomputed per step)"),
            "sigma": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                      "a positive number (the width of the certainty-density kernel)"),
            "inflate_w": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                          "a non-negative integer (0: no inflation)"),
            "certainty_prior": (lambda v: isinstance(v, bool), "True or False"),
        }
        for key, (valid, kind) in checks.items():
            if not valid(resolved[key]):
                raise ValueError(f"cache_config {key} of the 'd2cache' cache must be {kind}, got {resolved[key]!r}.")
    return resolved
