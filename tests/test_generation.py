"""Behaviour of the denoising loop beyond the golden vectors: batching, early stop, hooks, outputs, pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessorList,
    MaxTimeCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
    SuppressTokensLogitsProcessor,
    pipeline,
)
from transformers.generation.streamers import BaseStreamer

import dlm_generation
from dlm_generation.hub import save_without_code

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
FAMILIES = ["llada", "dream"]
MASK, EOS, EOT = 500, 501, 502
PROMPT = torch.tensor([[495, 65, 138, 430, 447, 294, 491, 416, 151, 336]])
PROMPT_E = None  # filled lazily from the golden case where LLaDA predicts EOS


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family, request):
    return request.getfixturevalue(f"random_{family}")  # shared (conftest): tests here must not modify it


@pytest.fixture(scope="module")
def tokenizer(family, request):
    return request.getfixturevalue(f"random_{family}_tokenizer")


def test_output_fields(model):
    out = model.diffusion_generate(PROMPT, max_new_tokens=16, steps=8, return_dict_in_generate=True,
                                   output_history=True)
    assert out.sequences.shape == (1, 26)
    assert torch.equal(out.sequences[:, :10], PROMPT)
    assert not (out.sequences == MASK).any()
    assert out.nfe == 8 and len(out.history) == 8
    assert torch.equal(out.history[-1], out.sequences)
    assert out.tokens_per_forward.shape == (1,)
    assert 0 < float(out.tokens_per_forward[0]) <= 16 / 8
    # Without return_dict_in_generate the tensor comes back, like upstream generate.
    plain = model.diffusion_generate(PROMPT, max_new_tokens=16, steps=8)
    assert torch.equal(plain, out.sequences)


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_output_confidences_are_the_committed_tokens_probabilities(model, threshold):
    """Each generated position reports the probability its token had at the step it was committed (recomputed here
    from the canvas before that step), in the model's own logit alignment (Dream reads position i at i - 1)."""
    out = model.diffusion_generate(PROMPT, max_new_tokens=16, steps=16, block_length=8, alg="low_confidence",
                                   threshold=threshold, output_history=True, output_confidences=True,
                                   return_dict_in_generate=True)
    assert out.confidences.shape == (1, 16) and out.confidences.dtype == torch.float32
    assert not out.confidences.isnan().any()
    previous = torch.cat([PROMPT, torch.full((1, 16), MASK)], 1)
    checked = 0
    for canvas in out.history:
        logits = model(previous).logits
        if model.diffusion_logits_shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
        probs = logits.float().softmax(-1)
        for position in (canvas[0] != previous[0]).nonzero().flatten().tolist():
            expected = probs[0, position, canvas[0, position]]
            assert torch.isclose(out.confidences[0, position - 10], expected, atol=1e-5), position
            checked += 1
        previous = canvas
    assert checked == 16
    if threshold is not None:
        assert out.nfe < 16  # several tokens per step, each with its own confidence


def test_output_confidences_are_nan_where_a_stop_filled_padding(model):
    batch = torch.cat([PROMPT, torch.tensor([[204, 404, 14, 299, 151, 24, 64, 237, 386, 2]])])
    out = model.diffusion_generate(batch, max_new_tokens=32, steps=32, block_length=8, eot_token_id=EOT,
                                   eos_early_stop=True, output_confidences=True, return_dict_in_generate=True)
    padded = (out.confidences.isnan())
    assert padded.any(), "a row stopped early on these prompts"
    assert (out.sequences[:, 10:][padded] == EOS).all()
    assert not model.diffusion_generate(PROMPT, max_new_tokens=8, return_dict_in_generate=True).confidences


