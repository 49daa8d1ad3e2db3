"""AR-guided diffusion (FlashDLM): options, acceptance rules, the guide's cache, the vocabulary check, and guided
decoding end to end on the shipped chain-arith models with `tiny-ar-chain-arith` as the guide."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation import DiffusionGenerationConfig
from dlm_generation.diffusion_guidance import (
    GUIDANCE_DEFAULTS,
    ARGuide,
    check_shared_vocabulary,
    resolve_guidance_config,
)
from dlm_generation.tasks.chain_arith import dev_split, is_correct

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
MASK, EOS = 3, 2


def raises(pattern):
    return pytest.raises(ValueError, match=pattern)


# ---------------------------------------------------------------------------------------------------- options
def test_defaults_are_flashdlm_defaults():
    assert resolve_guidance_config(None) == GUIDANCE_DEFAULTS
    assert resolve_guidance_config({"strategy": "topk_relative", "top_k": 3}) == {**GUIDANCE_DEFAULTS,
                                                                                   "strategy": "topk_relative",
                                                                                   "top_k": 3}


@pytest.mark.parametrize("guidance, message", [
    ({"strategy": "greedy"}, r"strategy='greedy' is unknown; choose one of \('deterministic'"),
    ({"stratgy": "deterministic"}, r"unknown guidance key\(s\) \['stratgy'\]"),
    ({"strategy": "deterministic", "top_k": 3}, r"\['top_k'\] are read only by strategy='topk_relative'"),
    ({"strategy": "topk_relative", "top_k": 0}, r"top_k must be an integer >= 1, got 0"),
    ({"strategy": "topk_relative", "relative_threshold": 1.5}, r"relative_threshold must be in \(0, 1\], got 1.5"),
    ({"strategy": "topk_relative", "relative_threshold": True}, r"relative_threshold must be in \(0, 1\]"),
    ({"verify_chunk": 0}, r"verify_chunk must be an integer >= 1, got 0"),
    ({"verify_chunk": 2.5}, r"verify_chunk must be an integer >= 1, got 2.5"),
    ({"draft_temperature": -0.1}, r"draft_temperature must be a finite number >= 0 \(0 = argmax\), got -0.1"),
    ({"draft_temperature": float("inf")}, r"draft_temperature must be a finite number >= 0"),
    ({"assistant_model_id": ""}, r"assistant_model_id must be a Hub id or a local path"),
    ("ar", r"guidance must be a dict such as \{'strategy': 'deterministic'\}, got 'ar'"),
])
def test_bad_guidance_is_refused_with_the_reason(guidance, message):
    with raises(message):
        resolve_guidance_config(guidance)
    if isinstance(guidance, dict):  # the config reports the same problem
        with raises(message):
            DiffusionGenerationConfig(guidance=guidance)


@pytest.mark.parametrize("fields, message", [
    ({"threshold": 0.9}, r"threshold=0.9 cannot be combined with guidance: .* pass threshold=None"),
    ({"factor": 1.0}, r"factor=1.0 cannot be combined with guidance"),
    ({"temperature": 0.5}, r"temperature=0.5: with guidance the drafts are drawn at guidance\['draft_temperature'\]"),
])
def test_guidance_conflicts(fields, message):
    with raises(message):
        DiffusionGenerationConfig(guidance={}, **fields)


def test_guidance_round_trips_through_generation_config_json(tmp_path):
    config = DiffusionGenerationConfig(guidance={"strategy": "speculative", "assistant_model_id": "org/guide"})
    config.save_pretrained(tmp_path)
    loaded = DiffusionGenerationConfig.from_pretrained(tmp_path)
    assert loaded.guidance == {"strategy": "speculative", "assistant_model_id": "org/guide"}


# ---------------------------------------------------------------------------------------------------- rules
def test_acceptance_rules_on_hand_made_logits():
    vocab = 6
    logits = torch.full((1, 4, vocab), -5.0)
    logits[0, 0, 4] = 3.0  # argmax 4, clear winner
    logits[0, 1, [1, 2]] = torch.tensor([2.0, 2.0 - 0.5])  # runner-up 2 with p2/p1 = e^-0.5 = 0.61
    logits[0, 2, [1, 2]] = torch.tensor([2.0, 2.0 - 1.0])  # runner-up 2 with p2/p1 = e^-1 = 0.37
    logits[0, 3, [0, 1, 2]] = torch.tensor([2.0, 1.9, 1.8])  # 2 is third
    drafts = torch.tensor([[4, 2, 2, 2]])
    guide = SimpleNamespace(strategy="deterministic", top_k=2, relative_threshold=0.5,
                            hidden_ids=torch.tensor([], dtype=torch.long))
    accepted, greedy = ARGuide._accepts(guide, logits, drafts)
    assert accepted.tolist() == [[True, False, False, False]] and greedy.tolist() == [[4, 1, 1, 0]]
    guide.strategy = "topk_relative"
    accepted, _ = ARGuide._accepts(guide, logits, drafts)
    assert accepted.tolist() == [[True, True, False, False]]  # in the top 2 and >= 0.5 x top; else rejected
    # a draft outside the guide's vocabulary (a dLLM-only token) is never accepted
    accepted, _ = ARGuide._accepts(guide, logits, torch.tensor([[9, 9, 9, 9]]))
    assert not accepted.any()
    # the mask / dLLM-only ids are never the guide's token, nor accepted, even where the guide's argmax is one
    guide.strategy, guide.hidden_ids = "deterministic", torch.tensor([4])
    accepted, greedy = ARGuide._accepts(guide, logits, drafts)
    assert not accepted[0, 0] and greedy[0, 0] != 4


class ScriptedGuide(torch.nn.Module):
    """A causal LM with hand-made logits: after canvas position j it predicts `script[row, j + 1]` (logit 10, all
    others -10). It stores one zero key per position in the cache it is given, like a real model, so the guide's
    cache bookkeeping runs as usual, and records the positions of every forward."""

    def __init__(self, script: torch.Tensor, vocab: int = 16):
        super().__init__()
        self.config = Qwen2Config(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                  num_key_value_heads=1, intermediate_size=8)
        self.head = torch.nn.Linear(1, vocab)
        self.script = script
        self.calls: list[tuple[int, int]] = []

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        batch, n = input_ids.shape
        past = past_key_values.get_seq_length()
        past_key_values.update(torch.zeros(batch, 1, n, 1), torch.zeros(batch, 1, n, 1), 0)
        self.calls.append((past, n))
        following = (torch.arange(past, past + n) + 1).clamp_max(self.script.shape[1] - 1)
        logits = torch.full((batch, n, self.config.vocab_size), -10.0)
        logits.scatter_(-1, self.script[:, following][..., None], 10.0)
        return SimpleNamespace(logits=logits)


def scripted_step(proposals, script_tail, strategy="deterministic", chunk=32, prompt=(5, 6, 7)):
    """One guided step on a canvas of `prompt` + masks, where the guide's greedy continuation is `script_tail`."""
    proposals = torch.tensor(proposals)
    batch, width = proposals.shape
    prompt_t = torch.tensor(prompt).expand(batch, -1)
    canvas = torch.cat([prompt_t, torch.full((batch, width), MASK)], 1)
    script = torch.cat([prompt_t, torch.tensor(script_tail)], 1)
    model = ScriptedGuide(script)
    guide = ARGuide(model, {**GUIDANCE_DEFAULTS, "strategy": strategy, "verify_chunk": chunk}, canvas, None, MASK,
                    torch.tensor([EOS]), [])
    commit, tokens = guide.select(canvas, proposals, torch.ones_like(proposals, dtype=torch.bool), len(prompt))
    committed = [tokens[row][commit[row]].tolist() for row in range(batch)]
    return committed, model.calls


