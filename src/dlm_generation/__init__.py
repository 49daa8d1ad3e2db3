"""dlm-generation: fast, faithful generation for diffusion language models on Hugging Face transformers.

Importing the package registers the LLaDA ("llada"), Dream ("Dream"), Fast-dLLM v2 ("Fast_dLLM_Qwen") and SDAR ("sdar")
model types with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, so `AutoModelForCausalLM.from_pretrained(path)` works without
`trust_remote_code`, and models saved from these classes carry their code for `trust_remote_code=True` users.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_diffusion import DiffusionGenerationConfig
from .configuration_dream import DreamConfig
from .configuration_fast_dllm_v2 import FastDLLMV2Config
from .configuration_llada import LLaDAConfig
from .configuration_sdar import SDARConfig
from .diffusion_cache import CacheStep, DiffusionCache, LayerKVStore, StepOutcome
from .diffusion_caches import DIFFUSION_CACHE_CLASSES
from .diffusion_adaptive_caches import D2Cache, DLLMCache, ElasticCache
from .diffusion_kv_caches import BlockKVCache, DualCache, FreeCache, PrefixCache
from .engine import DiffusionEngine, EngineFullError, RequestOutput
from .generation_utils import DiffusionGenerateOutput, DiffusionGenerationMixin, generated_lengths
from .modeling_dream import DreamModel
from .modeling_fast_dllm_v2 import FastDLLMV2Model
from .modeling_llada import LLaDAModelLM
from .modeling_sdar import SDARForCausalLM
from .streamers import CanvasFrame, CanvasStreamer

__version__ = "0.1.0"

for _config, _model in ((LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModel), (FastDLLMV2Config, FastDLLMV2Model),
                       (SDARConfig, SDARForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
    # save_pretrained / push_to_hub copy the modeling code (and its sibling imports) next to the weights.
    _config.register_for_auto_class("AutoConfig")
    _model.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "DIFFUSION_CACHE_CLASSES",
    "BlockKVCache",
    "FastDLLMV2Config",
    "FastDLLMV2Model",
    "CacheStep",
    "CanvasFrame",
    "CanvasStreamer",
    "D2Cache",
    "DiffusionCache",
    "DLLMCache",
    "DualCache",
    "FreeCache",
    "DiffusionEngine",
    "DiffusionGenerateOutput",
    "EngineFullError",
    "RequestOutput",
    "DiffusionGenerationConfig",
    "DiffusionGenerationMixin",
    "DreamConfig",
    "DreamModel",
    "LLaDAConfig",
    "LLaDAModelLM",
    "LayerKVStore",
    "PrefixCache",
    "SDARConfig",
    "SDARForCausalLM",
    "StepOutcome",
    "generated_lengths",
]
