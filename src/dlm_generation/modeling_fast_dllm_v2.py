"""Fast-dLLM v2 (NVlabs, arXiv 2509.26328): Qwen2.5 adapted into a block-diffusion model.

The body is Dream's (`modeling_dream.py`: Qwen2 blocks with Qwen2's parameter names, so the released weights and
any `Qwen2ForCausalLM` checkpoint load unchanged) and so is the logit shift (position i - 1 predicts token i, the
AR model's token shift). What differs is attention: bidirectional inside blocks of `config.bd_size` positions and
causal across blocks (`block_causal_mask`), the inference mask of the reference code (`eval_block_diff_mask`).
Blocks are counted from each row's first real token (its position id 0), so a left-padded row has the blocks it
has alone.

Travels with saved models: imports only torch, transformers and sibling files.
"""

from __future__ import annotations

from .configuration_fast_dllm_v2 import FastDLLMV2Config
from .modeling_block_diffusion import BlockDiffusionMixin, block_causal_mask
from .modeling_dream import DreamModel


class FastDLLMV2Model(BlockDiffusionMixin, DreamModel):
    """A Fast-dLLM v2 model: Dream's body and logit shift under the block-causal mask of `config.bd_size`
    (`BlockDiffusionMixin`). `forward` returns unshifted logits (position i holds the prediction for position
    i + 1), as Dream's does."""

    config_class = FastDLLMV2Config
    config: FastDLLMV2Config

    diffusion_family_name = "Fast-dLLM v2"
    diffusion_block_size_field = "bd_size"
    diffusion_threshold_strict = True  # the reference commits probability > threshold

    @property
    def diffusion_generation_defaults(self) -> dict:
        """The reference `generate`'s settings: blocks of the trained size, sub-blocks of 8, the exact block cache,
        greedy, a stop at the first settled stop token (sub-blocks only when 8 divides the block); threshold 0.9 (the authors' README and evaluation; their
        `generate` defaults to 1, one token per step)."""
        block = self.config.bd_size
        return {"schedule": "linear", "alg": "low_confidence", "threshold": 0.9, "block_length": block,
                "sub_block_length": 8 if block % 8 == 0 else None, "cache_implementation": "block",
                "eos_early_stop": True}


__all__ = ["FastDLLMV2Model", "block_causal_mask"]
