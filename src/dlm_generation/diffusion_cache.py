"""The diffusion cache protocol, its null object, and what the caches share.

A diffusion cache decides, per denoising step, which canvas positions the model recomputes, and keeps whatever it
needs between steps. Two sides talk to it:

* The denoising loop, through lifecycle hooks: `begin_generation` (once), `begin_block` (per semi-AR block),
  `plan_step` (before every forward: which positions to run, which keys to attend to), `rescore` (the scores the
  commit policy ranks by), `settled_before`, `end_step` (after the step's commits) and `end_generation` (frees what
  the cache holds).
* The model, in every layer (the same calls in every model file):
  - `recompute_rows(layer_idx, value)`, first: given the fresh values of every position of the forward, which rows
    the layer recomputes (None: all of them; feature caches such as dLLM-Cache choose a subset per layer);
  - `update(key, value, layer_idx)` inside attention (`modeling_diffusion_utils.diffusion_attention`): the keys
    of the recomputed rows and the values of every row in, the keys and values to attend to out;
  - `observe_attention(layer_idx, weights)`, only for a cache with `needs_attention_weights`: the head-averaged
    attention weights of the forward's queries (or of the rows `attention_weight_rows` names);
  - `reuse(layer_idx, "attention" | "ffn", output)`, twice: the recomputed rows' attention / FFN output in, the
    output of every row of the forward out (the cache fills in the rows it did not recompute).

`DiffusionCache` itself is the null cache: every step runs the whole canvas and nothing is stored. A real cache
(`diffusion_kv_caches.py`, `diffusion_adaptive_caches.py`) is a subclass that overrides only the hooks it needs;
the loop never branches on the cache type. A cache class also owns its settings: `cache_name`, the `cache_config`
keys with their defaults, aliases and value checks (class attributes, applied by `resolve_cache_config`). The
caches that keep keys and values per layer store them in a `LayerKVStore`. The registry of the
`cache_implementation` names is built from the classes in `diffusion_caches.py`. See docs/write-your-own-cache.md.

This file travels with saved models, so it imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


def is_int(value: Any) -> bool:
    """An integer, and not a bool (for `cache_config_checks`)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, and not a bool (for `cache_config_checks`)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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

    `forward_end`: the loop may lower it per block (`suffix_window`, DPad); a cache with `supports_suffix_window`
    plans no position at or after it.

    Subclasses override what they need:

    * `plan_step(canvas, step)`: the `CacheStep` of the next forward (`step` counts from 0 inside the block).
    * `settled_before()`: this block's later steps give no fresh logits left of this position (caches that freeze
      the prefix return the block start). The loop commits eligible masks there at the step that still sees them.
    * `update(key, value, layer_idx)`: store / splice keys and values (already rotated), return those to attend to.
    * `recompute_rows(layer_idx, value)` and `reuse(layer_idx, name, output)`: recompute only some rows of a layer
      and reuse cached attention / FFN outputs for the others (the null cache: every row, nothing reused).
    * `observe_attention(layer_idx, weights)` (with `needs_attention_weights`) and `rescore(...)`: read the
      attention weights; change the scores the commit policy ranks by.
    * `begin_generation`, `begin_block`, `end_step`, `end_generation`: reset, move, release state.

    They declare their settings as class attributes: `cache_name`, `cache_config_defaults`, `cache_config_aliases`
    and `cache_config_checks` (a subclass with a rule across keys extends the classmethod `resolve_cache_config`).
    """

    # Capabilities (the loop and the model read these flags; they never ask for a cache's type):
    needs_attention_weights = False  # attention hands the head-averaged weights to `observe_attention`
    needs_token_probability = False  # StepOutcome.probability is filled for every scorer (alg)
    # Given to begin_generation for AR-guided decoding: guided rows commit left to right from their first mask, so a
    # cache that chooses which masked positions to compute must include each row's first `guided_frontier` masks.
    guided_frontier = 0
    # True for a cache whose plans end at `forward_end` (DPad's `suffix_window`: the loop sets it per block, and the
    # forwards leave the canvas after it out); a cache that plans over the whole canvas by construction keeps False
    # and the loop refuses `suffix_window` with it.
    supports_suffix_window = False

    def honours_forward_end(self) -> bool:
        """Whether this cache's forwards end at `forward_end` (`suffix_window` works with it): the null cache's do,
        a subclass's when it declares `supports_suffix_window`."""
        return self.supports_suffix_window or type(self) is DiffusionCache
    # True for a cache built for block-causal attention (the block-diffusion models' exact KV cache); the loop refuses
    # it for full-attention models, and block-diffusion models refuse the others.
    block_causal_only = False

    # Settings: the `cache_config` keys this cache accepts with their defaults, other names accepted for them, and
    # per key a check of the value with what it expects (for the error message). A subclass declares its own; the
    # base class translates aliases, fills in defaults, refuses unknown keys and runs the checks.
    cache_name: str | None = None  # the `cache_implementation` name (in messages; the class name when None)
    cache_config_defaults: dict[str, Any] = {}
    cache_config_aliases: dict[str, str] = {}
    cache_config_checks: dict[str, tuple[Callable[[Any], bool], str]] = {}

    def __init__(self, cache_config: dict | None = None):
        self.cache_config = self.resolve_cache_config(cache_config)
        self.canvas_length = 0

    @classmethod
    def resolve_cache_config(cls, cache_config: dict | None) -> dict[str, Any]:
        """`cache_config` with aliases translated and defaults filled in; an unknown key or a bad value raises a
        `ValueError` (the configuration validates `cache_config` with this too)."""
        name = cls.cache_name or cls.__name__
        aliases = cls.cache_config_aliases
        known = sorted([*cls.cache_config_defaults, *aliases]) or "none"
        if cache_config is not None and not isinstance(cache_config, dict):
            raise ValueError(f"cache_config of the {name!r} cache must be a dict of its settings (its keys: {known}),"
                             f" got {cache_config!r}.")
        resolved = dict(cls.cache_config_defaults)
        for key, value in (cache_config or {}).items():
            canonical = aliases.get(key, key)
            if canonical not in resolved:
                raise ValueError(f"cache_config key {key!r} is not a setting of the {name!r} cache (its keys: {known}).")
            resolved[canonical] = value
        for key, (valid, expected) in cls.cache_config_checks.items():
            if not valid(resolved[key]):
                raise ValueError(f"cache_config {key} of the {name!r} cache must be {expected}, got {resolved[key]!r}.")
        return resolved

    # ----------------------------------------------------------------------------------------- loop side
    def begin_generation(self, canvas: torch.Tensor, attention_mask: torch.Tensor | None, mask_token_id: int,
                         prompt_length: int | None = None, logits_shift: int = 0, guided_frontier: int = 0) -> None:
        """Called once before the first step, with the initial canvas (batch, length), the padding mask (or None),
        the mask id, the (left-padded) prompt length (positions from it on are generated), the model's logit
        shift (1 for Dream: position i's prediction is read at i - 1) and, for an AR-guided call, the guide's
        `verify_chunk` as `guided_frontier` (0 unguided; see the class attribute)."""
        self.guided_frontier = guided_frontier
        self.canvas_length = canvas.shape[1]
        self.prompt_length = canvas.shape[1] if prompt_length is None else prompt_length
        self.logits_shift = logits_shift
        self.mask_token_id = mask_token_id
        self.block_start, self.block_end = self.prompt_length, self.canvas_length
        # Forwards run positions before this only (the loop lowers it per block for `suffix_window`).
        self.forward_end = self.canvas_length

    def begin_block(self, block_start: int, block_end: int) -> None:
        """Called when the loop moves to the block [block_start, block_end) of the canvas (kept as block_start /
        block_end)."""
        self.block_start, self.block_end = block_start, block_end

    def plan_step(self, canvas: torch.Tensor, step: int) -> CacheStep:
        """The positions the next forward runs and the keys they see (the null cache: everything up to
        `forward_end`, the canvas end unless `suffix_window` lowers it)."""
        end = self.forward_end if self.canvas_length else canvas.shape[1]
        return CacheStep(0, end, end)

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

    def attention_weight_rows(self, layer_idx: int, batch: int) -> torch.Tensor | None:
        """Model side, with `needs_attention_weights`, before attention: None to observe the weights of every query
        of the forward (one explicit softmax that also gives the output), or the rows (`batch`, n) of the forward's
        queries whose weights `observe_attention` should get (the output then comes from SDPA)."""
        return None

    def reuse(self, layer_idx: int, name: str, output: torch.Tensor) -> torch.Tensor:
        """Model side, after attention (`name="attention"`) and after the FFN (`"ffn"`): the recomputed rows' output
        (batch, n, hidden) in, the output of every row of the forward out (the null cache: unchanged)."""
        return output



