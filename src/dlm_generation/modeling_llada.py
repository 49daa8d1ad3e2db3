"""LLaDA: a masked-diffusion transformer with LLaMA-style blocks and bidirectional attention.

Parameter names equal those of the released checkpoints (GSAI-ML/LLaDA-8B-Base, -Instruct, LLaDA-1.5), so their
safetensors load directly:

    model.transformer.wte.weight                       token embeddings (embedding_size x d_model)
    model.transformer.blocks.{i}.attn_norm / ff_norm   RMSNorm weights
    model.transformer.blocks.{i}.q_proj / k_proj / v_proj / attn_out
    model.transformer.blocks.{i}.ff_proj (gate) / up_proj / ff_out (down)
    model.transformer.ln_f.weight                      final RMSNorm
    model.transformer.ff_out.weight                    output head (absent when weight_tying)

Differences from the original remote code: attention masks (2-D padding masks) are honoured with position ids that
skip left padding, the diffusion cache hook replaces the original KV-cache plumbing, and the model works on
transformers v5. No logit shift: position i predicts token i.

Travels with saved models: imports only torch, transformers and sibling files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig
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


class LLaDALlamaBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + SwiGLU(norm(x))."""

    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.d_model // config.n_heads
        qkv_bias = config.include_bias or config.include_qkv_bias
        self.attn_norm = DiffusionRMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_norm = DiffusionRMSNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=config.include_bias)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_width, bias=config.include_bias)
        self.up_proj = nn.Linear(config.d_model, config.mlp_width, bias=config.include_bias)
        self.ff_out = nn.Linear(config.mlp_width, config.d_model, bias=config.include_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: DiffusionCache,
    ) -> torch.Tensor:
        # The layer calls the cache's layer hooks (DiffusionCache): `recompute_rows` (which rows to recompute, given
        # their fresh values), `update` (the keys and values to attend to), `observe_attention` (only for caches that
        # ask for attention weights) and `reuse` (the attention and FFN outputs of the rows it does not recompute).
        batch, length, _ = hidden_states.shape
        h = self.attn_norm(hidden_states)
        # (batch, len, d_model) -> (batch, heads, len, head_dim)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rows = past_key_values.recompute_rows(self.layer_idx, v)
        h = gather_rows(h, rows)
        q_len = h.shape[1]
        q = self.q_proj(h).view(batch, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = gather_rotary(rotary, rows)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = diffusion_attention(q, k, v, attention_mask, past_key_values, self.layer_idx)
        attn = self.attn_out(attn.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.head_dim))
        hidden_states = hidden_states + past_key_values.reuse(self.layer_idx, "attention", attn)

        h = self.ff_norm(gather_rows(hidden_states, rows))
        ffn = self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return hidden_states + past_key_values.reuse(self.layer_idx, "ffn", ffn)


class LLaDAPreTrainedModel(SafetensorsOnlyMixin, PreTrainedModel):
    config_class = LLaDAConfig
    config: LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False


class LLaDAModel(LLaDAPreTrainedModel):
    """The transformer body; `forward` returns logits over `embedding_size` entries."""

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        modules = {
            "wte": nn.Embedding(config.output_size, config.d_model),
            "blocks": nn.ModuleList(LLaDALlamaBlock(config, i) for i in range(config.n_layers)),
            "ln_f": DiffusionRMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.output_size, bias=config.include_bias)
        self.transformer = nn.ModuleDict(modules)
        self.rotary = DiffusionRotaryEmbedding(config.d_model // config.n_heads, config.rope_theta)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DiffusionCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        cache = past_key_values if past_key_values is not None else DiffusionCache()
        rotary, mask = layer_inputs(self.rotary, x, attention_mask, position_ids)
        for block in self.transformer.blocks:
            x = block(x, rotary, mask, cache)
        x = self.transformer.ln_f(select_logit_positions(x, logits_to_keep))
        head = self.transformer.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        bias = None if self.config.weight_tying else self.transformer.ff_out.bias
        return F.linear(x, head, bias)


class LLaDAModelLM(LLaDAPreTrainedModel, DiffusionGenerationMixin):
    """LLaDA with the diffusion generation mixin: `diffusion_generate()` and a pipeline-compatible `generate()`."""

    diffusion_logits_shift = 0
    diffusion_generation_defaults = {"schedule": "linear", "alg": "low_confidence"}

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()
        self._fill_generation_config_defaults()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module | None:
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DiffusionCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for every position (or those in `logits_to_keep`) of a partially masked sequence.

        Args:
            input_ids: (batch, length) token ids, masked positions holding `config.mask_token_id`.
            attention_mask: (batch, key_length) 1 = real token, 0 = padding; or a 4-D boolean / additive mask.
            position_ids: (batch, length) RoPE positions; by default they skip left padding.
            past_key_values: a `DiffusionCache` (the null cache when omitted); `cache=` (transformers' name from
                5.24 on) is accepted too.
            logits_to_keep: 0 = logits everywhere, n = the last n positions, a 1-D tensor = those positions.
        """
        past_key_values = forward_cache(past_key_values, kwargs, "LLaDAModelLM")
        unexpected = {key for key, value in kwargs.items() if value is not None and key not in {"use_cache"}}
        if unexpected:
            raise TypeError(f"LLaDAModelLM.forward got unexpected arguments {sorted(unexpected)}.")
        logits = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            logits_to_keep=logits_to_keep,
        )
        if return_dict is False:
            return (logits,)
        return causal_lm_output(logits, past_key_values)


__all__ = ["LLaDAModelLM", "LLaDAModel", "LLaDAPreTrainedModel"]
