"""SDAR model configuration (JetLM SDAR-Chat: Qwen3 adapted to block diffusion; arXiv 2510.06303).

Accepts the released `config.json` of JetLM/SDAR-4B-Chat and SDAR-8B-Chat unchanged (`model_type` "sdar": Qwen3
fields, `block_size`, the block size the model was trained with, and `mask_token_id`, `<|MASK|>` = 151669). The
released file's training switches (`fuse_cross_entropy`, `micro_forward`, `skip_checkpoint`, `use_deepep`,
`ep_size`, `debug`) and its `attn_implementation` ("flex_attention", the training kernel) are kept so the config
round-trips; inference here always runs PyTorch's SDPA, so `attn_implementation` is stored as
`released_attn_implementation` and never handed to transformers. Defaults are those of SDAR-4B-Chat.

Travels with saved models: imports only transformers and a sibling file.
"""

from __future__ import annotations

from .configuration_dream import DreamConfig

SDAR_AUTO_MAP = {
    "AutoConfig": "configuration_sdar.SDARConfig",
    "AutoModel": "modeling_sdar.SDARForCausalLM",
    "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
}


class SDARConfig(DreamConfig):
    """Configuration of an SDAR block-diffusion transformer: a Qwen3 body (Qwen3's parameter names: RMSNorm on each
    head's queries and keys, `head_dim` independent of `hidden_size`) whose attention is bidirectional inside blocks
    of `block_size` positions and causal across blocks. Logits are not shifted (position i predicts token i)."""

    model_type = "sdar"

    def __init__(self, vocab_size: int = 151936, hidden_size: int = 2560, intermediate_size: int = 9728,
                 num_hidden_layers: int = 36, num_attention_heads: int = 32, num_key_value_heads: int | None = 8,
                 head_dim: int | None = 128, attention_bias: bool = False, max_position_embeddings: int = 32768,
                 rope_theta: float = 1000000.0, block_size: int = 4, mask_token_id: int | None = 151669,
                 bos_token_id: int | None = 151643, eos_token_id: int | list[int] | None = 151643,
                 pad_token_id: int | None = None, auto_map: dict | None = None, **kwargs):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"SDARConfig.block_size must be a positive integer (the trained block size), got "
                             f"{block_size!r}.")
        self.block_size = block_size
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.attention_bias = attention_bias
        released = kwargs.pop("attn_implementation", None)
        if released is not None:
            kwargs.setdefault("released_attn_implementation", released)
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                         rope_theta=rope_theta, mask_token_id=mask_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        # A saved model names this family's code files, not the released `modeling_sdar.SDARForCausalLM` closure
        # (which needs flash-attn and triton).
        self.auto_map = {**(auto_map or {}), **SDAR_AUTO_MAP}

    def _check_supported(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"SDARConfig.hidden_act={self.hidden_act!r} is not supported; use 'silu'.")
        rope = getattr(self, "rope_parameters", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"SDARConfig.rope_scaling={rope!r} is not supported; SDAR checkpoints use plain RoPE "
                             "(rope_scaling null).")
        if self.use_sliding_window:
            raise ValueError("SDARConfig.use_sliding_window=True is not supported; the released models attend over "
                             "the whole sequence (block-causally).")
        if not (isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0):
            raise ValueError(f"SDARConfig.head_dim must be a positive even integer (rotary halves), got "
                             f"{self.head_dim!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads}).")


__all__ = ["SDARConfig"]
