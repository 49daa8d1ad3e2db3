"""Dream model configuration (Qwen2 layout, bidirectional attention, logits shifted by one position).

Accepts the real `config.json` of Dream-org/Dream-v0-Base-7B and Dream-v0-Instruct-7B unchanged (note the
capitalised `model_type` "Dream"). Defaults are those of Dream-v0-7B. Travels with saved models: imports only
transformers.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

DREAM_AUTO_MAP = {
    "AutoConfig": "configuration_dream.DreamConfig",
    "AutoModel": "modeling_dream.DreamModel",
    "AutoModelForCausalLM": "modeling_dream.DreamModel",
}


class DreamConfig(PreTrainedConfig):
    """Configuration of a Dream masked-diffusion transformer.

    Interpreted fields: `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
    `num_attention_heads`, `num_key_value_heads`, `hidden_act` (only "silu"), `rms_norm_eps`, `rope_theta`,
    `rope_scaling` (only null), `tie_word_embeddings`, `use_sliding_window` (only false), `mask_token_id`.
    The other fields of the original are kept so that configs round-trip.
    """

    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int | None = 4,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        use_mrope: bool = False,
        mask_token_id: int | None = 151666,
        bos_token_id: int | None = 151643,
        eos_token_id: int | None = 151643,
        pad_token_id: int | None = 151643,
        auto_map: dict | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.use_mrope = use_mrope
        self.mask_token_id = mask_token_id
        # A saved model must name all three auto classes so that it loads with trust_remote_code alone.
        self.auto_map = {**DREAM_AUTO_MAP, **(auto_map or {})}
        # transformers v5 keeps RoPE settings under rope_parameters (rope_scaling is its read-only alias).
        kwargs.setdefault("rope_parameters", rope_scaling)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._check_supported()

    def _check_supported(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"DreamConfig.hidden_act={self.hidden_act!r} is not supported; use 'silu'.")
        rope = getattr(self, "rope_parameters", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(
                f"DreamConfig.rope_scaling={rope!r} is not supported; Dream checkpoints use plain RoPE "
                "(rope_scaling null)."
            )
        if self.use_sliding_window:
            raise ValueError("DreamConfig.use_sliding_window=True is not supported; Dream attends over the full canvas.")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), and that by num_key_value_heads ({self.num_key_value_heads})."
            )


__all__ = ["DreamConfig"]