def test_all_accepted_in_one_chunk():
    committed, calls = scripted_step([[8, 9, 10, 11]], [[8, 9, 10, 11]])
    assert committed == [[8, 9, 10, 11]]
    assert calls == [(0, 6)]  # one forward: the prompt and the drafts but the last (its logits check nothing)


def test_first_proposal_rejected():
    committed, calls = scripted_step([[8, 9, 10, 11]], [[12, 9, 10, 11]])
    assert committed == [[8]]  # the dLLM's first proposal is committed anyway
    committed, _ = scripted_step([[8, 9, 10, 11]], [[12, 9, 10, 11]], strategy="speculative")
    assert committed == [[12]]  # the guide's token replaces it


def test_chunks_stop_at_the_first_rejection():
    drafts = [[8, 9, 10, 11, 12, 13, 14, 15, 8, 9]]
    committed, calls = scripted_step(drafts, drafts, chunk=4)
    assert committed == drafts and len(calls) == 3  # 4 + 4 + 2 proposals, each chunk after a full acceptance
    script = [[8, 9, 10, 11, 12, 5, 14, 15, 8, 9]]
    committed, calls = scripted_step(drafts, script, chunk=4)
    assert committed == [[8, 9, 10, 11, 12]] and len(calls) == 2  # rejection in the second chunk: no third
    committed, _ = scripted_step(drafts, script, chunk=4, strategy="speculative")
    assert committed == [[8, 9, 10, 11, 12, 5]]
    committed, calls = scripted_step(drafts, [[8, 9, 4, 11, 12, 13, 14, 15, 8, 9]], chunk=4)
    assert committed == [[8, 9]] and len(calls) == 1