def scatter_rows(stored: torch.Tensor, dim: int, rows: torch.Tensor, valid: torch.Tensor, fresh: torch.Tensor) -> None:
    """In place: stored[b, ..., rows[b, i], ...] = fresh[b, ..., i, ...] along `dim` where valid[b, i]; elsewhere
    stored keeps its value (the rows of a batch padded to a common count)."""
    shape = [1] * stored.dim()
    shape[0], shape[dim] = rows.shape
    expand = list(stored.shape)
    expand[dim] = rows.shape[1]
    index = rows.view(shape).expand(expand)
    kept = stored.gather(dim, index)
    stored.scatter_(dim, index, torch.where(valid.view(shape), fresh, kept))


class LayerKVStore:
    """The keys and values a cache keeps, per layer: (batch, kv_heads, positions, head_dim) tensors, already rotated
    (`keys[layer_idx]`, `values[layer_idx]`).

    A layer is filled in one of two ways: `allocate` tensors for the whole canvas once per call and write into them
    in place (`write` a contiguous range, `write_rows` scattered positions per batch row), which keeps their shapes
    unchanged across steps (what graph capture needs); or `adopt` a full forward's tensors as they are (no copy) and
    write into those later.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def __contains__(self, layer_idx: int) -> bool:
        return layer_idx in self.keys

    def clear(self) -> None:
        """Release every layer's tensors."""
        self.keys, self.values = {}, {}

    def allocate(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, length: int) -> None:
        """Give the layer (uninitialised) tensors of `length` positions, shaped and typed like `key` / `value` otherwise,
        unless it holds them already for the same batch size."""
        stored = self.keys.get(layer_idx)
        if stored is None or stored.shape[0] != key.shape[0]:
            shape = (key.shape[0], key.shape[1], length, key.shape[3])
            self.keys[layer_idx] = key.new_empty(shape)
            self.values[layer_idx] = value.new_empty(shape)

    def adopt(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """The layer's keys and values become these tensors (a forward over every position; no copy)."""
        self.keys[layer_idx], self.values[layer_idx] = key, value

    def write(self, layer_idx: int, start: int, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
              own: torch.Tensor | None = None) -> None:
        """In place: the fresh keys and/or values of positions [start, start + n) (n = their length). `own` (batch, n),
        or (batch, 1) for whole rows, says where the fresh entry counts; elsewhere the stored one is kept."""
        for stored, fresh in ((self.keys, key), (self.values, value)):
            if fresh is None:
                continue
            span = slice(start, start + fresh.shape[2])
            target = stored[layer_idx]
            if own is not None:
                fresh = torch.where(own[:, None, :, None], fresh, target[:, :, span])
            target[:, :, span] = fresh

    def write_rows(self, layer_idx: int, rows: torch.Tensor, valid: torch.Tensor, key: torch.Tensor | None = None,
                   value: torch.Tensor | None = None) -> None:
        """In place: the fresh keys and/or values of scattered positions, per batch row: entry i of row b goes to
        position rows[b, i] where valid[b, i]; every other position (and a padding entry's target) keeps its value."""
        for stored, fresh in ((self.keys, key), (self.values, value)):
            if fresh is not None:
                scatter_rows(stored[layer_idx], 2, rows, valid, fresh)

    def read(self, layer_idx: int, key_end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values of positions [0, key_end) (None: all it holds)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if key_end is None:
            return keys, values
        return keys[:, :, :key_end], values[:, :, :key_end]
