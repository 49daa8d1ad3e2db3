"""Dream: a masked-diffusion transformer in the Qwen2 layout with bidirectional attention.

Parameter names equal those of Dream-org/Dream-v0-Base-7B and Dream-v0-Instruct-7B (Qwen2 naming):

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}, model.layers.{i}.self_attn.o_proj.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight

Dream was adapted from an autoregressive model, so its logits stay shifted: the prediction for position i is read
at position i - 1. The model declares this with `diffusion_logits_shift = 1`; the generation loop applies it.

Travels with saved models: imports only torch, transformers and sibling files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_dream import DreamConfig
from .diffusion_cache import DiffusionCache
from .generation_utils import DiffusionGenerationMixin
from .modeling_diffusion_utils import (
    DiffusionRMSNorm,
    SafetensorsOnlyMixin,
    DiffusionRotaryEmbedding,
    apply_rotary,
    causal_lm_output,
    diffusion_attention,
    forward_cache,
    gather_rotary,
    gather_rows,
    layer_inputs,
    select_logit_positions,
)


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: DiffusionCache,
    ) -> torch.Tensor:
        """Attention output (batch, rows, hidden) of the rows the cache recomputes (all by default), and those rows."""
        batch, length, _ = hidden_states.shape
        # (batch, len, hidden) -> (batch, heads, len, head_dim)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        rows = past_key_values.recompute_rows(self.layer_idx, v)
        hidden_states = gather_rows(hidden_states, rows)
        q_len = hidden_states.shape[1]
        q = self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = gather_rotary(rotary, rows)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = diffusion_attention(q, k, v, attention_mask, past_key_values, self.layer_idx)
        return self.o_proj(attn.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)), rows


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DiffusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DiffusionRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, rotary, attention_mask, past_key_values) -> torch.Tensor:
        # The layer calls the cache's layer hooks (DiffusionCache): `recompute_rows` (which rows to recompute, given
        # their fresh values), `update` (the keys and values to attend to), `observe_attention` (only for caches that
        # ask for attention weights) and `reuse` (the attention and FFN outputs of the rows it does not recompute).
        layer = self.self_attn.layer_idx
        attn, rows = self.self_attn(self.input_layernorm(hidden_states), rotary, attention_mask, past_key_values)
        hidden_states = hidden_states + past_key_values.reuse(layer, "attention", attn)
        ffn = self.mlp(self.post_attention_layernorm(gather_rows(hidden_states, rows)))
        return hidden_states + past_key_values.reuse(layer, "ffn", ffn)


class DreamPreTrainedModel(SafetensorsOnlyMixin, PreTrainedModel):
    config_class = DreamConfig
    config: DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False


class DreamBaseModel(DreamPreTrainedModel):
    """The transformer body; `forward` returns the final hidden states."""

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DiffusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = DiffusionRotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DiffusionCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = past_key_values if past_key_values is not None else DiffusionCache()
        rotary, mask = layer_inputs(self.rotary, x, attention_mask, position_ids)
        for layer in self.layers:
            x = layer(x, rotary, mask, cache)
        return self.norm(x)


class DreamModel(DreamPreTrainedModel, DiffusionGenerationMixin):
    """Dream with the diffusion generation mixin: `diffusion_generate()` and a pipeline-compatible `generate()`."""

    diffusion_logits_shift = 1
    diffusion_generation_defaults = {"schedule": "eps", "alg": "entropy", "eps": 1e-3}
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self._fill_generation_config_defaults()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DiffusionCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Unshifted logits (position i holds the prediction for position i + 1), as the original model returns.

        Args:
            input_ids: (batch, length) token ids, masked positions holding `config.mask_token_id`.
            attention_mask: (batch, key_length) 1 = real token, 0 = padding; or a 4-D boolean / additive mask.
            position_ids: (batch, length) RoPE positions; by default they skip left padding.
            past_key_values: a `DiffusionCache` (the null cache when omitted); `cache=` (transformers' name from
                5.24 on) is accepted too.
            logits_to_keep: 0 = logits everywhere, n = the last n positions, a 1-D tensor = those positions.
        """
        past_key_values = forward_cache(past_key_values, kwargs, "DreamModel")
        unexpected = {key for key, value in kwargs.items() if value is not None and key not in {"use_cache"}}
        if unexpected:
            raise TypeError(f"DreamModel.forward got unexpected arguments {sorted(unexpected)}.")
        hidden_states = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
        )
        logits = self.lm_head(select_logit_positions(hidden_states, logits_to_keep))
        if return_dict is False:
            return (logits,)
        return causal_lm_output(logits, past_key_values)


__all__ = ["DreamModel", "DreamBaseModel", "DreamPreTrainedModel"]