def test_a_proposal_outside_the_guides_vocabulary_is_rejected():
    # ScriptedGuide's vocabulary has 16 ids; the dLLM proposes id 20 (one only it knows), which the guide reads as a
    # filler token. The guide happens to predict that filler (EOS), yet the proposal must not be accepted.
    committed, _ = scripted_step([[8, 20, 10]], [[8, EOS, 10]])
    assert committed == [[8]]


def test_a_committed_eos_ends_the_row():
    committed, _ = scripted_step([[8, 9, EOS, 11, 12]], [[8, 9, EOS, 11, 12]])
    assert committed == [[8, 9, EOS]]
    committed, _ = scripted_step([[8, 9, 10, 11, 12]], [[8, EOS, 10, 11, 12]], strategy="speculative")
    assert committed == [[8, EOS]]


def test_each_row_accepts_its_own_prefix():
    drafts = [[8, 9, 10, 11], [8, 9, 10, 11], [8, 9, 10, 11]]
    script = [[8, 9, 10, 11], [8, 9, 4, 11], [4, 9, 10, 11]]
    committed, calls = scripted_step(drafts, script, chunk=2)
    assert committed == [[8, 9, 10, 11], [8, 9], [8]]
    assert len(calls) == 2  # the second chunk runs for the first row only (the batch runs it together)


# ---------------------------------------------------------------------------------------------------- real models
@pytest.fixture(scope="module")
def tokenizer(chain_arith_tokenizer):
    return chain_arith_tokenizer  # the session's shared models (conftest): tests here must not modify them


@pytest.fixture(scope="module")
def guide(ar_chain_arith):
    return ar_chain_arith


@pytest.fixture(scope="module", params=["dream", "llada"])
def dllm(request):
    return request.getfixturevalue(f"{request.param}_chain_arith")


PROBLEMS = dev_split()[:8]


def prompts(tokenizer, problems):
    chats = [[{"role": "user", "content": p.question}] for p in problems]
    return tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                         return_dict=True)


def up_to_eos(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


def test_the_guide_cache_after_partial_acceptance_equals_a_fresh_forward(tokenizer, guide):
    inputs = prompts(tokenizer, PROBLEMS[:2])
    prompt_len = inputs.input_ids.shape[1]
    greedy = guide.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, prompt_len:]
    proposals = greedy.clone()
    proposals[0, 7] = (proposals[0, 7] + 1) % 300 + 4  # row 0: 7 accepted; row 1: 3 accepted
    proposals[1, 3] = (proposals[1, 3] + 1) % 300 + 4
    canvas = torch.cat([inputs.input_ids, torch.full((2, 12), MASK)], 1)
    padding = torch.cat([inputs.attention_mask, torch.ones(2, 12, dtype=torch.long)], 1)
    ar_guide = ARGuide(guide, dict(GUIDANCE_DEFAULTS), canvas, padding, MASK, torch.tensor([EOS]), [])
    commit, tokens = ar_guide.select(canvas, proposals, torch.ones_like(proposals, dtype=torch.bool), prompt_len)
    assert commit.sum(-1).tolist() == [7, 3]
    canvas[:, prompt_len:] = torch.where(commit, tokens, canvas[:, prompt_len:])
    first_mask = (canvas == MASK).long().argmax(-1)
    keep = ar_guide._sync_cache(canvas, first_mask)
    assert keep == prompt_len + 3 - 1 == ar_guide.cache.get_seq_length()
    end = int(first_mask.max())
    positions = ar_guide.position_ids
    cached = guide(input_ids=canvas[:, keep:end], attention_mask=padding[:, :end], position_ids=positions[:, keep:end],
                   **{ar_guide.cache_argument: ar_guide.cache}).logits
    fresh = guide(input_ids=canvas[:, :end], attention_mask=padding[:, :end], position_ids=positions[:, :end]).logits
    for row in range(2):
        last = int(first_mask[row]) - 1  # the logits that verify the row's next proposal
        torch.testing.assert_close(cached[row, last - keep], fresh[row, last], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [None, "dual", "freecache"])
