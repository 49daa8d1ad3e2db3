"""Shared test settings, markers and fixtures.

Tiers:
* `pytest -m "not slow"`: the fast tier to run while working (75 s on a small machine at one thread; about a minute
  with `-n 2`, pytest-xdist, on two cores).
* `pytest -n 2`: everything CI runs (the fast tier plus the tests marked `slow`: browser, subprocesses, training,
  lm-eval runs, the 1,000-call memory checks, the fuzzer, torchrun, end-to-end benchmarks, anything over ~3 s).
* `pytest -m nightly`: long runs left out of CI. Nightly tests are deselected unless the `-m` expression names
  `nightly`, so `pytest` and `pytest -m "not slow"` both leave them out.

Shared models: the shipped tiny models are loaded once per session (`.eval()`, float32) by `shared_model(folder)`
and the fixtures built on it. They are shared by many tests, so a test must not change them: `guard_shared_models`
fails the test that changed a shared model's weights, config, generation_config, modules or train/eval mode. A test
that needs to change a model loads its own copy (`AutoModelForCausalLM.from_pretrained(folder)`).
"""

from __future__ import annotations

import socket
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dlm_generation  # noqa: F401  (registers the model types)

# The tiny models run a forward in about a millisecond on one thread; with two, thread start-up dominates (~100x).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"  # the shipped tiny models
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"  # the reference decoders' tiny checkpoints
RANDOM_LLADA = CARDS / "tiny-random-llada"
RANDOM_DREAM = CARDS / "tiny-random-dream"
LLADA_CHAIN_ARITH = CARDS / "tiny-llada-chain-arith"
DREAM_CHAIN_ARITH = CARDS / "tiny-dream-chain-arith"
AR_CHAIN_ARITH = CARDS / "tiny-ar-chain-arith"
CHAIN_ARITH_TOKENIZER = CARDS / "tiny-chain-arith-tokenizer"


# ---------------------------------------------------------------------------------------------------- markers
# `slow` and `nightly` are registered in pyproject.toml.
def pytest_configure(config):
    """Under pytest-xdist (`-n 2`), tests that share a `xdist_group` (the Ray modules: one local Ray cluster each)
    run on one worker, so two workers never start two Ray clusters on the same cores at once."""
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


def pytest_collection_modifyitems(config, items):
    """Leave out `nightly` tests unless the -m expression names them (`pytest -m nightly`)."""
    if "nightly" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("nightly") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("nightly")])
        items[:] = kept


# ---------------------------------------------------------------------------------------------------- ports
@pytest.fixture
def free_port():
    """A function returning a TCP port free on 127.0.0.1 right now (bound to port 0, read, released): servers and
    process groups started by tests take a fresh one each time instead of a fixed default."""

    def find() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    return find


# ---------------------------------------------------------------------------------------------------- shared models
_MODELS: dict[str, torch.nn.Module] = {}
_TOKENIZERS: dict[tuple[str, str | None], object] = {}
_AT_LOAD: dict[object, tuple] = {}  # key -> the fingerprint taken right after loading


def shared_model(folder: Path | str):
    """The model in `folder`, loaded once per session in float32 and in eval mode. Do not modify it."""
    key = str(folder)
    if key not in _MODELS:
        _MODELS[key] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        _AT_LOAD[key] = _model_fingerprint(_MODELS[key], copy=True)
    return _MODELS[key]


def shared_tokenizer(folder: Path | str, padding_side: str | None = None):
    """The tokenizer in `folder` (with `padding_side` when given), loaded once per session. Do not modify it."""
    key = (str(folder), padding_side)
    if key not in _TOKENIZERS:
        kwargs = {} if padding_side is None else {"padding_side": padding_side}
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(folder, **kwargs)
        _AT_LOAD[key] = _tokenizer_fingerprint(_TOKENIZERS[key])
    return _TOKENIZERS[key]


def _model_fingerprint(model, copy: bool = False) -> tuple:
    # In-place writes bump a tensor's version counter and replaced parameters change identity; adapters add modules;
    # the configs are compared attribute by attribute (deep-copied once, at load time).
    params = tuple((name, id(p), p._version) for name, p in model.named_parameters())
    buffers = tuple((name, id(b), b._version) for name, b in model.named_buffers())
    modules = tuple(name for name, _ in model.named_modules())
    configs = (_normalised(vars(model.config)), vars(model.generation_config))
    return params, buffers, modules, model.training, (deepcopy(configs) if copy else configs)


def _normalised(fields: dict) -> dict:
    # save_pretrained writes `dtype` back as its name (torch.float32 -> "float32"): not a change.
    return {key: str(value).removeprefix("torch.") if key in ("dtype", "torch_dtype") else value
            for key, value in fields.items()}


def _tokenizer_fingerprint(tokenizer) -> tuple:
    return (tokenizer.padding_side, tokenizer.truncation_side, len(tokenizer), tokenizer.chat_template,
            tuple(sorted(tokenizer.special_tokens_map.items(), key=str)))


@pytest.fixture(autouse=True)
def guard_shared_models(request):
    """Fail the test that changed a shared model or tokenizer (weights, modules, mode, config, generation_config,
    padding side, ...). The changed object leaves the guard's list, so the failure is reported once, on the test that
    made the change (later tests holding it through a fixture may still fail because of it)."""
    yield
    changed = [key for key, model in _MODELS.items() if _model_fingerprint(model) != _AT_LOAD[key]]
    changed += [key for key, tok in _TOKENIZERS.items() if _tokenizer_fingerprint(tok) != _AT_LOAD[key]]
    for key in changed:
        _MODELS.pop(key, None)
        _TOKENIZERS.pop(key, None)
    if changed:
        pytest.fail(f"{request.node.nodeid} changed the session's shared {changed}: a test that modifies a model or "
                    "tokenizer loads a copy of its own (from_pretrained), or restores it with monkeypatch")


@pytest.fixture(scope="session")
def random_llada():
    return shared_model(RANDOM_LLADA)


@pytest.fixture(scope="session")
def random_dream():
    return shared_model(RANDOM_DREAM)


@pytest.fixture(scope="session")
def llada_chain_arith():
    return shared_model(LLADA_CHAIN_ARITH)


@pytest.fixture(scope="session")
def dream_chain_arith():
    return shared_model(DREAM_CHAIN_ARITH)


@pytest.fixture(scope="session")
def ar_chain_arith():
    return shared_model(AR_CHAIN_ARITH)


@pytest.fixture(scope="session")
def chain_arith_tokenizer():
    """The chain-arith models' tokenizer, left padding (batched generation)."""
    return shared_tokenizer(CHAIN_ARITH_TOKENIZER, "left")


@pytest.fixture(scope="session")
def random_llada_tokenizer():
    return shared_tokenizer(RANDOM_LLADA)


@pytest.fixture(scope="session")
def random_dream_tokenizer():
    return shared_tokenizer(RANDOM_DREAM)


@pytest.fixture(scope="session")
def golden_llada():
    """The reference decoders' tiny LLaDA (tests/fixtures/golden): the weights of tiny-random-llada with the
    original LLaDA generation_config."""
    return shared_model(GOLDEN / "tiny-llada")


@pytest.fixture(scope="session")
def golden_dream():
    """The reference decoders' tiny Dream (tests/fixtures/golden): Dream's original generation_config."""
    return shared_model(GOLDEN / "tiny-dream")
