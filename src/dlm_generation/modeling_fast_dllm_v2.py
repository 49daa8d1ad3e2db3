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
from transformers import GenerationConfig

from .configuration_diffusion import DIFFUSION_DEFAULTS, DiffusionGenerationConfig
from .configuration_fast_dllm_v2 import FastDLLMV2Config
from .diffusion_kv_caches import BlockKVCache
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

    # ------------------------------------------------------------------------------------------- decoding
    diffusion_threshold_strict = True  # the reference commits probability > threshold
    diffusion_block_causal = True

    @property
    def diffusion_generation_defaults(self) -> dict:
        """The reference `generate`'s settings: blocks of the trained size, sub-blocks of 8, the exact block cache,
        greedy, a stop at the first settled stop token (sub-blocks only when 8 divides the block); threshold 0.9 (the authors' README and evaluation; their
        `generate` defaults to 1, one token per step)."""
        block = self.config.bd_size
        return {"schedule": "linear", "alg": "low_confidence", "threshold": 0.9, "block_length": block,
                "sub_block_length": 8 if block % 8 == 0 else None, "cache_implementation": "block",
                "eos_early_stop": True}

    @staticmethod
    def _diffusion_blocks(prompt_len, max_new_tokens, block_length):
        """Blocks aligned to `block_length` from the sequence start, as the model was trained: the first one holds
        the prompt's tail (its origin is inside the prompt), the last one ends at the canvas end."""
        end = prompt_len + max_new_tokens
        blocks, start = [], prompt_len
        while start < end:
            origin = start // block_length * block_length
            stop = min(origin + block_length, end)
            blocks.append((start, stop, origin))
            start = stop
        return blocks

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             cache_dir=None, force_download=False, proxies=None, local_files_only=False, token=None,
                             revision=None, subfolder="", trust_remote_code=None, **kwargs):
        """The released checkpoints ship Qwen2.5's sampling `generation_config.json` (do_sample, temperature 0.7,
        top_k 20, top_p 0.8, repetition_penalty 1.05), which the reference's `generate` never reads: it decodes
        greedily with its own arguments. A file without any diffusion field is therefore read for its bos / pad ids
        only (the stop id is the model config's `eos_token_id`, the reference's `stop_token`); a file saved by this
        library is loaded as it is."""
        if generation_config is None and pretrained_model_name_or_path is not None:
            try:
                saved = GenerationConfig.from_pretrained(
                    pretrained_model_name_or_path, cache_dir=cache_dir, force_download=force_download,
                    local_files_only=local_files_only, token=token, revision=revision, subfolder=subfolder,
                ).to_diff_dict()
            except (OSError, ValueError):  # no file, or one of this library's (its cache names fail upstream checks)
                saved = None
            if saved is not None and not any(name in saved for name in DIFFUSION_DEFAULTS):
                generation_config = DiffusionGenerationConfig(
                    **{name: saved[name] for name in ("bos_token_id", "pad_token_id") if saved.get(name) is not None})
        super().adjust_generation_fn(generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                                     cache_dir=cache_dir, force_download=force_download, proxies=proxies,
                                     local_files_only=local_files_only, token=token, revision=revision,
                                     subfolder=subfolder, trust_remote_code=trust_remote_code, **kwargs)

    def _check_family_settings(self, config):
        problems = []
        if config.cache_implementation != "block":
            problems.append(
                f"cache_implementation={config.cache_implementation!r}: Fast-dLLM v2 decodes with its exact block KV "
                "cache, cache_implementation='block' (committed blocks are cached as an AR model's tokens are); the "
                "approximate caches are built for full-attention models.")
        if config.block_length is None:
            problems.append(f"block_length=None: blocks are the model's unit of decoding; use block_length="
                            f"{self.config.bd_size} (the trained bd_size).")
        if config.cfg_scale:
            problems.append("cfg_scale: classifier-free guidance is not defined for Fast-dLLM v2 (the reference has "
                            "none); leave cfg_scale=0.")
        if config.guidance is not None:
            problems.append("guidance: AR-guided diffusion is built for full-attention models; Fast-dLLM v2 already "
                            "decodes block by block with an exact cache.")
        if problems:
            raise ValueError("Invalid settings for Fast-dLLM v2:\n  - " + "\n  - ".join(problems))

    def _prepare_diffusion_cache(self, config, past_key_values):
        if past_key_values is not None and not isinstance(past_key_values, BlockKVCache):
            raise ValueError(f"past_key_values must be a BlockKVCache for Fast-dLLM v2 (got "
                             f"{type(past_key_values).__name__}).")
        return past_key_values or BlockKVCache(config.cache_config, block_length=config.block_length)

    def _step_attention_mask(self, state, rules, plan):
        """The block-causal mask of the planned forward: queries [query_start, query_end) against keys [0, key_end),
        by position ids (blocks counted from each row's first real token), padding hidden."""
        queries = state.position_ids[:, plan.query_start:plan.query_end]
        keys = state.position_ids[:, :plan.key_end]
        padding = state.padding_mask[:, :plan.key_end] if state.padding_mask is not None else None
        return block_causal_mask(queries, rules.block_length, padding, keys)


__all__ = ["FastDLLMV2Model", "block_causal_mask"]