def test_left_padded_row_equals_row_alone(model):
    """Left padding with an attention mask gives each row the result it gets alone (LLaDA's original ignored masks)."""
    short = torch.tensor([[271, 68, 306, 195, 186, 232, 56]])
    batch = torch.cat([PROMPT, torch.cat([torch.full((1, 3), EOS), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kwargs = dict(max_new_tokens=16, steps=16, block_length=8)
    together = model.diffusion_generate(batch, attention_mask=mask, **kwargs)
    alone = model.diffusion_generate(short, **kwargs)
    assert together[1, 10:].tolist() == alone[0, 7:].tolist()
    alone0 = model.diffusion_generate(PROMPT, **kwargs)
    assert together[0].tolist() == alone0[0].tolist()


def test_threshold_commits_several_tokens_per_forward(model):
    vanilla = model.diffusion_generate(PROMPT, max_new_tokens=32, block_length=8, return_dict_in_generate=True)
    fast = model.diffusion_generate(PROMPT, max_new_tokens=32, block_length=8, threshold=0.5,
                                    alg="maskgit_plus", return_dict_in_generate=True)
    assert vanilla.nfe == 32
    assert fast.nfe < vanilla.nfe
    assert not (fast.sequences == MASK).any()


def test_eos_early_stop_is_lossless(model):
    """Rows stop once everything before their first stop token is settled; the text up to it is unchanged."""
    batch = torch.cat([PROMPT, torch.tensor([[204, 404, 14, 299, 151, 24, 64, 237, 386, 2]])])
    kwargs = dict(max_new_tokens=32, steps=32, block_length=8, return_dict_in_generate=True, eot_token_id=EOT)
    full = model.diffusion_generate(batch, **kwargs)
    early = model.diffusion_generate(batch, eos_early_stop=True, **kwargs)
    stopped_any = False
    for row in range(2):
        gen_full, gen_early = full.sequences[row, 10:].tolist(), early.sequences[row, 10:].tolist()
        stops = [i for i, t in enumerate(gen_full) if t in (EOS, EOT)]
        if not stops:
            assert gen_early == gen_full
            continue
        stopped_any = True
        first = stops[0]
        assert gen_early[: first + 1] == gen_full[: first + 1]
        assert all(t == EOS for t in gen_early[first + 1:]), "what follows the stop token becomes pad"
    assert stopped_any, "the tiny random models emit EOS/EoT on these prompts"
    assert early.nfe <= full.nfe


def test_logits_processor_hook(model):
    """A shape-safe upstream processor acts on the (batch, window, vocab) diffusion logits."""
    banned = list(range(0, 250))
    out = model.diffusion_generate(
        PROMPT, max_new_tokens=16, steps=16, logits_processor=LogitsProcessorList([SuppressTokensLogitsProcessor(banned)])
    )
    assert (out[0, 10:] >= 250).all()


class FavourMask:
    """A processor that makes the mask token every position's argmax (a model can predict its own mask id)."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[..., MASK] = scores.max() + 10.0
        return scores


@pytest.mark.parametrize(
    "config", [dict(steps=16), dict(alg="low_confidence", threshold=0.9), dict(alg="confidence_threshold", threshold=0.9)]
)
def test_mask_token_is_never_committed(model, config):
    """Regression: a predicted mask id used to be committed, stay masked, and the step loop never ended."""
    out = model.diffusion_generate(
        PROMPT, max_new_tokens=16, block_length=8, logits_processor=LogitsProcessorList([FavourMask()]),
        return_dict_in_generate=True, **config,
    )
    assert (out.sequences[0, 10:] != MASK).all()
    assert out.nfe <= 16


def test_stopping_criteria_hook(model):
    class StopAfterSteps(StoppingCriteria):
        def __init__(self, n):
            self.n, self.calls = n, 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            assert input_ids.shape == (1, 42)
            return torch.full((input_ids.shape[0],), self.calls >= self.n, dtype=torch.bool)

    criterion = StopAfterSteps(3)
    out = model.diffusion_generate(PROMPT, max_new_tokens=32, steps=32, block_length=8,
                                   stopping_criteria=StoppingCriteriaList([criterion]), return_dict_in_generate=True)
    assert out.nfe == 3
    assert not (out.sequences == MASK).any(), "masks of a stopped row become pad"
    # Upstream criteria work unchanged.
    out = model.diffusion_generate(PROMPT, max_new_tokens=16, stopping_criteria=[MaxTimeCriteria(60.0)],
                                   return_dict_in_generate=True)
    assert out.nfe == 16


def test_streamer_receives_settled_text(model):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = model.diffusion_generate(PROMPT, max_new_tokens=16, steps=16, block_length=4, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == PROMPT[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, 10:].tolist()


def test_num_return_sequences_and_sampling(model):
    torch.manual_seed(0)
    out = model.diffusion_generate(PROMPT, max_new_tokens=16, temperature=1.0, num_return_sequences=3)
    assert out.shape == (3, 26)
    assert len({tuple(row) for row in out.tolist()}) > 1, "sampling with temperature 1 differs between rows"
    greedy = model.diffusion_generate(PROMPT, max_new_tokens=16, temperature=1.0, do_sample=False)
    assert torch.equal(greedy, model.diffusion_generate(PROMPT, max_new_tokens=16))


def test_cfg_and_alg_variants_run(model):
    for kwargs in (dict(cfg_scale=1.0), dict(alg="topk_margin"), dict(alg="entropy"), dict(alg="random"),
                   dict(alg="origin", schedule="eps"), dict(factor=1.0, alg="maskgit_plus"), dict(alg="confidence_threshold"),
                   dict(top_k=3, top_p=0.9, temperature=0.7), dict(alg_temp=0.5, alg="entropy")):
        out = model.diffusion_generate(PROMPT, max_new_tokens=16, steps=8, block_length=8,
                                       return_dict_in_generate=True, **kwargs)
        assert not (out.sequences == MASK).any(), kwargs


def test_generate_is_the_same_loop(model):
    out = model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=16, use_cache=True)
    assert torch.equal(out, model.diffusion_generate(PROMPT, max_new_tokens=16))


def test_pipeline_text_generation(model, tokenizer):
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "Question: Tom has 3 apples"
    full = generator(prompt, max_new_tokens=16)[0]["generated_text"]
    new = generator(prompt, max_new_tokens=16, return_full_text=False)[0]["generated_text"]
    assert full.startswith(prompt)
    assert full == prompt + new
    # Pipeline defaults (do_sample=True, temperature 0.7) are overridden by the model's greedy generation config:
    # two calls give the same text.
    assert generator(prompt, max_new_tokens=16, return_full_text=False)[0]["generated_text"] == new
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = tokenizer.decode(model.diffusion_generate(ids, max_new_tokens=16)[0, ids.shape[1]:],
                                skip_special_tokens=True)
    assert new == expected
    batched = generator([prompt, "Hello"], max_new_tokens=16, return_full_text=False, batch_size=2)
    assert batched[0][0]["generated_text"] == new


def test_pipeline_stop_strings(model, tokenizer):
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "Question: Tom has 3 apples"
    text = generator(prompt, max_new_tokens=24, return_full_text=False)[0]["generated_text"]
    stop = text[2:4]
    stopped = generator(prompt, max_new_tokens=24, return_full_text=False, stop_sequence=stop)[0]["generated_text"]
    # The text before the stop is unchanged, the stop string is kept, and what followed it is cut.
    assert stop in stopped and text.startswith(stopped) and len(stopped) < len(text)


def test_stop_strings_need_tokenizer(model):
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        model.diffusion_generate(PROMPT, max_new_tokens=8, stop_strings=["x"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["random", "chain-arith"])
def test_shipped_folders_hold_no_code_and_load_with_the_package(family, kind, tmp_path):
    """model_cards/ folders carry weights, configs and tokenizer only; the registered Auto classes load them, and
    save_pretrained of the loaded model still writes the code a pushed copy needs (tests/test_remote_code.py runs it
    without the package)."""
    folder = CARDS / (f"tiny-random-{family}" if kind == "random" else f"tiny-{family}-chain-arith")
    assert not list(folder.glob("*.py"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is {"llada": dlm_generation.LLaDAModelLM, "dream": dlm_generation.DreamModel}[family]
    model.save_pretrained(tmp_path)
    written = {path.name for path in tmp_path.glob("*.py")}
    assert f"modeling_{family}.py" in written and "generation_utils.py" in written, written


def test_save_without_code_writes_a_folder_that_loads_with_the_package(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(CARDS / "tiny-random-llada")
    save_without_code(model, tmp_path)
    assert not list(tmp_path.glob("*.py"))
    assert dlm_generation.LLaDAModelLM._auto_class == "AutoModelForCausalLM"  # the registration is restored
    assert dlm_generation.LLaDAConfig._auto_class == "AutoConfig"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_model_built_from_config_saves_its_generation_config(tmp_path):
    """Regression: a model constructed from a config (as training scripts do) had transformers' plain
    GenerationConfig, whose save-time validation rejected the greedy temperature=0.0 default."""
    config = dlm_generation.DreamConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                        num_hidden_layers=1, intermediate_size=64, vocab_size=64, mask_token_id=3)
    model = dlm_generation.DreamModel(config)
    assert isinstance(model.generation_config, dlm_generation.DiffusionGenerationConfig)
    model.generation_config.update(alg="low_confidence", threshold=0.9, eos_early_stop=True)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).generation_config
    assert (loaded.alg, loaded.threshold, loaded.eos_early_stop, loaded.temperature) == ("low_confidence", 0.9, True, 0.0)
