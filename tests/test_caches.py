"""Diffusion caches beyond the golden vectors (those are in test_parity.py): what each step recomputes, what stays
stale, exactness when nothing changed, batches, memory, and graph capture.

Runs on the shipped tiny random models (`model_cards/tiny-random-*`): 512-token vocabulary, mask 500, EOS 501.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dlm_generation
from dlm_generation import CacheStep, DiffusionCache, DualCache, FreeCache, PrefixCache

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
MASK, EOS, EOT = 500, 501, 502
PROMPT = torch.tensor([[495, 65, 138, 430, 447, 294, 491, 416, 151, 336]])
SHORT = torch.tensor([[271, 68, 306, 195, 186, 232, 56]])
CACHES = ["prefix", "dual", "freecache", "dllm", "d2cache"]
# cache_config per cache in the behaviour tests: FreeCache with windows far smaller than the canvas, dLLM-Cache with
# every kind of forward (full, response refresh, V-verify, prompt refresh) within a 16-token generation, d2Cache
# choosing 3 masked positions per step.
CACHE_CONFIGS = {"prefix": None, "dual": None, "freecache": {"window_left": 3, "window_right": 6},
                 "dllm": {"kp": 5, "kr": 3, "rou": 0.25}, "d2cache": {"current_k": 3, "inflate_w": 2}}


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request):
    return request.getfixturevalue(f"random_{request.param}")  # shared (conftest): tests must not modify it


class Recording:
    """Wraps a cache instance's hooks to record the plans and the stored tensors' shapes."""

    def __init__(self, cache: DiffusionCache):
        self.cache, self.plans, self.blocks, self.stored = cache, [], [], []
        plan_step, begin_block, update = cache.plan_step, cache.begin_block, cache.update
        self.last = None

        def recording_plan(canvas, step):
            plan = plan_step(canvas, step)
            self.last = (len(self.blocks) - 1, step, plan)
            return plan

        def recording_block(start, end):
            self.blocks.append((start, end))
            begin_block(start, end)

        def recording_update(key, value, layer_idx):
            if layer_idx == 0:  # a forward ran with the last plan (the loop also plans the check that ends a block)
                self.plans.append(self.last)
            out = update(key, value, layer_idx)
            self.stored.append((layer_idx, tuple(out[0].shape)))
            return out

        cache.plan_step, cache.begin_block, cache.update = recording_plan, recording_block, recording_update


@pytest.mark.parametrize("name, cls", [("prefix", PrefixCache), ("dual", DualCache)])
def test_each_step_recomputes_what_the_method_says(model, name, cls):
    """Block start: the whole canvas. Later steps: prefix runs block + suffix, dual the block only; both attend to
    every canvas key."""
    recording = Recording(cls())
    out = model.diffusion_generate(PROMPT, max_new_tokens=32, steps=32, block_length=8, past_key_values=recording.cache,
                                   return_dict_in_generate=True)
    length = 10 + 32
    assert out.nfe == len(recording.plans) == 32 and len(recording.blocks) == 4
    for block, step, plan in recording.plans:
        start, end = recording.blocks[block]
        if step == 0:
            assert plan == CacheStep(0, length, length)
        else:
            assert plan == CacheStep(start, length if name == "prefix" else end, length)
    assert not (out.sequences == MASK).any()


def after_full_step(model, cache: DiffusionCache, block: tuple[int, int], canvas: torch.Tensor | None = None):
    """The cache after the first (full) step of `block` on `canvas` (default: PROMPT and 16 masks)."""
    if canvas is None:
        canvas = torch.cat([PROMPT, torch.full((1, 16), MASK)], 1)
    cache.begin_generation(canvas, None, MASK)
    cache.begin_block(*block)
    cache.plan_step(canvas, 0)
    model(canvas, past_key_values=cache)
    return canvas


def cached_forward(model, cache: DiffusionCache, canvas: torch.Tensor, step: int = 1):
    """The model run as the cache plans `step`: its query range, attending through the cache."""
    plan = cache.plan_step(canvas, step)
    return model(canvas[:, plan.query_start:plan.query_end], past_key_values=cache,
                 position_ids=torch.arange(plan.query_start, plan.query_end)[None]).logits, plan


@pytest.mark.parametrize("cls", [PrefixCache, DualCache])
def test_cached_step_leaves_keys_outside_its_range_untouched(model, cls):
    """A cached step writes fresh keys/values only inside its query range; everything else keeps the values of the
    block's first (full) step."""
    cache = cls()
    canvas = after_full_step(model, cache, (10, 18))
    before = {layer: tensor.clone() for layer, tensor in cache.kv.keys.items()}
    canvas[0, 12] = 7  # a commit in the block changes what the block computes
    _, plan = cached_forward(model, cache, canvas)
    for layer, tensor in cache.kv.keys.items():
        outside = torch.ones(26, dtype=torch.bool)
        outside[plan.query_start:plan.query_end] = False
        assert torch.equal(tensor[:, :, outside], before[layer][:, :, outside]), layer
        assert not torch.equal(tensor[:, :, 12], before[layer][:, :, 12]), layer  # refreshed where it changed
    cache.end_generation()
    assert cache.kv.keys == {} and cache.kv.values == {}