def test_speculative_output_equals_the_guides_greedy_output(tokenizer, guide, dllm, cache):
    inputs = prompts(tokenizer, PROBLEMS[:4])  # left-padded batch
    prompt_len = inputs.input_ids.shape[1]
    expected = guide.generate(**inputs, max_new_tokens=256, do_sample=False, pad_token_id=0)[:, prompt_len:]
    out = dllm.diffusion_generate(**inputs, assistant_model=guide, guidance={"strategy": "speculative"},
                                  cache_implementation=cache, return_dict_in_generate=True)
    got = out.sequences[:, prompt_len:]
    assert [up_to_eos(row) for row in got] == [up_to_eos(row) for row in expected]
    assert MASK not in got.tolist()


@pytest.mark.slow
def test_guided_rows_equal_their_solo_runs(tokenizer, guide, dllm):
    inputs = prompts(tokenizer, PROBLEMS[:4])
    prompt_len = inputs.input_ids.shape[1]
    batched = dllm.diffusion_generate(**inputs, assistant_model=guide)[:, prompt_len:]
    for row, problem in enumerate(PROBLEMS[:4]):
        solo_inputs = prompts(tokenizer, [problem])
        solo = dllm.diffusion_generate(**solo_inputs, assistant_model=guide)[:, solo_inputs.input_ids.shape[1]:]
        assert up_to_eos(batched[row]) == up_to_eos(solo[0])


@pytest.mark.slow
@pytest.mark.parametrize("guidance, cache", [
    ({"strategy": "deterministic"}, None),
    ({"strategy": "topk_relative"}, "prefix"),
    ({"strategy": "deterministic"}, "d2cache"),
    ({"strategy": "deterministic"}, "dllm"),
])
def test_guided_decoding_solves_problems_in_few_forwards(tokenizer, guide, dllm, guidance, cache):
    inputs = prompts(tokenizer, PROBLEMS)
    prompt_len = inputs.input_ids.shape[1]
    cache_config = {"certainty_prior": False} if cache == "d2cache" else None
    out = dllm.diffusion_generate(**inputs, assistant_model=guide, guidance=guidance, cache_implementation=cache,
                                  cache_config=cache_config, return_dict_in_generate=True)
    completions = tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True)
    assert sum(is_correct(c, p) for c, p in zip(completions, PROBLEMS)) >= 7
    assert out.nfe <= 16 and out.assistant_forwards >= out.nfe  # vanilla needs 64 forwards for these problems
    assert MASK not in out.sequences.tolist()


@pytest.mark.slow
def test_the_guide_is_loaded_from_assistant_model_id(tokenizer, guide, dllm, monkeypatch):
    inputs = prompts(tokenizer, PROBLEMS[:2])
    passed = dllm.diffusion_generate(**inputs, assistant_model=guide)
    config = DiffusionGenerationConfig(guidance={"assistant_model_id": str(CARDS / "tiny-ar-chain-arith")})
    loaded = dllm.diffusion_generate(**inputs, generation_config=config)
    assert torch.equal(passed, loaded)
    assert dllm.__dict__["_dlm_loaded_guide"][1] is not guide  # loaded once and kept
    again = dllm.diffusion_generate(**inputs, generation_config=config)
    assert torch.equal(again, loaded)
    beside = DiffusionGenerationConfig(guidance={"assistant_model_id": "../tiny-ar-chain-arith"})  # from its folder
    assert torch.equal(dllm.diffusion_generate(**inputs, generation_config=beside), passed)


def test_guidance_without_a_guide_says_how_to_pass_one(tokenizer, dllm):
    with raises(r"guidance needs an autoregressive guide: pass assistant_model=AutoModelForCausalLM"):
        dllm.diffusion_generate(**prompts(tokenizer, PROBLEMS[:1]), guidance={"strategy": "deterministic"})


