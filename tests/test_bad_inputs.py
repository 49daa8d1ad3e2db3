"""The catalogue of bad inputs: every one raises a `ValueError` from this library (not from deep inside torch) whose
message says what was wrong and what to do; none hangs, none falls back silently.

Each case is (id, call, what the message must say). docs/reliability.md gives their number (`len(CASES)`).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, TextStreamer

import dlm_generation
from dlm_generation import CanvasStreamer, DiffusionGenerationConfig

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
PACKAGE = Path(dlm_generation.__file__).resolve().parent
PROMPT = torch.tensor([[5, 6, 7]])
MASK = 500


@pytest.fixture(scope="module")
def llada(random_llada):
    return random_llada  # shared (conftest): a test that modifies a model loads its own


@pytest.fixture(scope="module")
def dream(random_dream):
    return random_dream


def generate(model, prompt=PROMPT, **kwargs):
    kwargs.setdefault("max_new_tokens", 8)
    return model.diffusion_generate(prompt, **kwargs)


def other_vocabulary_guide():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def chain_arith_tokenizer():
    return AutoTokenizer.from_pretrained(CARDS / "tiny-chain-arith-tokenizer")


def random_tokenizer():
    return AutoTokenizer.from_pretrained(CARDS / "tiny-random-llada")


def without_mask_id(model, tmp_path):
    folder = tmp_path / "no-mask"
    model.save_pretrained(folder)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((folder / name).read_text())
        data.pop("mask_token_id", None)
        (folder / name).write_text(json.dumps(data))
    return AutoModelForCausalLM.from_pretrained(folder)


def tokenizer_without_mask():
    tokenizer = random_tokenizer()
    tokenizer.mask_token = None
    return tokenizer


def eval_model_without_mask_id(model, tmp_path):
    from dlm_generation.eval import DiffusionLM

    folder = tmp_path / "no-mask-eval"
    model.save_pretrained(folder)
    random_tokenizer().save_pretrained(folder)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((folder / name).read_text())
        data.pop("mask_token_id", None)
        (folder / name).write_text(json.dumps(data))
    return DiffusionLM(pretrained=str(folder), dtype="float32")


def nan_weights(model):
    """A copy of `model` whose first MLP output weights are NaN (a broken checkpoint)."""
    import copy

    broken = copy.deepcopy(model)
    layer = ("blocks.0.ff_out.weight", "layers.0.mlp.down_proj.weight")  # LLaDA, Dream: NaN reaches every logit
    name = next(n for n, _ in broken.named_parameters() if n.endswith(layer))
    with torch.no_grad():
        dict(broken.named_parameters())[name].fill_(float("nan"))
    return broken


def with_newer_field(model, tmp_path):
    folder = tmp_path / "newer"
    model.save_pretrained(folder)
    data = json.loads((folder / "generation_config.json").read_text())
    data["remask_budget"] = 0.2  # a field a later version might add
    (folder / "generation_config.json").write_text(json.dumps(data))
    return AutoModelForCausalLM.from_pretrained(folder)


def pickle_only(model, tmp_path):
    folder = tmp_path / "pickle"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return AutoModelForCausalLM.from_pretrained(folder)


# (id, call(llada, dream, tmp_path), patterns the message must contain: what was wrong, what to do)
CASES = [
    # ---- config values
    ("steps zero", lambda m, d, t: generate(m, steps=0), ["steps must be a positive integer, got 0"]),
    ("block length negative", lambda m, d, t: generate(m, block_length=-4), ["block_length must be a positive integer"]),
    ("block length zero", lambda m, d, t: generate(m, block_length=0),
     ["block_length must be a positive integer that divides max_new_tokens (e.g. 32), or None", "got 0"]),
    ("block length not an integer", lambda m, d, t: generate(m, block_length=2.5),
     ["block_length must be a positive integer", "got 2.5"]),
    ("block length as a string", lambda m, d, t: generate(m, block_length="4"),
     ["block_length must be a positive integer", "got '4'"]),
    ("non-finite logits (NaN weights)", lambda m, d, t: generate(nan_weights(m)),
     ["forward pass 1 (block 1 of 1) produced non-finite logits", "check the checkpoint"]),
    ("max_new_tokens zero", lambda m, d, t: generate(m, max_new_tokens=0), ["max_new_tokens must be a positive"]),
    ("temperature negative", lambda m, d, t: generate(m, temperature=-1.0), ["temperature must be a finite number >= 0"]),
    ("temperature infinite", lambda m, d, t: generate(m, temperature=float("inf")), ["temperature must be a finite"]),
    ("unknown alg", lambda m, d, t: generate(m, alg="fastest"), ["alg='fastest' is unknown; choose one of"]),
    ("unknown schedule", lambda m, d, t: generate(m, schedule="cosine"), ["schedule='cosine' is unknown; choose"]),
    ("top_p above 1", lambda m, d, t: generate(m, top_p=1.5), ["top_p must be in (0, 1]", "use None to disable"]),
    ("eps zero", lambda m, d, t: generate(d, eps=0.0), ["eps must be in (0, 1)", "Dream uses 1e-3"]),
    ("threshold above 1", lambda m, d, t: generate(m, threshold=1.5), ["threshold must be in (0, 1]", "Fast-dLLM uses 0.9"]),
    ("factor zero", lambda m, d, t: generate(m, factor=0), ["factor must be a number > 0", "Fast-dLLM uses 1.0"]),
    ("cfg negative", lambda m, d, t: generate(m, cfg_scale=-1.0), ["cfg_scale must be a finite number >= 0"]),
    ("pad id equal to the mask id", lambda m, d, t: generate(m, pad_token_id=MASK),
     ["pad_token_id equals mask_token_id (500)", "use the EOS id"]),
    ("boolean as string", lambda m, d, t: generate(m, eos_early_stop="yes"), ["eos_early_stop must be True or False"]),
    ("negative token id", lambda m, d, t: generate(m, eot_token_id=-3), ["eot_token_id must be a non-negative token id"]),
    ("mask id outside vocabulary", lambda m, d, t: generate(m, mask_token_id=9999),
     ["mask_token_id 9999 is outside the model's vocabulary [0, 512)"]),
    ("misspelt field", lambda m, d, t: generate(m, treshold=0.9), ["'treshold' (did you mean 'threshold'?)"]),
    ("autoregressive-only field", lambda m, d, t: generate(m, repetition_penalty=1.2),
     ["repetition_penalty=1.2 is not supported by diffusion decoding", "leave it unset"]),
    # ---- contradictory values and incompatible combinations
    ("threshold and factor", lambda m, d, t: generate(m, threshold=0.9, factor=1.0), ["set only one of them"]),
    ("threshold with entropy scorer", lambda m, d, t: generate(d, alg="entropy", threshold=0.9),
     ["alg='entropy' scores by negative entropy", "use alg='maskgit_plus'"]),
    ("threshold with origin", lambda m, d, t: generate(d, alg="origin", threshold=0.9),
     ["alg='origin' reveals random positions", "drop threshold/factor"]),
    ("factor with confidence_threshold", lambda m, d, t: generate(d, alg="confidence_threshold", factor=1.0),
     ["is a threshold policy; it cannot be combined with factor"]),
    ("length not a multiple of the block", lambda m, d, t: generate(m, max_new_tokens=10, block_length=4),
     ["max_new_tokens (10) must be a multiple of block_length (4)", "block_length=None"]),
    ("steps not a multiple of the blocks", lambda m, d, t: generate(m, max_new_tokens=8, block_length=4, steps=3),
     ["steps (3) must be a multiple of the number of blocks (2"]),
    ("max_length leaves no room", lambda m, d, t: generate(m, max_new_tokens=None, max_length=3),
     ["max_length (3) leaves no room after the 3-token prompt", "set max_new_tokens"]),
    # ---- per-cache settings
    ("unknown cache", lambda m, d, t: generate(m, cache_implementation="fast"), ["'fast' is not a diffusion cache; choose"]),
    ("cache config not a dict", lambda m, d, t: generate(m, cache_implementation="dual", cache_config="big"),
     ["cache_config must be a dict"]),
    ("cache key of another cache", lambda m, d, t: generate(m, cache_implementation="prefix", cache_config={"kp": 2}),
     ["cache_config key 'kp' is not a setting of the 'prefix' cache"]),
    ("freecache negative window", lambda m, d, t: generate(m, cache_implementation="freecache",
                                                             cache_config={"window_left": -2}),
     ["window_left of the 'freecache' cache must be a non-negative integer, got -2"]),
    ("freecache zero right window", lambda m, d, t: generate(m, cache_implementation="freecache",
                                                               cache_config={"window_right": 0}),
     ["window_right of the 'freecache' cache must be a positive integer (or None"]),
    ("dllm zero interval", lambda m, d, t: generate(m, cache_implementation="dllm", cache_config={"kp": 0}),
     ["kp of the 'dllm' cache must be a positive integer (a refresh interval"]),
    ("dllm share above 1", lambda m, d, t: generate(m, cache_implementation="dllm", cache_config={"rou": 1.5}),
     ["rou of the 'dllm' cache must be a share between 0 and 1"]),
    # ---- guidance
    ("unknown guidance strategy", lambda m, d, t: generate(m, guidance={"strategy": "fast"}), ["strategy"]),
    ("unknown guidance key", lambda m, d, t: generate(m, guidance={"chunk": 4}), ["chunk"]),
    ("guidance with threshold", lambda m, d, t: generate(m, guidance={}, threshold=0.9),
     ["threshold=0.9 cannot be combined with guidance", "pass threshold=None"]),
    ("guidance with temperature", lambda m, d, t: generate(m, guidance={}, temperature=0.7),
     ["draft_temperature", "leave temperature at 0"]),
    ("guidance without a guide", lambda m, d, t: generate(m, guidance={}),
     ["guidance needs an autoregressive guide: pass assistant_model="]),
    ("a diffusion model as the guide", lambda m, d, t: generate(m, assistant_model=d, guidance={}),
     ["assistant_model is a diffusion model; the guide must be an autoregressive causal LM"]),
    ("a guide with another vocabulary", lambda m, d, t: generate(
        m, assistant_model=other_vocabulary_guide(), tokenizer=random_tokenizer(),
        assistant_tokenizer=chain_arith_tokenizer()), ["vocabular"]),
    # ---- prompts
    ("no prompt", lambda m, d, t: m.diffusion_generate(None, max_new_tokens=8), ["needs a prompt: pass input_ids"]),
    ("prompt and input_ids", lambda m, d, t: m.diffusion_generate(PROMPT, input_ids=PROMPT),
     ["either positionally (inputs) or as input_ids=, not both"]),
    ("empty prompt", lambda m, d, t: generate(m, torch.zeros(1, 0, dtype=torch.long)),
     ["pass at least one prompt of at least one token"]),
    ("empty batch", lambda m, d, t: generate(m, torch.zeros(0, 3, dtype=torch.long)), ["at least one prompt"]),
    ("float prompt", lambda m, d, t: generate(m, PROMPT.float()), ["must be an integer tensor", "return_tensors='pt'"]),
    ("one-dimensional prompt", lambda m, d, t: generate(m, PROMPT[0]), ["shape (batch, prompt_len)"]),
    ("a list, not a tensor", lambda m, d, t: generate(m, [[5, 6, 7]]), ["must be an integer tensor", "got list"]),
    ("ids outside the vocabulary", lambda m, d, t: generate(m, torch.tensor([[5, 600]])),
     ["ids outside the model's vocabulary [0, 512)"]),
    ("negative ids", lambda m, d, t: generate(m, torch.tensor([[-1, 5]])), ["outside the model's vocabulary"]),
    ("right padding", lambda m, d, t: generate(m, torch.tensor([[5, 6, 501]]), attention_mask=torch.tensor([[1, 1, 0]])),
     ["padding after real tokens", "pad on the left (tokenizer.padding_side = 'left')"]),
    ("attention mask of another shape", lambda m, d, t: generate(m, attention_mask=torch.ones(1, 4, dtype=torch.long)),
     ["attention_mask has shape (1, 4) but input_ids has (1, 3)"]),
    ("prompt on the meta device", lambda m, d, t: generate(m, torch.tensor([[5, 6]], device="meta")),
     ["on the meta device", "pass real token ids"]),
    ("canvas longer than the positions", lambda m, d, t: generate(m, max_new_tokens=300),
     ["needs 303 positions, more than the model's 256", "shorten the prompt or lower max_new_tokens"]),
    # ---- models, configs, tokenizers, streamers
    ("no mask token anywhere", lambda m, d, t: generate(without_mask_id(m, t)),
     ["mask_token_id", "pass mask_token_id="]),
    ("a tokenizer without a mask token (training loss)", lambda m, d, t: __import__(
        "dlm_generation.training", fromlist=["x"]).masked_diffusion_loss(m, [[5, 6]], [[7, 501]], tokenizer_without_mask()),
     ["The tokenizer has no mask_token", "add_special_tokens"]),
    ("lm-eval model without a mask id", lambda m, d, t: eval_model_without_mask_id(m, t),
     ["has no usable mask_token_id", "config.json"]),
    ("a saved config with fields from a newer version", lambda m, d, t: generate(with_newer_field(m, t)),
     ["does not know: ['remask_budget']", "upgrade dlm-generation", ".drop_unknown_fields()"]),
    ("a passed config with unknown fields", lambda m, d, t: generate(m, generation_config=DiffusionGenerationConfig.from_dict(
        {"remask_budget": 0.2})), ["passed to this call has field(s)", "remask_budget"]),
    ("a one-row streamer for a batch", lambda m, d, t: generate(m, PROMPT.repeat(2, 1), streamer=TextStreamer(
        random_tokenizer())), ["shows one sequence, but this call decodes 2 rows", "CanvasStreamer"]),
    ("a canvas streamer without the mask id", lambda m, d, t: CanvasStreamer(mask_token_id=None),
     ["mask_token_id must be a non-negative token id", "model.config.mask_token_id"]),
    ("pickle weights without opt-in", lambda m, d, t: pickle_only(m, t),
     ["holds only pickle weights (pytorch_model.bin)", "use_safetensors=False"]),
]


@pytest.mark.parametrize("name, call, patterns", CASES, ids=[c[0] for c in CASES])
def test_bad_input_says_what_was_wrong_and_what_to_do(name, call, patterns, llada, dream, tmp_path):
    with pytest.raises(ValueError) as caught:
        call(llada, dream, tmp_path)
    message = str(caught.value)
    for pattern in patterns:
        assert pattern in message, f"{name}: {pattern!r} not in {message!r}"
    innermost = Path(traceback.extract_tb(caught.value.__traceback__)[-1].filename).resolve()
    assert PACKAGE in innermost.parents, f"{name}: raised from {innermost}, not from this library"


def test_pickle_weights_load_with_the_opt_in_and_save_as_safetensors(llada, tmp_path):
    with pytest.raises(ValueError):
        pickle_only(llada, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pickle", use_safetensors=False)
    for (name, a), b in zip(llada.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    loaded.save_pretrained(tmp_path / "converted")
    files = {p.name for p in (tmp_path / "converted").iterdir()}
    assert "model.safetensors" in files and not files & {"pytorch_model.bin", "pytorch_model.bin.index.json"}
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")  # no opt-in needed any more
    assert torch.equal(generate(again), generate(llada))


def test_shipped_models_hold_safetensors_only():
    for folder in CARDS.iterdir():
        if (folder / "config.json").is_file():
            names = {p.name for p in folder.iterdir()}
            assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth")) for n in names), folder


@pytest.mark.parametrize("from_model_config", [True, False])
def test_unknown_saved_fields_can_be_dropped_and_are_not_written_back(llada, tmp_path, from_model_config):
    folder = tmp_path / "newer"
    llada.save_pretrained(folder)
    data = json.loads((folder / "generation_config.json").read_text())
    data["_from_model_config"] = from_model_config
    data.update(remask_budget=0.2, return_legacy_cache=True, unset_field=None)  # legacy and None fields are fine
    (folder / "generation_config.json").write_text(json.dumps(data))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.generation_config.unknown_fields() == {"remask_budget": 0.2}
    with pytest.raises(ValueError, match="remask_budget"):
        generate(model)
    assert model.generation_config.drop_unknown_fields() == {"remask_budget": 0.2}
    assert torch.equal(generate(model), generate(llada))
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert "_unknown_saved_fields" not in saved and "remask_budget" not in saved


def test_a_plain_generation_config_with_unknown_fields_is_refused(llada):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=8)
    config.remask_budget = 0.2
    with pytest.raises(ValueError, match="passed to this call has field.*remask_budget"):
        generate(llada, generation_config=config)


def test_bad_input_leaves_the_model_usable(llada, dream, tmp_path):
    expected = generate(llada), generate(dream)
    for _, call, _ in CASES:
        with pytest.raises(ValueError):
            call(llada, dream, tmp_path / str(len(list(tmp_path.iterdir()))))
    assert torch.equal(generate(llada), expected[0]) and torch.equal(generate(dream), expected[1])


def test_pickle_only_hub_repositories_and_variants_are_refused(llada, tmp_path, monkeypatch):
    """The Hub cannot be reached here, so the repository's file list is given (huggingface_hub.list_repo_files)."""
    import huggingface_hub

    from dlm_generation import LLaDAModelLM

    listed = {"someone/pickle-only": ["config.json", "pytorch_model.bin"],
              "someone/sharded": ["config.json", "sub/pytorch_model-00001-of-00002.bin",
                                  "sub/pytorch_model.bin.index.json"]}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None, token=None: listed[repo])
    with pytest.raises(ValueError, match=r"someone/pickle-only holds only pickle weights \(pytorch_model.bin\)"):
        LLaDAModelLM.from_pretrained("someone/pickle-only")
    with pytest.raises(ValueError, match="pytorch_model-00001-of-00002.bin, pytorch_model.bin.index.json"):
        LLaDAModelLM.from_pretrained("someone/sharded", subfolder="sub")
    folder = tmp_path / "variant"
    llada.save_pretrained(folder)
    (folder / "model.safetensors").rename(folder / "adapter_model.safetensors")  # not model weights
    torch.save(llada.state_dict(), folder / "pytorch_model.fp16.bin")
    with pytest.raises(ValueError, match=r"holds only pickle weights \(pytorch_model.fp16.bin\)"):
        AutoModelForCausalLM.from_pretrained(folder, variant="fp16")
