"""What the block-diffusion families (Fast-dLLM v2, SDAR) share: block-causal attention and its decoding rules.

A block-diffusion model attends bidirectionally inside blocks of its trained block size and causally across them, so
committed blocks take an exact KV cache (`BlockKVCache`) as an AR model's tokens do. `BlockDiffusionMixin` goes in
front of a model class (`class FastDLLMV2Model(BlockDiffusionMixin, DreamModel)`) and gives it:

* `forward` turning a 2-D padding mask (or none) into the block-causal mask (`block_causal_mask`);
* blocks aligned to the trained block size from each row's first real token (`_diffusion_blocks`);
* the block cache as the only cache, and refusals of the settings the family's reference has no meaning for;
* the step attention mask of the shared loop (`_step_attention_mask`);
* a released `generation_config.json` of AR sampling settings read for its token ids only (`adjust_generation_fn`).

A family class sets `diffusion_family_name`, `diffusion_block_size_field` (its config's name for the trained block
size) and the generation-loop attributes of `DiffusionGenerationMixin` where its reference differs.

Travels with saved models: imports only torch, transformers and sibling files.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from .configuration_diffusion import DIFFUSION_DEFAULTS, DiffusionGenerationConfig
from .diffusion_kv_caches import BlockKVCache
from .modeling_diffusion_utils import default_position_ids


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


class BlockDiffusionMixin:
    """Block-causal attention and the decoding rules every block-diffusion family shares (see the module text)."""

    diffusion_family_name = "a block-diffusion model"
    diffusion_block_size_field = "block_size"  # the config field holding the trained block size
    # Ids a released generation_config.json of AR sampling settings contributes (the reference reads no other field).
    diffusion_released_config_ids = ("bos_token_id", "pad_token_id")
    diffusion_block_causal = True

    @property
    def diffusion_trained_block_size(self) -> int:
        return getattr(self.config, self.diffusion_block_size_field)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, **kwargs):
        """A 2-D `attention_mask` (1 = real token, 0 = padding) or none becomes the block-causal mask over the
        forward's positions (`position_ids`, by default counted from each row's first real token); a 4-D mask is
        used as given. Other arguments as the body model's `forward`."""
        if attention_mask is None or attention_mask.dim() == 2:
            reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            batch, length = reference.shape[:2]
            if position_ids is None:
                position_ids = default_position_ids(attention_mask, batch, length, reference.device)
            if attention_mask is not None and attention_mask.shape[-1] != length:
                raise ValueError(
                    f"{type(self).__name__}.forward got a 2-D attention_mask over {attention_mask.shape[-1]} keys for "
                    f"{length} positions; pass a 4-D mask for a forward that attends to cached keys."
                )
            attention_mask = block_causal_mask(position_ids, self.diffusion_trained_block_size, attention_mask)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **kwargs)

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
        """The released checkpoints ship their base model's sampling `generation_config.json` (do_sample,
        temperature, top_k, top_p), which the reference generation code never reads: it decodes greedily with its
        own arguments. A file without any diffusion field is therefore read for its token ids only
        (`diffusion_released_config_ids`); a file saved by this library is loaded as it is."""
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
                    **{name: saved[name] for name in self.diffusion_released_config_ids
                       if saved.get(name) is not None})
        super().adjust_generation_fn(generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                                     cache_dir=cache_dir, force_download=force_download, proxies=proxies,
                                     local_files_only=local_files_only, token=token, revision=revision,
                                     subfolder=subfolder, trust_remote_code=trust_remote_code, **kwargs)

    def _check_family_settings(self, config):
        name, block = self.diffusion_family_name, self.diffusion_trained_block_size
        problems = []
        if config.cache_implementation != "block":
            problems.append(
                f"cache_implementation={config.cache_implementation!r}: {name} decodes with its exact block KV "
                "cache, cache_implementation='block' (committed blocks are cached as an AR model's tokens are); the "
                "approximate caches are built for full-attention models.")
        if config.block_length is None:
            problems.append(f"block_length=None: blocks are the model's unit of decoding; use block_length="
                            f"{block} (the trained {self.diffusion_block_size_field}).")
        if config.cfg_scale:
            problems.append(f"cfg_scale: classifier-free guidance is not defined for {name} (the reference has "
                            "none); leave cfg_scale=0.")
        if config.guidance is not None:
            problems.append(f"guidance: AR-guided diffusion is built for full-attention models; {name} already "
                            "decodes block by block with an exact cache.")
        if config.suffix_window is not None:
            problems.append(f"suffix_window: {name} attends block-causally, so the masked positions after the block "
                            "never enter a forward; leave suffix_window unset (None).")
        problems += self._check_block_diffusion_settings(config)
        if problems:
            raise ValueError(f"Invalid settings for {name}:\n  - " + "\n  - ".join(problems))

    def _check_block_diffusion_settings(self, config) -> list[str]:
        """A family's own refusals (messages), beyond the shared ones."""
        return []

    def _prepare_diffusion_cache(self, config, past_key_values):
        if past_key_values is not None and not isinstance(past_key_values, BlockKVCache):
            raise ValueError(f"past_key_values must be a BlockKVCache for {self.diffusion_family_name} (got "
                             f"{type(past_key_values).__name__}).")
        return past_key_values or BlockKVCache(config.cache_config, block_length=config.block_length)

    def _step_attention_mask(self, state, rules, plan):
        """The block-causal mask of the planned forward: queries [query_start, query_end) against keys [0, key_end),
        by position ids (blocks counted from each row's first real token), padding hidden."""
        queries = state.position_ids[:, plan.query_start:plan.query_end]
        keys = state.position_ids[:, :plan.key_end]
        padding = state.padding_mask[:, :plan.key_end] if state.padding_mask is not None else None
        return block_causal_mask(queries, rules.block_length, padding, keys)


__all__ = ["BlockDiffusionMixin", "block_causal_mask"]
