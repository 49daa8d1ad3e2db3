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

import torch

from .configuration_fast_dllm_v2 import FastDLLMV2Config
from .modeling_diffusion_utils import default_position_ids
from .modeling_dream import DreamModel


def block_causal_mask(position_ids: torch.Tensor, block_size: int, attention_mask: torch.Tensor | None = None,
                      key_position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (batch, 1, queries, keys) mask, True where a query may attend: keys whose block (position id //
    `block_size`) is at most the query's, and that are not padding (`attention_mask` (batch, keys), 0 = padding).
    `key_position_ids` default to `position_ids` (a forward over the whole sequence)."""
    keys = position_ids if key_position_ids is None else key_position_ids
    allowed = (keys[:, None, :] // block_size) <= (position_ids[:, :, None] // block_size)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    return allowed[:, None]


class FastDLLMV2Model(DreamModel):
    """A Fast-dLLM v2 model: Dream's body and logit shift under the block-causal mask of `config.bd_size`."""

    config_class = FastDLLMV2Config
    config: FastDLLMV2Config

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, **kwargs):
        """Unshifted logits (position i holds the prediction for position i + 1), as Dream returns.

        A 2-D `attention_mask` (1 = real token, 0 = padding) or none becomes the block-causal mask over the
        forward's positions (`position_ids`, by default counted from each row's first real token); a 4-D mask is
        used as given. Other arguments as `DreamModel.forward`.
        """
        if attention_mask is None or attention_mask.dim() == 2:
            reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            batch, length = reference.shape[:2]
            if position_ids is None:
                position_ids = default_position_ids(attention_mask, batch, length, reference.device)
            if attention_mask is not None and attention_mask.shape[-1] != length:
                raise ValueError(
                    f"FastDLLMV2Model.forward got a 2-D attention_mask over {attention_mask.shape[-1]} keys for "
                    f"{length} positions; pass a 4-D mask for a forward that attends to cached keys."
                )
            attention_mask = block_causal_mask(position_ids, self.config.bd_size, attention_mask)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **kwargs)

    def diffusion_generate(self, *args, **kwargs):
        """Not available yet for this family: its decoding (an exact KV cache of committed blocks, sub-blocks, the
        first token of each block from the commit forward) is not the full-attention loop's, and running that loop
        would silently decode differently from the reference."""
        raise NotImplementedError(
            "Fast-dLLM v2 decoding (block KV cache and sub-blocks) is not implemented in this version of "
            "dlm-generation; the model class loads the weights and computes block-causal logits only."
        )

    def generate(self, *args, **kwargs):
        return self.diffusion_generate(*args, **kwargs)


__all__ = ["FastDLLMV2Model", "block_causal_mask"]