def test_guidance_refuses_threshold_from_the_call(tokenizer, guide, dllm):
    with raises(r"threshold=0.9 cannot be combined with guidance"):
        dllm.diffusion_generate(**prompts(tokenizer, PROBLEMS[:1]), assistant_model=guide, threshold=0.9,
                                alg="low_confidence")


@pytest.mark.slow
def test_guidance_drops_what_it_replaces_when_only_the_models_config_sets_it(tokenizer, guide, dllm):
    """A model that ships a threshold (or sampling) configuration still runs guided: the inherited threshold, factor,
    temperature and alg='confidence_threshold' give way to the guide, and the output is the guided output without
    them. Passed explicitly they still raise (test above)."""
    inputs = prompts(tokenizer, PROBLEMS[:2])
    plain = dllm.diffusion_generate(**inputs, assistant_model=guide, cache_implementation="dual")
    shipped = dllm.generation_config
    try:
        for fields in ({"alg": "low_confidence", "threshold": 0.9}, {"alg": "low_confidence", "factor": 1.0},
                       {"alg": "confidence_threshold"},
                       {"do_sample": True, "temperature": 0.7}):
            dllm.generation_config = DiffusionGenerationConfig(**{**shipped.to_diff_dict(), "threshold": None,
                                                                  **fields, "cache_implementation": "dual"})
            assert torch.equal(dllm.diffusion_generate(**inputs, assistant_model=guide), plain), fields
            by_config = DiffusionGenerationConfig(guidance={"strategy": "deterministic"})
            assert torch.equal(dllm.diffusion_generate(**inputs, assistant_model=guide, generation_config=by_config),
                               plain), fields
            if "threshold" in fields or "factor" in fields:  # without a guide the inherited policy still applies
                one_per_step = dllm.diffusion_generate(**inputs, alg="low_confidence", threshold=None, factor=None,
                                                       return_dict_in_generate=True).nfe
                assert dllm.diffusion_generate(**inputs, return_dict_in_generate=True).nfe < one_per_step
    finally:
        dllm.generation_config = shipped


# ---------------------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_check_allows_the_dllms_extra_special_tokens(tokenizer):
    dllm_tokenizer = AutoTokenizer.from_pretrained(CARDS / "tiny-chain-arith-tokenizer")
    dllm_tokenizer.add_special_tokens({"additional_special_tokens": ["<|beginoftext|>"]})  # Dream's extra bos
    assert check_shared_vocabulary(dllm_tokenizer, tokenizer) == [len(tokenizer)]


def test_vocabulary_check_names_the_first_mismatching_ids(tokenizer):
    dllm_tokenizer = AutoTokenizer.from_pretrained(CARDS / "tiny-chain-arith-tokenizer")
    dllm_tokenizer.add_tokens(["zebra"])  # an ordinary token the guide does not have
    with raises(rf"differs from the diffusion model's at 1 id\(s\), first: id {len(tokenizer)}: diffusion model "
                r"'zebra', guide None\. .* Text is never re-encoded"):
        check_shared_vocabulary(dllm_tokenizer, tokenizer)


def test_a_guide_from_another_tokenizer_is_refused(tokenizer, guide, dllm):
    other = AutoTokenizer.from_pretrained(CARDS / "tiny-random-llada")
    dllm.__dict__.pop("_dlm_checked_guides", None)
    try:
        with raises(r"The guide's vocabulary differs from the diffusion model's at \d+ id\(s\), first: id \d+"):
            dllm.diffusion_generate(**prompts(tokenizer, PROBLEMS[:1]), assistant_model=guide,
                                    assistant_tokenizer=other)
    finally:
        dllm.__dict__.pop("_dlm_checked_guides", None)


def test_hidden_ids_are_not_attended_by_the_guide(tokenizer, guide):
    canvas = torch.tensor([[5, 310, 6, MASK, MASK]])
    ar_guide = ARGuide(guide, dict(GUIDANCE_DEFAULTS), canvas, None, MASK, torch.tensor([EOS]), [310])
    assert ar_guide.attention_mask.tolist() == [[1, 0, 1, 1, 1]]
    assert ar_guide.position_ids.tolist() == [[0, 0, 1, 2, 3]]