@pytest.mark.parametrize("cls", [PrefixCache, DualCache])
def test_cached_step_is_exact_when_nothing_changed(model, cls):
    """Stale keys are only approximate once the canvas changes: on an unchanged canvas a cached step gives the logits
    of the full forward (float tolerance)."""
    cache = cls()
    canvas = torch.cat([PROMPT, torch.full((1, 16), MASK)], 1)
    canvas[0, 10:13] = torch.tensor([5, 6, 7])
    full = model(canvas).logits
    after_full_step(model, cache, (18, 26), canvas)
    partial, plan = cached_forward(model, cache, canvas)
    assert torch.allclose(partial, full[:, plan.query_start:plan.query_end], atol=1e-5)


POLICIES = {
    "steps": {"steps": 8},
    "threshold": {"threshold": 0.3, "alg": "low_confidence"},
    "factor": {"factor": 1.0, "alg": "low_confidence"},
    "entropy": {"alg": "entropy", "schedule": "eps"},
    "topk_margin": {"alg": "topk_margin"},
    "confidence_threshold": {"alg": "confidence_threshold", "threshold": 0.3, "steps": 4},
    "eos_early_stop": {"eos_early_stop": True, "eot_token_id": EOT},
    "cfg": {"cfg_scale": 1.0},
}


FAST_POLICIES = {"steps", "threshold", "eos_early_stop"}  # with every cache in the fast tier; the rest: slow tier


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("policy", [p if p in FAST_POLICIES else pytest.param(p, marks=pytest.mark.slow)
                                    for p in POLICIES])
