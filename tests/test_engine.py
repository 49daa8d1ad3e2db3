"""DiffusionEngine: continuous batching whose every request equals its solo diffusion_generate call."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlm_generation.engine import DiffusionEngine, EngineFullError
from dlm_generation.generation_utils import forward_buckets, shared_forward
from dlm_generation.tasks.chain_arith import dev_split, is_correct

PROBLEMS = dev_split(24)
MASK, EOS = 3, 2

# Settings drawn by the property tests: every one a request may carry (the shipped model's own configuration, dual
# cache + threshold at block 8, is the first); each comes with its canvas length.
SETTINGS = [
    dict(max_new_tokens=64, steps=64, block_length=8),  # the model's generation_config: dual cache + threshold 0.9
    dict(max_new_tokens=32, steps=32, block_length=32, cache_implementation=None, threshold=None),  # one per step
    dict(max_new_tokens=48, steps=48, block_length=16, cache_implementation=None, threshold=0.8),
    dict(max_new_tokens=64, steps=64, block_length=32, cache_implementation=None, threshold=None, factor=1.0),
    dict(max_new_tokens=64, steps=64, block_length=16, cache_implementation="prefix", threshold=0.9),
    dict(max_new_tokens=40, steps=40, block_length=8, cache_implementation="dual", threshold=0.7),
    dict(max_new_tokens=32, steps=16, block_length=16, cache_implementation=None, threshold=None),  # 2 per step
    dict(max_new_tokens=48, steps=48, block_length=16, cache_implementation="dllm"),  # a forward of its own
]


def prompt_ids(tokenizer, problem) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": problem.question}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


def solo(model, ids, settings_):
    out = model.diffusion_generate(torch.tensor([ids]), return_dict_in_generate=True, output_commit_steps=True,
                                   **settings_)
    generated = out.sequences[0, len(ids):].tolist()
    cut = []
    for token in generated:
        if token in (EOS, MASK):
            break
        cut.append(token)
    return cut, out.nfe, out.commit_steps[0].tolist()


def run_schedule(engine, jobs, arrivals, check=None):
    """Add job i at step arrivals[i]; step until every job finished. Returns {id: final output}, steps taken."""
    final, step = {}, 0
    while len(final) < len(jobs):
        for i, (request_id, ids, settings_) in enumerate(jobs):
            if arrivals[i] == step:
                engine.add_request(request_id, ids, **settings_)
        outputs = engine.step()
        if check is not None:
            check(engine, outputs)
        for output in outputs:
            assert output.error is None, output.error
            if output.finished:
                assert output.request_id not in final
                final[output.request_id] = output
        step += 1
        assert step < 2000, "the engine made no progress"
    assert not engine.has_unfinished_requests()
    return final, step


@pytest.fixture(scope="module", params=["llada", "dream"])
def family(request):
    return request.param, request.getfixturevalue(f"{request.param}_chain_arith")


def check_against_solo(model, jobs, final):
    for request_id, ids, settings_ in jobs:
        tokens, nfe, commit_steps = solo(model, ids, settings_)
        output = final[request_id]
        assert output.token_ids == tokens, (request_id, settings_)
        assert output.nfe == nfe, (request_id, settings_)
        assert output.commit_steps == commit_steps, (request_id, settings_)


def _property(family, chain_arith_tokenizer, data):
    _, model = family
    count = data.draw(st.integers(2, 6), label="requests")
    chosen = data.draw(st.lists(st.sampled_from(range(len(SETTINGS))), min_size=count, max_size=count), label="settings")
    problems = data.draw(st.lists(st.sampled_from(range(len(PROBLEMS))), min_size=count, max_size=count),
                         label="problems")
    arrivals = data.draw(st.lists(st.integers(0, 12), min_size=count, max_size=count), label="arrival steps")
    max_batch = data.draw(st.integers(1, 4), label="max_batch_size")
    jobs = [(f"r{i}", prompt_ids(chain_arith_tokenizer, PROBLEMS[p]), SETTINGS[s])
            for i, (p, s) in enumerate(zip(problems, chosen))]

    def bounded(engine, outputs):
        assert sum(r.rows for r in engine.running) <= max_batch

    final, _ = run_schedule(DiffusionEngine(model, chain_arith_tokenizer, max_batch_size=max_batch), jobs, arrivals,
                            bounded)
    check_against_solo(model, jobs, final)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
@given(data=st.data())
def test_every_request_equals_its_solo_run_under_random_arrivals(family, chain_arith_tokenizer, data):
    _property(family, chain_arith_tokenizer, data)


@pytest.mark.slow
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_request_equals_its_solo_run_under_many_random_arrivals(family, chain_arith_tokenizer, data):
    _property(family, chain_arith_tokenizer, data)


@pytest.mark.slow
def test_all_settings_at_once_share_one_forward_and_stay_exact(family, chain_arith_tokenizer):
    _, model = family
    jobs = [(f"r{i}", prompt_ids(chain_arith_tokenizer, PROBLEMS[i]), s) for i, s in enumerate(SETTINGS)]
    engine = DiffusionEngine(model, chain_arith_tokenizer, max_batch_size=len(SETTINGS))
    final, steps = run_schedule(engine, jobs, [0] * len(jobs))
    check_against_solo(model, jobs, final)
    # dLLM-Cache runs its own forward; the rest share one per bucket of query counts (full canvas, block, ...).
    assert steps <= engine.forwards <= 4 * steps


def test_a_short_request_arriving_later_finishes_first(llada_chain_arith, chain_arith_tokenizer):
    engine = DiffusionEngine(llada_chain_arith, chain_arith_tokenizer, max_batch_size=4)
    long_ids, short_ids = (prompt_ids(chain_arith_tokenizer, p) for p in PROBLEMS[:2])
    engine.add_request("long", long_ids, max_new_tokens=64, steps=64, block_length=32, cache_implementation=None,
                       threshold=None, eos_early_stop=False)
    order = []
    for step in range(400):
        if step == 3:
            engine.add_request("short", short_ids, max_new_tokens=16, steps=16, block_length=16,
                               cache_implementation=None, threshold=None)
        order += [o.request_id for o in engine.step() if o.finished]
        if not engine.has_unfinished_requests():
            break
    assert order == ["short", "long"]


def test_static_scheduling_waits_for_the_whole_batch(llada_chain_arith, chain_arith_tokenizer):
    engine = DiffusionEngine(llada_chain_arith, chain_arith_tokenizer, max_batch_size=4, scheduling="static")
    ids = prompt_ids(chain_arith_tokenizer, PROBLEMS[0])
    engine.add_request("long", ids, max_new_tokens=32, steps=32, cache_implementation=None, threshold=None,
                       eos_early_stop=False)
    engine.step()
    engine.add_request("short", ids, max_new_tokens=8, steps=8, block_length=8)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["long", "short"]
    with pytest.raises(ValueError, match="scheduling"):
        DiffusionEngine(llada_chain_arith, scheduling="dynamic")


def test_streamed_deltas_add_up_to_the_final_output(dream_chain_arith, chain_arith_tokenizer):
    engine = DiffusionEngine(dream_chain_arith, chain_arith_tokenizer)
    engine.add_request("a", prompt_ids(chain_arith_tokenizer, PROBLEMS[3]), max_new_tokens=64, steps=64,
                       block_length=8)
    text, ids, outputs = "", [], []
    while engine.has_unfinished_requests():
        for output in engine.step():
            text += output.new_text
            ids += output.new_token_ids
            outputs.append(output)
    final = outputs[-1]
    assert final.finished and final.finish_reason == "stop" and final.text == text and final.token_ids == ids
    assert len(outputs) == final.nfe and is_correct(final.text, PROBLEMS[3])
    assert all(len(o.canvas) == 64 for o in outputs) and MASK in outputs[0].canvas


def test_abort_frees_the_row_for_the_next_request(llada_chain_arith, chain_arith_tokenizer):
    engine = DiffusionEngine(llada_chain_arith, chain_arith_tokenizer, max_batch_size=1)
    ids = prompt_ids(chain_arith_tokenizer, PROBLEMS[0])
    engine.add_request("first", ids, max_new_tokens=64, steps=64, cache_implementation=None, threshold=None)
    engine.add_request("second", ids, max_new_tokens=64, steps=64, block_length=8)
    assert [o.request_id for o in engine.step()] == ["first"]
    assert engine.abort_request("first") and not engine.abort_request("first")
    outputs = engine.step()
    assert [o.request_id for o in outputs] == ["second"]
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert outputs[-1].finished and outputs[-1].token_ids == solo(llada_chain_arith, ids,
                                                                   dict(max_new_tokens=64, steps=64, block_length=8))[0]
    engine.add_request("first", ids)  # the id is free again


def test_a_waiting_request_can_be_aborted(llada_chain_arith, chain_arith_tokenizer):
    engine = DiffusionEngine(llada_chain_arith, chain_arith_tokenizer, max_batch_size=1)
    ids = prompt_ids(chain_arith_tokenizer, PROBLEMS[0])
    engine.add_request("a", ids)
    engine.add_request("b", ids)
    assert engine.abort_request("b") and engine.get_num_unfinished_requests() == 1


def test_guided_requests_equal_their_solo_runs(llada_chain_arith, ar_chain_arith, chain_arith_tokenizer):
    engine = DiffusionEngine(llada_chain_arith, chain_arith_tokenizer, assistant_model=ar_chain_arith)
    guided = dict(max_new_tokens=64, steps=64, block_length=32, guidance={}, cache_implementation=None,
                  threshold=None)
    plain = SETTINGS[0]
    jobs = [("g0", prompt_ids(chain_arith_tokenizer, PROBLEMS[0]), guided),
            ("p1", prompt_ids(chain_arith_tokenizer, PROBLEMS[1]), plain),
            ("g2", prompt_ids(chain_arith_tokenizer, PROBLEMS[2]), guided)]
    final, _ = run_schedule(engine, jobs, [0, 1, 2])
    for request_id, ids, settings_ in jobs:
        kwargs = dict(settings_)
        model_kwargs = {"assistant_model": ar_chain_arith, "tokenizer": chain_arith_tokenizer} if "guidance" in kwargs \
            else {}
        out = llada_chain_arith.diffusion_generate(torch.tensor([ids]), return_dict_in_generate=True, **kwargs,
                                                   **model_kwargs)
        expected = [t for t in out.sequences[0, len(ids):].tolist()]
        expected = expected[: expected.index(EOS)] if EOS in expected else expected
        assert final[request_id].token_ids == expected and final[request_id].nfe == out.nfe


def test_shared_forward_equals_separate_forwards(llada_chain_arith, chain_arith_tokenizer):
    """The padded shared forward gives each request the logits its own forward gives (to float rounding)."""
    model = llada_chain_arith
    states = []
    for problem, settings_ in zip(PROBLEMS[:3], [SETTINGS[1], SETTINGS[4] | dict(eos_early_stop=False), SETTINGS[0]]):
        config = model._prepare_generation_config(None, dict(settings_))
        ids = torch.tensor([prompt_ids(chain_arith_tokenizer, problem)])
        state, rules = model._start_decoding(ids, None, model._resolve_lengths(config, ids.shape[1]))
        states.append((state, rules, model._next_step(state, rules)))
    for _ in range(2):  # a block's first step (full forward) and a cached one
        entries = [(model._step_inputs(s, r, p), s.cache) for s, r, p in states]
        together = shared_forward(model, entries)
        for (state, rules, planned), logits in zip(states, together):
            alone = model._forward_logits(model._step_inputs(state, rules, planned), state.cache)
            torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
        for (state, rules, planned), logits in zip(states, together):
            model._finish_step(state, rules, planned, logits)
        states = [(s, r, model._next_step(s, r)) for s, r, _ in states]
        assert all(p is not None for _, _, p in states)


def test_forward_buckets_keep_short_steps_apart_from_whole_canvas_ones():
    from dlm_generation.generation_utils import ForwardInputs

    def entry(queries):
        ids = torch.zeros((1, queries), dtype=torch.long)
        return ForwardInputs(ids, ids, None, torch.arange(1), queries), None

    entries = [entry(q) for q in (300, 8, 8, 290, 5, 1, 160)]
    assert forward_buckets(entries) == [[5], [1, 2, 4], [6], [0, 3]]


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def engine(llada_chain_arith, chain_arith_tokenizer):
    return DiffusionEngine(llada_chain_arith, chain_arith_tokenizer, max_batch_size=2, max_queued_requests=1,
                           max_canvas_length=300)


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_length=0), "block_length"),
    (dict(threshold=1.5), "threshold"),
    (dict(cache_implementation="nope"), "cache_implementation"),
    (dict(tempreature=0.5), "tempreature"),
    (dict(max_new_tokens=512, steps=512), "max_canvas_length"),
    (dict(num_return_sequences=2), "one sequence per request"),
    (dict(cfg_scale=1.0, max_new_tokens=64, steps=64), None),  # two rows: fits max_batch_size 2
])
def test_invalid_requests_are_refused_at_add_request(engine, chain_arith_tokenizer, kwargs, message):
    ids = prompt_ids(chain_arith_tokenizer, PROBLEMS[0])
    if message is None:
        engine.add_request("ok", ids, **kwargs)
        return
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", ids, **kwargs)
    assert not engine.has_unfinished_requests()
    engine.add_request("bad", ids)  # a refused id is not taken


def test_input_errors(engine, llada_chain_arith):
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        engine.add_request("a", [])
    with pytest.raises(ValueError, match="one prompt"):
        engine.add_request("a", torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("a", [10**6])
    engine.add_request("a", [1, 5, 6])
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request("a", [1, 5, 6])
    engine.add_request("b", [1, 5, 6])  # the second free row
    assert engine.queued_beyond_free_rows() == 0
    engine.add_request("c", [1, 5, 6])  # waits beyond the free rows: the one allowed
    assert engine.queued_beyond_free_rows() == 1
    with pytest.raises(EngineFullError, match="max_queued_requests=1"):
        engine.add_request("d", [1, 5, 6])
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        DiffusionEngine(llada_chain_arith).add_request("s", [1, 5], stop_strings=["."])
    big = DiffusionEngine(llada_chain_arith, max_batch_size=1)
    with pytest.raises(ValueError, match="max_batch_size is 1"):
        big.add_request("cfg", [1, 5, 6], cfg_scale=1.0)
    for bad in (dict(max_batch_size=0), dict(max_queued_requests=-1), dict(max_canvas_length="9")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DiffusionEngine(llada_chain_arith, **bad)
    with pytest.raises(ValueError, match="diffusion LM"):
        DiffusionEngine(torch.nn.Linear(2, 2))


def test_block_diffusion_requests_equal_their_solo_runs():
    """Fast-dLLM v2 requests (block-causal masks, the exact block cache, aligned blocks) through the engine."""
    from pathlib import Path

    from dlm_generation import FastDLLMV2Model

    folder = Path(__file__).parent / "fixtures" / "golden_block_diffusion" / "tiny-fast-dllm-v2"
    model = FastDLLMV2Model.from_pretrained(folder).eval()
    ids = [list(range(10, 15)), list(range(40, 73)), list(range(100, 145))]  # 5, 33 and 45 tokens
    settings_ = dict(max_new_tokens=64, mask_token_id=500, eos_token_id=501, pad_token_id=502)
    jobs = [(f"b{i}", prompt, dict(settings_, threshold=t)) for i, (prompt, t) in enumerate(zip(ids, (0.9, 1.0, 0.5)))]
    final, _ = run_schedule(DiffusionEngine(model, max_batch_size=3), jobs, [0, 1, 3])
    for request_id, prompt, kwargs in jobs:
        out = model.diffusion_generate(torch.tensor([prompt]), return_dict_in_generate=True, **kwargs)
        expected = out.sequences[0, len(prompt):].tolist()
        expected = expected[: expected.index(501)] if 501 in expected else expected
        assert final[request_id].token_ids == expected and final[request_id].nfe == out.nfe, request_id


def test_sdar_requests_equal_their_solo_runs():
    """SDAR requests (no logit shift, stores between blocks, a stop once its block is complete) through the engine."""
    from pathlib import Path

    from dlm_generation import SDARForCausalLM

    folder = Path(__file__).parent / "fixtures" / "golden_sdar" / "tiny-sdar"
    model = SDARForCausalLM.from_pretrained(folder).eval()
    ids = [[7, 8, 9], list(range(40, 53)), list(range(100, 122))]  # 3, 13 and 22 tokens
    settings_ = dict(max_new_tokens=32, mask_token_id=500, eos_token_id=[501, 502], pad_token_id=503)
    extras = ({}, dict(threshold=0.5), dict(block_length=8, steps=16, threshold=0.7))
    jobs = [(f"s{i}", prompt, dict(settings_, **extra)) for i, (prompt, extra) in enumerate(zip(ids, extras))]
    final, _ = run_schedule(DiffusionEngine(model, max_batch_size=2), jobs, [0, 2, 3])
    for request_id, prompt, kwargs in jobs:
        out = model.diffusion_generate(torch.tensor([prompt]), return_dict_in_generate=True, **kwargs)
        expected = out.sequences[0, len(prompt):].tolist()
        first = next((i for i, t in enumerate(expected) if t in (501, 502)), None)
        expected = expected if first is None else expected[:first]
        assert final[request_id].token_ids == expected and final[request_id].nfe == out.nfe, request_id
