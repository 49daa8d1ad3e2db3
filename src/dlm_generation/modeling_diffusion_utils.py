"""Building blocks shared by the diffusion LM modeling files (LLaDA, Dream).

This file travels with saved models (it is a single-dot sibling import of the modeling files), so it imports only
torch, transformers and (lazily, for a Hub file list) huggingface_hub, which transformers requires. It holds what both
architectures compute identically: RMSNorm in float32, rotary position embeddings, the bidirectional attention call
with its one cache contact point, the conversion of a padding mask into an SDPA mask, safetensors-only loading, and
the cache's name in forward arguments and outputs on every transformers 5.x release (see `CACHE_FIELD`).
"""

from __future__ import annotations

import math
import os
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .diffusion_cache import DiffusionCache

# transformers 5.24 renamed the cache of its model outputs and forward arguments from `past_key_values` to `cache`.
# The old name still works there, but every use logs "`past_key_values`/`cache_params` are deprecated. Use `cache`
# instead." (building an output, reading the attribute or key) or raises a FutureWarning (a forward argument).
# The name the installed release expects, read once from its output class's fields (no version comparison):
CACHE_FIELD = "cache" if any(field.name == "cache" for field in fields(CausalLMOutputWithPast)) else "past_key_values"


def causal_lm_output(logits: torch.Tensor, cache: DiffusionCache | None) -> CausalLMOutputWithPast:
    """The model output: `logits`, and the cache (when one was passed) under the installed transformers' field name,
    so `output.cache` (transformers >= 5.24) or `output.past_key_values` (5.23) reads it without a warning."""
    return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})


def forward_cache(past_key_values: DiffusionCache | None, kwargs: dict, model_name: str) -> DiffusionCache | None:
    """The diffusion cache a forward received as `past_key_values=` or as `cache=` (transformers' name from 5.24 on,
    popped from `kwargs`); None when neither was given. Both at once is a `ValueError`."""
    cache = kwargs.pop("cache", None)
    if cache is None:
        return past_key_values
    if past_key_values is not None:
        raise ValueError(
            f"{model_name}.forward got both past_key_values= and cache=; they name the same DiffusionCache "
            "(cache= is transformers' name from 5.24 on), so pass only one of them."
        )
    return cache


def _weight_files(names) -> tuple[list[str], bool]:
    """The pickle weight files among `names` (any variant or shard) and whether model safetensors are there."""
    pickles = sorted(n for n in names if n.startswith("pytorch_model") and (n.endswith(".bin") or n.endswith(".bin.index.json")))
    safetensors = any(n.startswith("model") and (n.endswith(".safetensors") or n.endswith(".safetensors.index.json"))
                      for n in names)
    return pickles, safetensors


class SafetensorsOnlyMixin:
    """Loads weights from safetensors only, unless the caller opts in to pickle files with `use_safetensors=False`.

    transformers itself prefers `model.safetensors` but falls back to `pytorch_model.bin`, which it reads with
    `torch.load(weights_only=True)` (a restricted unpickler: tensors and plain containers only). A pickle is still
    code-bearing data from whoever wrote the folder, so these models refuse that fallback: a local folder or a Hub
    repository whose file list shows only pickle weights raises (when the Hub cannot be reached, transformers decides
    as usual). `save_pretrained` writes safetensors (transformers' default).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if kwargs.get("use_safetensors") is not False and pretrained_model_name_or_path is not None \
                and not kwargs.get("gguf_file"):
            source = os.fspath(pretrained_model_name_or_path)
            subfolder = kwargs.get("subfolder") or ""
            names = None
            if os.path.isdir(os.path.join(source, subfolder)):
                names = os.listdir(os.path.join(source, subfolder))
            elif not kwargs.get("local_files_only") and not os.path.exists(source):
                try:  # a Hub id: its file list (no download); offline or private without a token: skip the check
                    from huggingface_hub import list_repo_files

                    prefix = f"{subfolder}/" if subfolder else ""
                    names = [n[len(prefix):] for n in list_repo_files(source, revision=kwargs.get("revision"),
                                                                      token=kwargs.get("token"))
                             if n.startswith(prefix) and "/" not in n[len(prefix):]]
                except Exception:  # noqa: BLE001  (any failure to list leaves the decision to transformers)
                    names = None
            if names is not None:
                pickles, has_safetensors = _weight_files(names)
                if pickles and not has_safetensors:
                    raise ValueError(
                        f"{source} holds only pickle weights ({', '.join(pickles)}), and these models load "
                        "safetensors only. Convert them (load once with use_safetensors=False, then "
                        "save_pretrained), or, if you trust whoever wrote them, pass use_safetensors=False to load "
                        "the pickle (transformers reads it with torch.load(weights_only=True))."
                    )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class DiffusionRMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as both reference models do."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        if input_dtype == torch.float32:  # the same arithmetic without the casts' Python overhead
            return self.weight * F.rms_norm(hidden_states, hidden_states.shape[-1:], eps=self.eps)
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(input_dtype)


class DiffusionRotaryEmbedding(nn.Module):
    """Rotary embedding (rotate-half layout) with tables computed in float32 at the requested positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        # Recomputed on demand (cheap): a registered buffer would be left uninitialised by meta-device loading.
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.int64).float() / self.head_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (batch, q_len) -> cos, sin: (batch, 1, q_len, head_dim)
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (batch, heads, q_len, head_dim) in float32 when `x` is of lower precision."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    rotated = x.to(compute_dtype) * cos.to(compute_dtype) + rotate_half(x.to(compute_dtype)) * sin.to(compute_dtype)
    return rotated.to(x.dtype)