def test_left_padded_batch_rows_equal_their_solo_runs(model, cache, policy):
    batch = torch.cat([PROMPT, torch.cat([torch.full((1, 3), EOS), SHORT], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kwargs = {"max_new_tokens": 16, "steps": 16, "block_length": 8, "cache_implementation": cache,
              "cache_config": CACHE_CONFIGS[cache], **POLICIES[policy]}
    together = model.diffusion_generate(batch, attention_mask=mask, **kwargs)
    assert together[0].tolist() == model.diffusion_generate(PROMPT, **kwargs)[0].tolist()
    assert together[1, 3:].tolist() == model.diffusion_generate(SHORT, **kwargs)[0].tolist()
    if policy != "eos_early_stop":
        assert not (together[:, 10:] == MASK).any()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_one_block_per_step_equals_no_cache(cache):
    """LLaDA: a cache whose blocks finish in their first (full) step never uses a stale value, so the tokens equal
    no cache. (Dream cannot finish a cached block in one step: see the next test.)"""
    model = AutoModelForCausalLM.from_pretrained(CARDS / "tiny-random-llada")
    kwargs = dict(max_new_tokens=16, steps=2, block_length=8, factor=100.0, alg="low_confidence",
                  return_dict_in_generate=True)
    plain = model.diffusion_generate(PROMPT, **kwargs)
    cached = model.diffusion_generate(PROMPT, cache_implementation=cache, **kwargs)
    assert plain.nfe == cached.nfe == 2
    assert torch.equal(plain.sequences, cached.sequences)


def test_dream_commits_the_block_start_at_the_full_step():
    """Dream reads position i's prediction at i - 1, which the cached steps of a block do not recompute: the block's
    first position is committed at the block's full step, alone (as Fast-dLLM's Dream block decoder does)."""
    model = AutoModelForCausalLM.from_pretrained(CARDS / "tiny-random-dream")
    out = model.diffusion_generate(PROMPT, max_new_tokens=16, steps=16, block_length=8, cache_implementation="dual",
                                   output_history=True, return_dict_in_generate=True)
    after_full_steps = [out.history[0], out.history[8]]
    for block, canvas in enumerate(after_full_steps):
        start = 10 + 8 * block
        block_values = canvas[0, start:start + 8]
        assert block_values[0] != MASK and (block_values[1:] == MASK).all()


@pytest.mark.parametrize("cache", CACHES)
def test_cache_memory_is_batch_canvas_layers_heads_dim_and_freed(model, cache):
    cls = dlm_generation.DIFFUSION_CACHE_CLASSES[cache]
    recording = Recording(cls(CACHE_CONFIGS[cache]))
    batch = torch.cat([PROMPT, PROMPT])
    model.diffusion_generate(batch, max_new_tokens=16, steps=16, block_length=8, past_key_values=recording.cache)
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.n_kv_heads
    head_dim = (getattr(config, "hidden_size", None) or config.d_model) // (
        getattr(config, "num_attention_heads", None) or config.n_heads)
    stored = {shape for _, shape in recording.stored}
    if cache == "freecache":  # attends to the keys up to its window end
        assert {shape[:2] + shape[3:] for shape in stored} == {(2, kv_heads, head_dim)}
        assert max(shape[2] for shape in stored) == 26
    else:
        assert stored == {(2, kv_heads, 26, head_dim)}
    assert {layer for layer, _ in recording.stored} == set(range(layers))
    assert recording.cache.kv.keys == {} and recording.cache.kv.values == {}  # released when the call returned


@pytest.mark.parametrize("cache", CACHES)
def test_no_state_leaks_between_calls(model, cache):
    """A cache instance reused across calls (and across prompt lengths) gives what a fresh one gives."""
    instance = dlm_generation.DIFFUSION_CACHE_CLASSES[cache](CACHE_CONFIGS[cache])
    kwargs = dict(max_new_tokens=16, steps=16, block_length=8, threshold=0.5, alg="low_confidence")
    first = model.diffusion_generate(SHORT, past_key_values=instance, **kwargs)
    second = model.diffusion_generate(PROMPT, past_key_values=instance, **kwargs)
    again = model.diffusion_generate(SHORT, past_key_values=instance, **kwargs)
    assert torch.equal(first, again)
    fresh = model.diffusion_generate(PROMPT, cache_implementation=cache, cache_config=CACHE_CONFIGS[cache], **kwargs)
    assert torch.equal(second, fresh)


def test_dual_cache_step_compiles_without_graph_breaks(model):
    """The cached forward of a dual-cache step (block-sized query, preallocated keys/values written in place) is
    captured by torch.compile as one graph (fullgraph=True raises on any graph break)."""
    cache = DualCache()
    canvas = after_full_step(model, cache, (10, 18))
    eager, plan = cached_forward(model, cache, canvas)
    positions = torch.arange(plan.query_start, plan.query_end)[None]
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    logits = compiled(input_ids=canvas[:, 10:18], past_key_values=cache, position_ids=positions).logits
    assert torch.allclose(logits, eager, atol=1e-6)


@pytest.mark.parametrize("kwargs", [
    pytest.param({"steps": 16, "block_length": 8}, id="steps-blocks"),
    pytest.param({"threshold": 0.3, "alg": "low_confidence"}, id="threshold-one-block"),
])
def test_freecache_with_a_window_over_everything_equals_no_cache(model, kwargs):
    batch = torch.cat([PROMPT, torch.cat([torch.full((1, 3), EOS), SHORT], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    common = dict(max_new_tokens=16, return_dict_in_generate=True, **kwargs)
    plain = model.diffusion_generate(batch, attention_mask=mask, **common)
    cached = model.diffusion_generate(batch, attention_mask=mask, cache_implementation="freecache",
                                      cache_config={"window_left": 1000, "window_right": None}, **common)
    assert torch.equal(plain.sequences, cached.sequences) and plain.nfe == cached.nfe


def test_freecache_runs_a_window_around_the_frontier(model):
    """After the first (full) forward each step runs [last - left, last + right] around the last committed position
    before the first mask, attends to keys up to the window end only, and keeps everything left of it frozen."""
    recording = Recording(FreeCache({"window_left": 2, "window_right": 5}))
    frozen_checks = []
    update = recording.cache.update

    def checking_update(key, value, layer_idx):
        step = recording.cache.current
        before = recording.cache.kv.keys.get(layer_idx)
        before = None if before is None else before[:, :, : step.query_start].clone()
        out = update(key, value, layer_idx)
        if before is not None:
            frozen_checks.append(torch.equal(recording.cache.kv.keys[layer_idx][:, :, : step.query_start], before))
        return out

    recording.cache.update = checking_update
    out = model.diffusion_generate(PROMPT, max_new_tokens=16, steps=16, alg="low_confidence",
                                   past_key_values=recording.cache, output_history=True, return_dict_in_generate=True)
    assert not (out.sequences == MASK).any()
    assert recording.plans[0][2] == CacheStep(0, 26, 26)
    canvases = [torch.cat([PROMPT, torch.full((1, 16), MASK)], 1), *out.history]
    for (_, _, plan), canvas in zip(recording.plans[1:], canvases[1:]):
        masks = (canvas[0] == MASK).nonzero().flatten()
        last = int(masks[0]) - 1
        assert (plan.query_start, plan.query_end, plan.key_end) == (max(0, last - 2), min(26, last + 6), min(26, last + 6))
    assert frozen_checks and all(frozen_checks)


def test_guide_example_cache_refreshing_every_step_equals_no_cache(model):
    """examples/custom_cache.py (the worked example of docs/write-your-own-cache.md): refreshing at every step is a
    full recompute, so it equals no cache exactly; refreshing every 2 steps runs a full forward on even steps."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "custom_cache.py"
    spec = importlib.util.spec_from_file_location("custom_cache", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    kwargs = dict(max_new_tokens=16, steps=16, block_length=8, return_dict_in_generate=True)
    plain = model.diffusion_generate(PROMPT, **kwargs)
    every_step = model.diffusion_generate(PROMPT, past_key_values=example.RefreshingDualCache({"refresh_every": 1}),
                                          **kwargs)
    assert torch.equal(plain.sequences, every_step.sequences) and plain.nfe == every_step.nfe
    recording = Recording(example.RefreshingDualCache({"refresh_every": 2}))
    model.diffusion_generate(PROMPT, past_key_values=recording.cache, **kwargs)
    assert all((plan.query_end - plan.query_start == 26) == (step % 2 == 0) for _, step, plan in recording.plans)
    assert example.RefreshingDualCache().cache_config == {"refresh_every": 4}
    with pytest.raises(ValueError, match=r"cache_config refresh_every of the 'refreshing_dual' cache must be a positive "
                                         r"integer \(the steps from one full refresh to the next\), got 0"):
        example.RefreshingDualCache({"refresh_every": 0})


@pytest.mark.parametrize("cls, config, message", [
    (PrefixCache, {"x": 1}, r"cache_config key 'x' is not a setting of the 'prefix' cache \(its keys: none\)"),
    (DualCache, {"window_left": 4}, r"cache_config key 'window_left' is not a setting of the 'dual' cache"),
    (FreeCache, {"window_left": -2}, r"window_left of the 'freecache' cache must be a non-negative integer, got -2"),
])
def test_cache_instances_check_their_settings(cls, config, message):
    with pytest.raises(ValueError, match=message):
        cls(config)
    assert FreeCache().cache_config == {"window_left": 64, "window_right": None}  # the reference API's defaults


class WindowedCache(FreeCache):
    """A cache of one's own with settings: its own key with an alias and a check, on top of FreeCache's."""

    cache_name = "windowed"
    cache_config_defaults = {**FreeCache.cache_config_defaults, "stride": 2}
    cache_config_aliases = {"step": "stride"}
    cache_config_checks = {**FreeCache.cache_config_checks, "stride": (lambda v: v in (1, 2, 4), "1, 2 or 4")}


def test_a_cache_declares_its_own_settings():
    """The base class fills in a subclass's defaults, translates its aliases, refuses keys it does not declare (listing
    those it does) and runs its checks, the inherited ones included."""
    assert WindowedCache().cache_config == {"window_left": 64, "window_right": None, "stride": 2}
    assert WindowedCache({"step": 4, "window_left": 8}).cache_config == {"window_left": 8, "window_right": None,
                                                                       "stride": 4}
    with pytest.raises(ValueError, match=r"cache_config key 'kp' is not a setting of the 'windowed' cache \(its keys: "
                                         r"\['step', 'stride', 'window_left', 'window_right'\]\)"):
        WindowedCache({"kp": 2})
    with pytest.raises(ValueError, match=r"cache_config stride of the 'windowed' cache must be 1, 2 or 4, got 3"):
        WindowedCache({"step": 3})
    with pytest.raises(ValueError, match=r"window_left of the 'windowed' cache must be a non-negative integer, got -1"):
        WindowedCache({"window_left": -1})
    with pytest.raises(ValueError, match=r"cache_config of the 'windowed' cache must be a dict of its settings"):
        WindowedCache("stride=2")
    with pytest.raises(ValueError, match=r"cache_config key 'stride' is not a setting of the 'Nameless' cache"):
        type("Nameless", (DiffusionCache,), {})({"stride": 2})  # no name, no settings: every key is refused
    with pytest.raises(ValueError, match=r"cache_config key 'step' is not a setting of the 'freecache' cache"):
        FreeCache({"step": 2})


def test_the_registry_holds_every_built_in_cache_by_name(model, monkeypatch):
    """`cache_implementation` names map to the classes that declare them, and diffusion_generate builds the cache
    from the registry with its cache_config resolved exactly once (validation only checks it)."""
    expected = {"prefix": PrefixCache, "dual": DualCache, "freecache": FreeCache, "dllm": dlm_generation.DLLMCache,
                "d2cache": dlm_generation.D2Cache, "elastic": dlm_generation.ElasticCache,
                "block": dlm_generation.BlockKVCache}
    assert dlm_generation.DIFFUSION_CACHE_CLASSES == expected
    assert all(cls.cache_name == name for name, cls in expected.items())
    config = dlm_generation.DiffusionGenerationConfig(cache_implementation="dllm", cache_config={"rho": 0.5})
    resolutions = []
    resolve = dlm_generation.DLLMCache.resolve_cache_config

    def counting(cls, cache_config):
        resolutions.append(cache_config)
        return resolve(cache_config)

    monkeypatch.setattr(dlm_generation.DLLMCache, "resolve_cache_config", classmethod(counting))
    cache = model._prepare_diffusion_cache(config, None)
    assert type(cache) is dlm_generation.DLLMCache and resolutions == [{"rho": 0.5}]
    assert cache.cache_config == {"kp": 50, "kr": 2, "rou": 0.5}


def test_kv_store_scattered_write_leaves_unselected_rows_untouched():
    """`LayerKVStore.write_rows` writes entry i of batch row b at position rows[b, i] where valid[b, i], and only there:
    other positions, padding entries' targets and the other batch row keep their values; `write` with a row mask
    and `read` up to key_end likewise."""
    torch.manual_seed(0)
    store = dlm_generation.LayerKVStore()
    key, value = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4)
    store.allocate(0, key, value, 10)
    store.write(0, 0, torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4))
    before_keys, before_values = store.keys[0].clone(), store.values[0].clone()
    rows = torch.tensor([[2, 7, 0], [5, 1, 9]])
    valid = torch.tensor([[True, True, False], [True, False, False]])  # padding entries target 0, 1 and 9
    fresh_keys, fresh_values = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    store.write_rows(0, rows, valid, fresh_keys, fresh_values)
    written = {(0, 2): (0, 0), (0, 7): (0, 1), (1, 5): (1, 0)}
    for b in range(2):
        for position in range(10):
            if (b, position) in written:
                row, i = written[b, position]
                assert torch.equal(store.keys[0][b, :, position], fresh_keys[row, :, i])
                assert torch.equal(store.values[0][b, :, position], fresh_values[row, :, i])
            else:
                assert torch.equal(store.keys[0][b, :, position], before_keys[b, :, position]), (b, position)
                assert torch.equal(store.values[0][b, :, position], before_values[b, :, position]), (b, position)
    store.write_rows(0, rows, valid, value=fresh_values + 1)  # values only: the keys stay
    assert torch.equal(store.keys[0][0, :, 2], fresh_keys[0, :, 0])
    assert torch.equal(store.values[0][0, :, 2], fresh_values[0, :, 0] + 1)
    kept = store.keys[0].clone()
    store.write(0, 3, key[:, :, :2], value[:, :, :2], own=torch.tensor([[True, False], [False, False]]))
    assert torch.equal(store.keys[0][0, :, 3], key[0, :, 0]) and torch.equal(store.keys[0][0, :, 4], kept[0, :, 4])
    assert torch.equal(store.keys[0][1], kept[1])
    keys, values = store.read(0, 6)
    assert keys.shape == values.shape == (2, 3, 6, 4) and torch.equal(keys, store.keys[0][:, :, :6])
    store.adopt(1, key, value)
    assert store.read(1)[0] is key and 1 in store
    store.clear()
    assert 0 not in store and store.keys == {} and store.values == {}


# ------------------------------------------------------------------------------------------------- dLLM-Cache
def test_dllm_exact_settings_equal_no_cache(model):
    """kp = kr = 1 refreshes everything at every forward: tokens and logits equal no cache (batch, threshold)."""
    batch = torch.cat([PROMPT, torch.cat([torch.full((1, 3), EOS), SHORT], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=16, steps=16, block_length=8, threshold=0.3,
                  alg="low_confidence", return_dict_in_generate=True)
    plain = model.diffusion_generate(batch, **kwargs)
    cached = model.diffusion_generate(batch, cache_implementation="dllm", cache_config={"kp": 1, "kr": 1}, **kwargs)
    assert torch.equal(plain.sequences, cached.sequences) and plain.nfe == cached.nfe
    canvas = plain.sequences.clone()
    canvas[:, 20:] = MASK
    cache = dlm_generation.DLLMCache({"kp": 1, "kr": 1})
    cache.begin_generation(canvas, mask, MASK, prompt_length=10)
    for _ in range(2):  # the second forward runs on the first one's cache
        cache.plan_step(canvas, 0)
        logits = model(canvas, attention_mask=torch.cat([mask, torch.ones(2, 16, dtype=mask.dtype)], 1),
                       past_key_values=cache).logits
    assert torch.allclose(logits, model(canvas, attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1]).expand(
        -1, 16)], 1)).logits, atol=1e-5)


def dllm_schedule(model, config: dict, forwards: int) -> list[list]:
    """Per forward, per layer: the rows dLLM-Cache recomputed for one row (None: all of them)."""
    cache = dlm_generation.DLLMCache(config)
    canvas = torch.cat([PROMPT, torch.full((1, 16), MASK)], 1)
    cache.begin_generation(canvas, None, MASK, prompt_length=10)
    cache.begin_block(10, 26)
    schedule = []
    for forward in range(forwards):
        cache.plan_step(canvas, forward)
        model(canvas, past_key_values=cache)
        schedule.append([None if rows is None else rows[0][0][rows[1][0]].tolist()
                         for _, rows in sorted(cache.rows.items())])
        canvas[0, 10 + forward] = 7  # a commit per forward: the values drift
    return schedule


def test_dllm_refresh_schedule(model):
    """Forward n refreshes the prompt when (n-1) % kp == 0 and the response when (n-1) % kr == 0; layer 0 always;
    otherwise int(16 * rou) = 4 response rows (V-verify)."""
    schedule = dllm_schedule(model, {"kp": 5, "kr": 3, "rou": 0.25}, 8)
    layers = len(schedule[0])
    assert all(forward[0] is None for forward in schedule)  # layer 0: always everything
    assert schedule[0] == [None] * layers  # forward 1: everything
    for n, forward in enumerate(schedule, start=1):
        for rows in forward[1:]:
            prompt_refresh, response_refresh = (n - 1) % 5 == 0, (n - 1) % 3 == 0
            if prompt_refresh and response_refresh:
                assert rows is None
                continue
            expected_prompt = list(range(10)) if prompt_refresh else []
            assert rows[: len(expected_prompt)] == expected_prompt
            response = rows[len(expected_prompt):]
            if response_refresh:
                assert response == list(range(10, 26)), n
            else:
                assert len(response) == 4 and all(10 <= r < 26 for r in response) and response == sorted(response)
    assert dllm_schedule(model, {"kp": 100, "kr": 100, "rou": 0.0}, 3)[1][1] == []  # nothing to recompute


def test_dllm_verify_picks_the_least_similar_values():
    """V-verify recomputes the int(G * rou) response rows whose fresh values are least cosine-similar to the cached
    ones (over all heads); the prompt is never verified."""
    cache = dlm_generation.DLLMCache({"kp": 50, "kr": 50, "rou": 0.25})
    canvas = torch.full((2, 12), MASK)
    cache.begin_generation(canvas, None, MASK, prompt_length=4)
    cache.begin_block(4, 12)
    torch.manual_seed(0)
    cached = torch.randn(2, 2, 12, 4)
    cache.kv.adopt(1, cached.clone(), cached.clone())
    for _ in range(2):  # the second forward verifies
        cache.plan_step(canvas, 0)
    fresh = cached.clone()
    fresh[0, :, 6] *= -1  # opposite direction: similarity -1
    fresh[0, :, 9] += 0.5 * torch.randn(2, 4)
    fresh[1, :, 11] = torch.randn(2, 4)
    fresh[1, :, 5] *= 3.0  # same direction, larger: similarity 1, not chosen
    fresh[:, :, :4] = torch.randn(2, 2, 4, 4)  # the prompt drifts too, but is not verified
    rows = cache.recompute_rows(1, fresh)
    similarity = torch.nn.functional.cosine_similarity(fresh[:, :, 4:].transpose(1, 2).flatten(2),
                                                       cached[:, :, 4:].transpose(1, 2).flatten(2), dim=-1)
    expected = (similarity.topk(2, largest=False).indices + 4).sort().values
    assert torch.equal(rows, expected)
    assert rows[0].tolist() == [6, 9] and 11 in rows[1].tolist() and 5 not in rows[1].tolist()


def test_dllm_verify_step_keeps_what_it_did_not_recompute(model):
    """In a V-verify forward only the chosen rows' keys, attention and FFN outputs change; the values of every
    response row are refreshed; the prompt keeps everything."""
    cache = dlm_generation.DLLMCache({"kp": 50, "kr": 50, "rou": 0.25})
    canvas = torch.cat([PROMPT, torch.full((1, 16), MASK)], 1)
    cache.begin_generation(canvas, None, MASK, prompt_length=10)
    cache.begin_block(10, 26)
    cache.plan_step(canvas, 0)
    model(canvas, past_key_values=cache)
    before = {name: {key: tensor.clone() for key, tensor in stored.items()}
              for name, stored in (("keys", cache.kv.keys), ("values", cache.kv.values), ("outputs", cache.outputs))}
    canvas[0, 10:14] = torch.tensor([5, 6, 7, 8])
    cache.plan_step(canvas, 1)
    model(canvas, past_key_values=cache)
    for layer in range(1, len(cache.kv.keys)):
        rows, valid = cache.rows[layer]
        chosen = torch.zeros(26, dtype=torch.bool)
        chosen[rows[0][valid[0]]] = True
        assert chosen.sum() == 4 and not chosen[:10].any()
        assert torch.equal(cache.kv.keys[layer][:, :, ~chosen], before["keys"][layer][:, :, ~chosen])
        assert not torch.equal(cache.kv.keys[layer][:, :, chosen], before["keys"][layer][:, :, chosen])
        assert torch.equal(cache.kv.values[layer][:, :, :10], before["values"][layer][:, :, :10])
        assert not torch.equal(cache.kv.values[layer][:, :, 10:], before["values"][layer][:, :, 10:])
        for name in ("attention", "ffn"):
            now, then = cache.outputs[layer, name], before["outputs"][layer, name]
            assert torch.equal(now[:, ~chosen], then[:, ~chosen]) and not torch.equal(now[:, chosen], then[:, chosen])


def test_dllm_refresh_stores_what_a_full_forward_computes(model):
    """After cached forwards, a full refresh leaves in the cache exactly the keys, values and outputs of a plain
    forward of the same canvas."""
    recorded = {}

    class RecordingNull(DiffusionCache):
        def update(self, key, value, layer_idx):
            recorded["keys", layer_idx], recorded["values", layer_idx] = key, value
            return key, value

        def reuse(self, layer_idx, name, output):
            recorded[name, layer_idx] = output
            return output

    cache = dlm_generation.DLLMCache({"kp": 3, "kr": 3, "rou": 0.25})
    canvas = torch.cat([PROMPT, torch.full((1, 16), MASK)], 1)
    cache.begin_generation(canvas, None, MASK, prompt_length=10)
    cache.begin_block(10, 26)
    for forward in range(4):  # forwards 1 and 4 refresh everything, 2 and 3 verify
        cache.plan_step(canvas, forward)
        model(canvas, past_key_values=cache)
        canvas[0, 10 + forward] = 5 + forward
    canvas[0, 13] = MASK  # the canvas of forward 4
    model(canvas, past_key_values=RecordingNull())
    for layer in range(len(cache.kv.keys)):
        assert torch.equal(cache.kv.keys[layer], recorded["keys", layer])
        assert torch.equal(cache.kv.values[layer], recorded["values", layer])
        for name in ("attention", "ffn"):
            assert torch.equal(cache.outputs[layer, name], recorded[name, layer])


@pytest.mark.parametrize("config, message", [
    ({"kp": 0}, r"kp of the 'dllm' cache must be a positive integer"),
    ({"kr": 2.5}, r"kr of the 'dllm' cache must be a positive integer"),
    ({"rou": 1.5}, r"rou of the 'dllm' cache must be a share between 0 and 1"),
    ({"rho": -0.1}, r"rou of the 'dllm' cache must be a share between 0 and 1"),
    ({"window_left": 3}, r"cache_config key 'window_left' is not a setting of the 'dllm' cache"),
])
def test_dllm_checks_its_settings(config, message):
    with pytest.raises(ValueError, match=message):
        dlm_generation.DLLMCache(config)
    assert dlm_generation.DLLMCache({"rho": 0.5}).cache_config == {"kp": 50, "kr": 2, "rou": 0.5}


# ---------------------------------------------------------------------------------------------------- d2Cache
from dlm_generation.diffusion_adaptive_caches import certainty_density, inflate, nucleus_select  # noqa: E402


def reference_density(decoded: torch.Tensor, sigma: float) -> torch.Tensor:
    """The reference's definition, written densely: decoded left of the canvas, the last position's state right of
    it (one canvas length each way), normalised by the kernel's sum over 6 canvas lengths."""
    batch, length = decoded.shape
    right = decoded[:, -1:].float().expand(batch, length)
    extended = torch.cat([torch.ones(batch, length), decoded.float(), right], 1).double()
    positions = torch.arange(length, 2 * length, dtype=torch.float64)
    kernel = torch.exp(-((positions[:, None] - torch.arange(3 * length)) ** 2) / (2 * sigma**2))
    normaliser = torch.exp(-(torch.arange(-3 * length, 3 * length, dtype=torch.float64) ** 2) / (2 * sigma**2)).sum()
    return (extended @ kernel.T / normaliser).float()


@pytest.mark.parametrize("length, sigma", [(40, 3.0), (40, 10.0), (16, 10.0)])
def test_certainty_density_matches_the_reference_definition(length, sigma):
    torch.manual_seed(0)
    decoded = torch.rand(4, length) < 0.4
    decoded[0, -1], decoded[1, -1] = True, False  # both right-boundary rules
    assert torch.allclose(certainty_density(decoded, sigma), reference_density(decoded, sigma), atol=1e-6)


def test_nucleus_select_and_inflate():
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.05]])
    allowed = torch.tensor([[True, True, True, True, False]])
    # shares among the allowed: 0.526, 0.105, 0.316, 0.053: 0.5 of the mass needs only the first, 0.85 two
    assert nucleus_select(scores, 0.5, allowed).tolist() == [[True, False, False, False, False]]
    assert nucleus_select(scores, 0.85, allowed).tolist() == [[True, False, True, False, False]]
    assert nucleus_select(scores, 0.0, allowed).sum() == 1  # at least one
    assert not nucleus_select(scores, 1.0, allowed)[0, 4]  # never outside the allowed
    chosen = torch.tensor([[True, False, False, True, False, False, False, True]])
    assert inflate(chosen, 3).tolist() == [[True, True, True, True, False, False, False, True]]
    assert inflate(chosen, 4).tolist() == [[True] * 8]
    assert torch.equal(inflate(chosen, 2), chosen)


def test_rollout_importance_equals_the_dense_product():
    """Column sums of R_L ... R_1 (R: identity, with (attention + identity) / 2 at the rows a layer ran), computed as
    a vector through the layers, equal the reference's length x length products."""
    torch.manual_seed(0)
    cache = dlm_generation.D2Cache()
    canvas = torch.full((2, 12), MASK)
    cache.begin_generation(canvas, None, MASK, prompt_length=4)
    chosen = torch.rand(2, 12) < 0.4
    chosen[:, 0] = True
    count = int(chosen.sum(-1).max())
    positions = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices[:, :count]
    cache.current = CacheStep(0, 12, 12, row_queries=chosen, positions=positions)
    layers = [torch.rand(2, count, 12).softmax(-1) for _ in range(3)]
    for layer, weights in enumerate(layers):
        cache.observe_attention(layer, weights)
    rollout = torch.eye(12).expand(2, 12, 12)
    for weights in layers:
        effective = torch.eye(12).repeat(2, 1, 1)
        for row in range(2):
            for slot, position in enumerate(positions[row].tolist()):
                if chosen[row, position]:
                    effective[row, position] = weights[row, slot]
        residual = effective + torch.eye(12)
        rollout = (residual / residual.sum(-1, keepdim=True)) @ rollout
    assert torch.allclose(cache.rollout_importance(2), rollout.sum(1), atol=1e-5)


def d2cache_after_one_step(shift: int, config: dict) -> tuple[dlm_generation.D2Cache, torch.Tensor]:
    """A d2Cache after a full first step on 4 prompt + 16 masked positions, told what the step did: positions 6 and 9
    committed, probabilities rising to the right, attention concentrated on position 1."""
    cache = dlm_generation.D2Cache(config)
    canvas = torch.full((1, 20), MASK)
    canvas[0, :4] = torch.tensor([11, 12, 13, 14])
    cache.begin_generation(canvas, None, MASK, prompt_length=4, logits_shift=shift)
    cache.begin_block(4, 20)
    cache.plan_step(canvas, 0)
    attention = torch.full((1, 20, 20), 0.01)
    attention[:, :, 1] = 0.81
    cache.observe_attention(0, attention)
    eligible = torch.ones(1, 16, dtype=torch.bool)
    committed = torch.zeros(1, 16, dtype=torch.bool)
    committed[0, [2, 5]] = True
    canvas[0, [6, 9]] = 7
    probability = torch.linspace(0.1, 0.9, 16)[None]
    cache.end_step(dlm_generation.StepOutcome(canvas, 4, 20, eligible, committed, probability))
    return cache, canvas


@pytest.mark.parametrize("shift", [0, 1])
def test_d2cache_chooses_by_certainty_density_commits_and_rollout(shift):
    config = {"current_k": 3, "sigma": 2.0, "rollout_p": 0.0, "inflate_w": 0}
    cache, canvas = d2cache_after_one_step(shift, config)
    remaining = canvas[0, 4:] == MASK
    density = certainty_density(~remaining[None], 2.0)[0]
    scores = torch.where(remaining, torch.linspace(0.1, 0.9, 16) * density, float("-inf"))
    masked = (scores.topk(3).indices + 4 - shift).tolist()  # a shifted model recomputes the position before
    expected = set(masked) | {6, 9} | {1}  # the committed positions, and the rollout's most important one
    assert set(cache.chosen[0].nonzero().flatten().tolist()) == expected
    plan = cache.plan_step(canvas, 1)
    assert sorted(plan.positions[0].tolist()) == sorted(expected) and plan.row_queries[0].sum() == len(expected)


def test_d2cache_search_window_and_inflation():
    """The search for masked positions starts at the current block and ends at the first block boundary holding
    current_k masks; inflation fills gaps of at most inflate_w."""
    cache = dlm_generation.D2Cache({"current_k": 2, "sigma": 2.0, "rollout_p": 0.0, "inflate_w": 0})
    canvas = torch.full((1, 20), MASK)
    cache.begin_generation(canvas, None, MASK, prompt_length=4)
    cache.begin_block(8, 12)  # generated positions 4..7: block 1 of 4
    cache.plan_step(canvas, 0)
    cache.observe_attention(0, torch.full((1, 20, 20), 0.05))
    canvas[0, 4:8] = 7  # block 0 done
    eligible = torch.zeros(1, 4, dtype=torch.bool)
    cache.end_step(dlm_generation.StepOutcome(canvas, 8, 12, torch.ones(1, 4, dtype=torch.bool), eligible,
                                              torch.full((1, 4), 0.5)))
    masked = [p for p in cache.chosen[0].nonzero().flatten().tolist() if canvas[0, p] == MASK]
    assert all(8 <= p < 12 for p in masked)  # inside the block: it holds 4 >= current_k masks
    inflated = inflate(torch.tensor([[False, True, False, False, True]]), 3)
    assert inflated.tolist() == [[False, True, True, True, True]]


def test_d2cache_keeps_confidences_fresh():
    """The reference writes the new confidences into a copy (`cache[mask][valid] = ...`), so they stay those of the
    first step; here a masked position recomputed in a later step gets its new probability."""
    cache, canvas = d2cache_after_one_step(0, {"current_k": 3, "rollout_p": 0.0})
    first = cache.confidence.clone()
    cache.plan_step(canvas, 1)
    cache.observe_attention(0, torch.full((1, cache.current.positions.shape[1], 20), 0.05))
    eligible = torch.zeros(1, 16, dtype=torch.bool)
    eligible[0, 15] = True
    cache.end_step(dlm_generation.StepOutcome(canvas, 4, 20, eligible, torch.zeros_like(eligible),
                                              torch.full((1, 16), 0.25)))
    assert cache.confidence[0, 15] == 0.25 and first[0, 15] != 0.25
    assert torch.equal(cache.confidence[0, :15], first[0, :15])  # not recomputed: unchanged


def test_d2cache_commits_only_recomputed_positions(model):
    """After the first step, every position a step commits had fresh logits: it was recomputed (Dream: the position
    before it was)."""
    cache = dlm_generation.D2Cache({"current_k": 3})
    plans = []
    plan_step = cache.plan_step
    cache.plan_step = lambda canvas, step: plans.append(plan_step(canvas, step)) or plans[-1]
    out = model.diffusion_generate(PROMPT, max_new_tokens=16, steps=16, schedule="linear", past_key_values=cache,
                                   output_history=True, return_dict_in_generate=True)
    shift = model.diffusion_logits_shift
    assert plans[0].positions is None and not (out.sequences == MASK).any()
    for plan, before, after in zip(plans[1:], out.history, out.history[1:]):
        committed = ((before == MASK) & (after != MASK))[0].nonzero().flatten()
        assert len(committed) == 1
        assert all(plan.row_queries[0, position - shift] for position in committed.tolist())
        assert plan.positions.shape[1] < 26  # a partial forward


def test_d2cache_recomputing_everything_equals_no_cache(model):
    """rollout_p = 1 chooses every position at every step; with the plain scorer the tokens are those of no cache
    (the explicit attention softmax agrees with SDPA to float precision)."""
    kwargs = dict(max_new_tokens=16, steps=16, alg="low_confidence", return_dict_in_generate=True)
    plain = model.diffusion_generate(PROMPT, **kwargs)
    cached = model.diffusion_generate(PROMPT, cache_implementation="d2cache",
                                      cache_config={"rollout_p": 1.0, "certainty_prior": False}, **kwargs)
    assert torch.equal(plain.sequences, cached.sequences) and plain.nfe == cached.nfe


def test_attention_weights_for_the_cache_match_sdpa(model):
    """A cache that reads attention weights gets (batch, queries, keys) rows summing to 1, and the explicit softmax
    gives the logits SDPA gives."""
    seen = {}

    class Watching(DiffusionCache):
        needs_attention_weights = True

        def observe_attention(self, layer_idx, weights):
            seen[layer_idx] = weights

    batch = torch.cat([PROMPT, torch.cat([torch.full((1, 3), EOS), SHORT], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    plain = model(batch, attention_mask=mask).logits
    watched = model(batch, attention_mask=mask, past_key_values=Watching()).logits
    assert torch.allclose(plain, watched, rtol=1e-5, atol=1e-4)  # logits up to about 70
    assert len(seen) > 1 and all(w.shape == (2, 10, 10) for w in seen.values())
    assert all(torch.allclose(w.sum(-1), torch.ones(2, 10)) for w in seen.values())
    assert all((w[1, :, :3] == 0).all() for w in seen.values())  # padding gets no attention


@pytest.mark.parametrize("config, message", [
    ({"current_k": 0}, r"current_k of the 'd2cache' cache must be a positive integer"),
    ({"rollout_p": 1.5}, r"rollout_p of the 'd2cache' cache must be a share between 0 and 1"),
    ({"sigma": 0}, r"sigma of the 'd2cache' cache must be a positive number"),
    ({"inflate_w": -1}, r"inflate_w of the 'd2cache' cache must be a non-negative integer"),
    ({"certainty_prior": "yes"}, r"certainty_prior of the 'd2cache' cache must be True or False"),
])
def test_d2cache_checks_its_settings(config, message):
    with pytest.raises(ValueError, match=message):
        dlm_generation.D2Cache(config)
    assert dlm_generation.D2Cache().cache_config == {"rollout_p": 0.1, "current_k": 32, "sigma": 10.0,
                                                     "inflate_w": 4, "certainty_prior": True}
