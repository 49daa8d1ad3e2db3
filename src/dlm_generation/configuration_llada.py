"""LLaDA model configuration.

Accepts the real `config.json` of GSAI-ML/LLaDA-8B-Base, LLaDA-8B-Instruct and LLaDA-1.5 unchanged (field names
follow the OLMo-style originals). Defaults are those of LLaDA-8B. Travels with saved models: imports only
transformers.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}


class LLaDAConfig(PreTrainedConfig):
    """Configuration of a LLaDA masked-diffusion transformer (LLaMA-style blocks, bidirectional attention).

    Only the fields that change the computation are interpreted: `d_model`, `n_heads`, `n_kv_heads`, `n_layers`,
    `mlp_hidden_size`, `vocab_size`, `embedding_size`, `rms_norm_eps`, `rope_theta`, `include_bias`,
    `include_qkv_bias`, `weight_tying`, `block_type` (only "llama"), `layer_norm_type` (only "rms"),
    `activation_type` (only "silu"), `rope` (must be true), `alibi` (must be false), `mask_token_id`. The other
    fields of the original (dropouts, init settings, `precision`, `flash_attention`, ...) are kept so that configs
    round-trip, and have no effect at inference.
    """

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_ratio: int = 4,
        mlp_hidden_size: int | None = 12288,
        activation_type: str = "silu",
        block_type: str = "llama",
        block_group_size: int = 1,
        alibi: bool = False,
        alibi_bias_max: float = 8.0,
        rope: bool = True,
        rope_full_precision: bool = True,
        rope_theta: float = 500000.0,
        flash_attention: bool = False,
        attention_dropout: float = 0.0,
        multi_query_attention: bool | None = None,
        attention_layer_norm: bool = False,
        residual_dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        input_emb_norm: bool = False,
        layer_norm_type: str = "rms",
        layer_norm_with_affine: bool = True,
        rms_norm_eps: float = 1e-5,
        attention_layer_norm_with_affine: bool = True,
        max_sequence_length: int = 4096,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        bias_for_layer_norm: bool | None = False,
        scale_logits: bool = False,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        weight_tying: bool = False,
        mask_token_id: int | None = 126336,
        eos_token_id: int | None = 126081,
        pad_token_id: int | None = 126081,
        init_device: str | None = "meta",
        init_fn: str = "mitchell",
        init_std: float = 0.02,
        init_cutoff_factor: float | None = None,
        precision: str | None = "amp_bf16",
        use_cache: bool = False,
        auto_map: dict | None = None,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size
        self.activation_type = activation_type
        self.block_type = block_type
        self.block_group_size = block_group_size
        self.alibi = alibi
        self.alibi_bias_max = alibi_bias_max
        self.rope = rope
        self.rope_full_precision = rope_full_precision
        self.rope_theta = rope_theta
        self.flash_attention = flash_attention
        self.attention_dropout = attention_dropout
        self.multi_query_attention = multi_query_attention
        self.attention_layer_norm = attention_layer_norm
        self.residual_dropout = residual_dropout
        self.embedding_dropout = embedding_dropout
        self.input_emb_norm = input_emb_norm
        self.layer_norm_type = layer_norm_type
        self.layer_norm_with_affine = layer_norm_with_affine
        self.rms_norm_eps = rms_norm_eps
        self.attention_layer_norm_with_affine = attention_layer_norm_with_affine
        self.max_sequence_length = max_sequence_length
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.bias_for_layer_norm = bias_for_layer_norm
        self.scale_logits = scale_logits
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        self.init_device = init_device
        self.init_fn = init_fn
        self.init_std = init_std
        self.init_cutoff_factor = init_cutoff_factor
        self.precision = precision
        self.use_cache = use_cache
        # A saved model must name all three auto classes so that it loads with trust_remote_code alone.
        self.auto_map = {**LLADA_AUTO_MAP, **(auto_map or {})}
        kwargs.setdefault("tie_word_embeddings", weight_tying)
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self._check_supported()

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def output_size(self) -> int:
        return self.embedding_size if self.embedding_size is not None else self.vocab_size

    def _check_supported(self) -> None:
        unsupported = {
            "block_type": (self.block_type, "llama"),
            "layer_norm_type": (self.layer_norm_type, "rms"),
            "activation_type": (self.activation_type, "silu"),
            "rope": (self.rope, True),
            "alibi": (self.alibi, False),
            "attention_layer_norm": (self.attention_layer_norm, False),
            "input_emb_norm": (self.input_emb_norm, False),
            "scale_logits": (self.scale_logits, False),
        }
        for field, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(
                    f"LLaDAConfig.{field}={value!r} is not supported; every released LLaDA checkpoint uses "
                    f"{field}={supported!r}. Set it to {supported!r}."
                )
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), and n_heads by n_kv_heads "
                f"({self.n_kv_heads})."
            )


__all__ = ["LLaDAConfig"]
