"""The registry of diffusion caches: `cache_implementation` name -> class (strings become objects here, once).

Built from the classes: each declares its `cache_name` and its `cache_config` settings, so a new built-in cache is
its class plus its entry in `BUILT_IN_CACHES`.

This file travels with saved models, so it imports only siblings.
"""

from __future__ import annotations

from .diffusion_cache import DiffusionCache
from .diffusion_adaptive_caches import D2Cache, DLLMCache, ElasticCache
from .diffusion_kv_caches import BlockKVCache, DualCache, FreeCache, PrefixCache

BUILT_IN_CACHES: tuple[type[DiffusionCache], ...] = (PrefixCache, DualCache, DLLMCache, D2Cache, FreeCache, ElasticCache,
                                                      BlockKVCache)
DIFFUSION_CACHE_CLASSES: dict[str, type[DiffusionCache]] = {cls.cache_name: cls for cls in BUILT_IN_CACHES}
"""The built-in caches by `cache_implementation` name: `"prefix"`, `"dual"`, `"dllm"`, `"d2cache"`, `"freecache"`,
`"elastic"` (full-attention models) and `"block"` (block-diffusion models' exact KV cache)."""
KNOWN_CACHE_IMPLEMENTATIONS = tuple(DIFFUSION_CACHE_CLASSES)  # the names `cache_implementation` accepts
