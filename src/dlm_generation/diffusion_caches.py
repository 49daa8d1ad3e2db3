"""The registry of diffusion caches: `cache_implementation` name -> class (strings become objects here, once).

This file travels with saved models, so it imports only siblings.
"""

from __future__ import annotations

from .diffusion_cache import DiffusionCache
from .diffusion_adaptive_caches import D2Cache, DLLMCache
from .diffusion_kv_caches import DualCache, FreeCache, PrefixCache

DIFFUSION_CACHE_CLASSES: dict[str, type[DiffusionCache]] = {"prefix": PrefixCache, "dual": DualCache,
                                                             "freecache": FreeCache, "dllm": DLLMCache,
                                                             "d2cache": D2Cache}
