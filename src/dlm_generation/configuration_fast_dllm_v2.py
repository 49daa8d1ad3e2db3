"""Fast-dLLM v2 model configuration (Qwen2.5 adapted to block diffusion; NVlabs, arXiv 2509.26328).

Accepts the released `config.json` of Efficient-Large-Model/Fast_dLLM_v2_7B and Fast_dLLM_v2_1.5B unchanged
(`model_type` "Fast_dLLM_Qwen", Qwen2 fields plus `bd_size`, the block size the model was trained with; the 7B file's
misspelt `conplemenrary_mask`, which the reference code never reads, is kept so the config round-trips). The
released configs name no mask token: the reference code hard-codes `|<MASK>|` = 151665, which is this config's
default `mask_token_id`. Travels with saved models: imports only transformers and a sibling file.
"""

from __future__ import annotations

from .configuration_dream import DreamConfig

FAST_DLLM_V2_AUTO_MAP = {
    "AutoConfig": "configuration_fast_dllm_v2.FastDLLMV2Config",
    "AutoModel": "modeling_fast_dllm_v2.FastDLLMV2Model",
    "AutoModelForCausalLM": "modeling_fast_dllm_v2.FastDLLMV2Model",
}


class FastDLLMV2Config(DreamConfig):
    """Configuration of a Fast-dLLM v2 block-diffusion transformer: a Qwen2 body (the parameter names of
    `Qwen2ForCausalLM`) whose attention is bidirectional inside blocks of `bd_size` positions and causal across
    blocks, with the AR model's logit shift (position i - 1 predicts token i). Defaults are those of the 7B model.
    """

    model_type = "Fast_dLLM_Qwen"

    def __init__(self, bd_size: int = 32, mask_token_id: int | None = 151665, eos_token_id: int | None = 151645,
                 pad_token_id: int | None = 151645, auto_map: dict | None = None, **kwargs):
        if not isinstance(bd_size, int) or isinstance(bd_size, bool) or bd_size < 1:
            raise ValueError(f"FastDLLMV2Config.bd_size must be a positive integer (the trained block size), got "
                             f"{bd_size!r}.")
        self.bd_size = bd_size
        super().__init__(mask_token_id=mask_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        # A saved model names this family's code files (the released file names the reference's `configuration.py`
        # and `modeling.py`, which a folder saved from here does not hold).
        self.auto_map = {**(auto_map or {}), **FAST_DLLM_V2_AUTO_MAP}


__all__ = ["FastDLLMV2Config"]
