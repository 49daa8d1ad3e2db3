"""SDAR (JetLM SDAR-Chat, arXiv 2510.06303): Qwen3 adapted into a block-diffusion model.

Parameter names equal those of JetLM/SDAR-4B-Chat and SDAR-8B-Chat (Qwen3 naming):

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, model.layers.{i}.self_attn.{q,k}_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight

The body is Qwen3's: Dream's layer with an RMSNorm over each head's queries and keys before the rotary embedding and
a `head_dim` of its own. Attention is bidirectional inside blocks of `config.block_size` positions and causal across
blocks (`BlockDiffusionMixin`); logits are not shifted (position i predicts token i; the model was trained to
predict the masked token in place). Decoding follows the authors' evaluation code (`block_diffusion_generate` of
their OpenCompass model `BD3withChatTemplate`): blocks of 4, one step per token (`low_confidence_static`), or with a
`threshold` the dynamic rule (every position with probability > threshold, at least the schedule's count); the
committed block re-run once into the exact cache; a stop checked when a block is complete.

Travels with saved models: imports only torch, transformers and sibling files.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_sdar import SDARConfig
from .diffusion_cache import DiffusionCache
from .modeling_block_diffusion import BlockDiffusionMixin
from .modeling_diffusion_utils import (
    DiffusionRMSNorm,
    DiffusionRotaryEmbedding,
    apply_rotary,
    diffusion_attention,
    gather_rotary,
    gather_rows,
    layer_inputs,
)
from .modeling_dream import DreamDecoderLayer, DreamModel, DreamPreTrainedModel


class SDARAttention(nn.Module):
    """Qwen3 attention: per-head RMSNorm on queries and keys (`q_norm`, `k_norm`), then the rotary embedding."""

    def __init__(self, config: SDARConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = DiffusionRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = DiffusionRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, past_key_values: DiffusionCache):
        """Attention output (batch, rows, hidden) of the rows the cache recomputes (all by default), and those rows."""
        batch, length, _ = hidden_states.shape
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        rows = past_key_values.recompute_rows(self.layer_idx, v)
        hidden_states = gather_rows(hidden_states, rows)
        q_len = hidden_states.shape[1]
        q = self.q_norm(self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(batch, q_len, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        cos, sin = gather_rotary(rotary, rows)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = diffusion_attention(q, k, v, attention_mask, past_key_values, self.layer_idx)
        return self.o_proj(attn.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)), rows


class SDARDecoderLayer(DreamDecoderLayer):
    """Dream's pre-norm layer (and its cache hooks) around Qwen3 attention."""

    def __init__(self, config: SDARConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = SDARAttention(config, layer_idx)


class SDARPreTrainedModel(DreamPreTrainedModel):
    config_class = SDARConfig
    config: SDARConfig
    _no_split_modules = ["SDARDecoderLayer"]


class SDARBaseModel(SDARPreTrainedModel):
    """The transformer body; `forward` returns the final hidden states."""

    def __init__(self, config: SDARConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SDARDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DiffusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = DiffusionRotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = past_key_values if past_key_values is not None else DiffusionCache()
        rotary, mask = layer_inputs(self.rotary, x, attention_mask, position_ids)
        for layer in self.layers:
            x = layer(x, rotary, mask, cache)
        return self.norm(x)


class SDARForCausalLM(BlockDiffusionMixin, DreamModel):
    """An SDAR model with the diffusion generation mixin: `diffusion_generate()` and a pipeline-compatible
    `generate()`. `forward` returns logits at every position for that position (no shift)."""

    config_class = SDARConfig
    config: SDARConfig
    _no_split_modules = ["SDARDecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    diffusion_logits_shift = 0
    diffusion_family_name = "SDAR"
    diffusion_block_size_field = "block_size"
    # The released generation_config.json names the chat stop ids ([<|im_end|>, <|endoftext|>]) that the authors'
    # evaluation stops on; its sampling settings are the base model's and are not read.
    diffusion_released_config_ids = ("bos_token_id", "pad_token_id", "eos_token_id")
    diffusion_threshold_strict = True  # the reference commits probability > threshold
    diffusion_threshold_at_least_count = True  # low_confidence_dynamic: at least the schedule's count per step
    diffusion_schedule_aligned = True  # the schedule spreads the aligned block's length (not its masks) over steps
    diffusion_stop_at_block_end = True  # the reference checks for a stop token once a block is complete

    def __init__(self, config: SDARConfig):
        super(DreamModel, self).__init__(config)
        self.model = SDARBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self._fill_generation_config_defaults()

    @property
    def diffusion_generation_defaults(self) -> dict:
        """The authors' evaluation settings: blocks of the trained size (4), one token per step
        (`low_confidence_static`, denoising_steps = block_length), greedy, the exact block cache, a stop once a
        block holding a stop token is complete. `threshold=0.9` gives their dynamic decoding."""
        return {"schedule": "linear", "alg": "low_confidence", "block_length": self.config.block_size,
                "cache_implementation": "block", "eos_early_stop": True}

    def _check_block_diffusion_settings(self, config) -> list[str]:
        if config.sub_block_length is not None:
            return [f"sub_block_length={config.sub_block_length}: sub-blocks are Fast-dLLM v2's; SDAR decodes whole "
                    "blocks (leave it unset)."]
        return []


__all__ = ["SDARForCausalLM", "SDARBaseModel", "SDARPreTrainedModel"]