def build_attention_mask(
    attention_mask: torch.Tensor | None, batch_size: int, key_length: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Turn a padding mask into something `scaled_dot_product_attention` accepts.

    * `None` or a 2-D mask without zeros -> `None` (full bidirectional attention, the fast path).
    * 2-D (batch, key_length) mask of 1/0 or True/False -> boolean (batch, 1, 1, key_length): padded keys are hidden
      from every query. Queries at padded positions still see the real keys, so their (unused) outputs stay finite.
    * 4-D boolean masks (True = attend) and 4-D additive float masks are passed through.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if attention_mask.shape != (batch_size, key_length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the keys have shape "
                f"({batch_size}, {key_length}); pass one entry per key position (1 = attend, 0 = padding)."
            )
        keep = attention_mask.bool()
        if bool(keep.all()):
            return None
        return keep[:, None, None, :]
    if attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask.to(dtype)
    raise ValueError(
        f"attention_mask must be 2-D (batch, keys) or 4-D (batch, 1, queries, keys); got {attention_mask.dim()}-D."
    )


# torch >= 2.5: scaled_dot_product_attention groups query heads over shared key/value heads itself (`enable_gqa`).
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def diffusion_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_key_values: DiffusionCache,
    layer_idx: int,
) -> torch.Tensor:
    """Bidirectional attention over (batch, heads, len, head_dim) tensors, grouped-query aware.

    `past_key_values.update` receives this step's keys (of the rows the layer recomputes) and values (of every row
    of the forward), already rotated, and returns the keys and values to attend to. The null cache returns its
    inputs unchanged.
    """
    key, value = past_key_values.update(key, value, layer_idx)
    n_rep = query.shape[1] // key.shape[1]
    scale = 1.0 / math.sqrt(query.shape[-1])
    needs_weights = past_key_values.needs_attention_weights
    weight_rows = past_key_values.attention_weight_rows(layer_idx, query.shape[0]) if needs_weights else None
    if weight_rows is not None:  # the weights of a few queries only: SDPA for the output, those rows explicitly
        picked = query.gather(2, weight_rows[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1]))
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:
            mask = mask.gather(2, weight_rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))
        keys = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
        past_key_values.observe_attention(layer_idx, _attention_weights(picked, keys, mask, scale).mean(1))
    if (not needs_weights or weight_rows is not None) and _SDPA_GQA:  # grouped heads without copying keys / values
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=False, scale=scale,
                                              enable_gqa=n_rep > 1)
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if not needs_weights or weight_rows is not None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=False, scale=scale)
    # The cache reads the weights (d2Cache's attention rollout): one explicit softmax over the queries this forward
    # runs, whose output is the attention output too (nothing is computed twice).
    weights = _attention_weights(query, key, attention_mask, scale)
    past_key_values.observe_attention(layer_idx, weights.mean(1))
    return torch.matmul(weights.to(value.dtype), value)


def _attention_weights(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) in float32 over (batch, heads, queries, head_dim) and (batch, heads, keys, head_dim),
    with a boolean (True = attend) or additive mask."""
    scores = torch.matmul(query, key.transpose(-1, -2)).to(torch.float32) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    return scores.softmax(-1)


def gather_rows(hidden_states: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows (positions) `rows` (batch, n) of `hidden_states` (batch, length, hidden); all of them for None."""
    if rows is None:
        return hidden_states
    return hidden_states.gather(1, rows[..., None].expand(-1, -1, hidden_states.shape[-1]))


def gather_rotary(rotary: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor | None):
    """The rotary tables (batch, 1, length, head_dim) at the rows `rows` (batch, n); unchanged for None."""
    if rows is None:
        return rotary
    index = rows[:, None, :, None].expand(-1, 1, -1, rotary[0].shape[-1])
    return tuple(table.expand(rows.shape[0], -1, -1, -1).gather(2, index) for table in rotary)


def select_logit_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Keep the hidden states whose logits are needed: 0 = all, an int n = the last n, a 1-D tensor = those indices."""
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden_states[:, logits_to_keep.to(hidden_states.device)]
    if logits_to_keep:
        return hidden_states[:, -logits_to_keep:]
    return hidden_states


def default_position_ids(
    attention_mask: torch.Tensor | None, batch_size: int, length: int, device: torch.device
) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1 (0 at padded slots), or 0..L-1 without a 2-D mask."""
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == length:
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return torch.arange(length, device=device).unsqueeze(0).expand(batch_size, length)


def layer_inputs(
    rotary: DiffusionRotaryEmbedding,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """The per-forward inputs every layer shares: rotary tables at the query positions and the SDPA mask."""
    batch, q_len, _ = hidden_states.shape
    if position_ids is None:
        position_ids = default_position_ids(attention_mask, batch, q_len, hidden_states.device)
    key_length = attention_mask.shape[-1] if attention_mask is not None else q_len
    mask = build_attention_mask(attention_mask, batch, key_length, hidden_states.dtype)
    return rotary(position_ids, hidden_states.dtype), mask
