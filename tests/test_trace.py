"""Commit traces (`output_commit_steps`), streamers (`put_draft`, `CanvasStreamer`) and the trace pictures."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch
from transformers import TextDiffusionStreamer, TextIteratorStreamer, TextStreamer

import dlm_generation  # noqa: F401
from dlm_generation import CanvasStreamer
from dlm_generation.tasks.chain_arith import dev_split
from dlm_generation.visualize import (commit_steps_from_history, plot_commit_trace, render_commit_trace, step_color,
                                      token_labels, trace_of)

MASK = 3
CONFIGS = {
    "vanilla": dict(),
    "threshold": dict(threshold=0.9, alg="maskgit_plus"),
    "dual": dict(threshold=0.9, alg="maskgit_plus", cache_implementation="dual"),
    "d2cache": dict(cache_implementation="d2cache"),
    "two-per-step": dict(steps=32),
}


@pytest.fixture(scope="module")
def tokenizer(chain_arith_tokenizer):
    return chain_arith_tokenizer  # shared (conftest): left padding


@pytest.fixture(scope="module", params=["dream", "llada"])
def model(request):
    return request.getfixturevalue(f"{request.param}_chain_arith")  # shared (conftest): must not be modified


@pytest.fixture(scope="module")
def inputs(tokenizer):
    chats = [[{"role": "user", "content": p.question}] for p in dev_split()[:3]]
    return tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                         return_dict=True)


def generate(model, inputs, **kwargs):
    # one token per step at block 32 unless the test says otherwise (not the shipped threshold + dual cache)
    settings = {**dict(max_new_tokens=64, block_length=32, threshold=None, cache_implementation=None), **kwargs}
    return model.diffusion_generate(**inputs, return_dict_in_generate=True, **settings)


# One token per step (64 forwards) or 32 steps: the slow tier; the threshold configurations stay in the fast one.
SLOW_CONFIGS = {"vanilla", "d2cache", "two-per-step"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CONFIGS else n for n in CONFIGS])
def test_commit_steps_match_the_history_and_change_nothing(model, inputs, name):
    plain = generate(model, inputs, **CONFIGS[name])
    traced = generate(model, inputs, output_commit_steps=True, output_history=True, **CONFIGS[name])
    assert torch.equal(plain.sequences, traced.sequences) and plain.nfe == traced.nfe
    steps = traced.commit_steps
    assert steps.shape == (3, 64) and steps.dtype == torch.long
    assert torch.equal(steps, commit_steps_from_history(traced.history, 64, MASK))
    assert int(steps.min()) >= 1 and int(steps.max()) <= traced.nfe  # every position settled, within the forwards
    # Blocks are decoded in order: nothing in block 2 settles before block 1 is done (except a stop's padding).
    first, second = steps[:, :32], steps[:, 32:]
    committed_second = traced.sequences[:, -32:] != model.generation_config.pad_token_id
    assert bool((second[committed_second] > first.max(-1).values[:, None].expand_as(second)[committed_second]).all())


@pytest.mark.slow
def test_one_token_per_step_commits_each_step_once(model, inputs):
    out = generate(model, inputs, output_commit_steps=True, eos_early_stop=False)
    for row in out.commit_steps:
        assert sorted(row.tolist()) == list(range(1, 65))


def test_commit_steps_is_validated():
    with pytest.raises(ValueError, match="output_commit_steps must be True or False"):
        dlm_generation.DiffusionGenerationConfig(output_commit_steps="yes")


# ---------------------------------------------------------------------------------------------------- streamers
class RecordingDiffusionStreamer(TextDiffusionStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.events = []

    def put_draft(self, value, **kwargs):
        self.events.append(("draft", value.clone()))

    def put(self, value):
        self.events.append(("put", value.clone()))
        super().put(value)

    def on_finalized_text(self, text, stream_end=False):
        self.text = getattr(self, "text", "") + text


@pytest.mark.slow
def test_text_diffusion_streamer_gets_the_draft_after_the_settled_text(model, inputs, tokenizer):
    one = {k: v[:1] for k, v in inputs.items()}
    prompt_len = one["input_ids"].shape[1]
    streamer = RecordingDiffusionStreamer(tokenizer)
    out = generate(model, one, streamer=streamer, output_history=True)
    kind, prompt = streamer.events[0]
    assert kind == "put" and torch.equal(prompt, one["input_ids"])
    drafts = [value for kind, value in streamer.events if kind == "draft"]
    assert len(drafts) == out.nfe == len(out.history)
    settled = prompt_len
    step = 0
    for kind, value in streamer.events[1:]:
        if kind == "put":  # a newly settled run: the canvas right after what was settled before
            assert torch.equal(value, out.history[step][0, settled:settled + value.numel()])
            settled += value.numel()
        else:  # the draft: the rest of the canvas, masks included, without the settled text (as transformers does)
            assert torch.equal(value, out.history[step][:, settled:])
            step += 1
    assert bool((drafts[0] == MASK).any())
    assert streamer.text.strip() == tokenizer.decode(out.sequences[0, prompt_len:]).strip()


@pytest.mark.slow
def test_iterator_streamer_yields_the_completion(model, inputs, tokenizer):
    one = {k: v[:1] for k, v in inputs.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=generate(model, one, streamer=streamer)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    expected = tokenizer.decode(result["out"].sequences[0, one["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip() == expected.strip() and "####" in text


def test_one_row_streamers_refuse_a_batch(model, inputs, tokenizer):
    with pytest.raises(ValueError, match="shows one sequence, but this call decodes 3 rows.*CanvasStreamer"):
        generate(model, inputs, streamer=TextStreamer(tokenizer))
    with pytest.raises(ValueError, match="decodes 2 rows"):
        generate(model, {k: v[:1] for k, v in inputs.items()}, streamer=TextStreamer(tokenizer),
                 num_return_sequences=2, temperature=0.5, do_sample=True)


@pytest.mark.parametrize("name", [pytest.param("vanilla", marks=pytest.mark.slow), "dual"])
def test_canvas_streamer_sees_every_row_at_every_step(model, inputs, name):
    streamer = CanvasStreamer(mask_token_id=MASK, keep_frames=True)
    out = generate(model, inputs, streamer=streamer, output_commit_steps=True, **CONFIGS[name])
    frames = list(streamer)
    assert [f.step for f in frames] == list(range(1, out.nfe + 1)) and frames == streamer.frames
    assert torch.equal(streamer.prompt, inputs["input_ids"])
    assert torch.equal(frames[-1].tokens, out.sequences[:, -64:])
    assert torch.equal(frames[-1].commit_steps, out.commit_steps)
    masked = [int(f.masked(MASK).sum()) for f in frames]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    assert all(b.seconds >= a.seconds for a, b in zip(frames, frames[1:]))


def test_canvas_streamer_hands_a_failure_to_the_reader():
    streamer = CanvasStreamer(mask_token_id=MASK, timeout=5)
    streamer.put(torch.tensor([[5, 6]]))
    streamer.put_draft(torch.tensor([[MASK, 7]]))
    streamer.close(RuntimeError("the decoding thread failed"))
    assert next(streamer).step == 1
    with pytest.raises(RuntimeError, match="decoding thread failed"):
        next(streamer)
    with pytest.raises(RuntimeError, match="decoding thread failed"):  # and keeps saying so
        next(streamer)


def test_canvas_streamer_waits_a_bounded_time():
    with pytest.raises(TimeoutError, match="no canvas frame within 0.05 s"):
        next(CanvasStreamer(mask_token_id=MASK, timeout=0.05))
    with pytest.raises(ValueError, match="mask_token_id must be a non-negative token id"):
        CanvasStreamer(mask_token_id=None)


@pytest.mark.slow
# ---------------------------------------------------------------------------------------------------- pictures
def test_plot_compares_configurations_side_by_side(model, inputs, tokenizer, tmp_path):
    outputs = {name: generate(model, inputs, output_commit_steps=True, **CONFIGS[name])
               for name in ("vanilla", "threshold", "dual")}
    path = tmp_path / "trace.png"
    figure = plot_commit_trace(outputs, tokenizer, path=path, title="tiny", block_length=32)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = [a for a in figure.axes if a.get_title(loc="left")]
    assert [a.get_title(loc="left") for a in axes] == [f"{n}: {o.nfe} forward passes"
                                             for n, o in outputs.items()]
    texts = {t.get_text() for t in axes[0].texts}
    assert "####" in "".join(texts) or "␣####" in texts  # the decoded tokens are written in the cells
    two_rows = plot_commit_trace({"vanilla": outputs["vanilla"]}, tokenizer, rows=[0, 2])
    assert len(two_rows.axes[0].get_yticklabels()) == 2


def test_plot_and_trace_errors(tokenizer):
    with pytest.raises(ValueError, match="panels is empty"):
        plot_commit_trace({}, tokenizer)
    with pytest.raises(ValueError, match="output_commit_steps=True"):
        trace_of(dlm_generation.DiffusionGenerateOutput(sequences=torch.zeros(1, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="must have one shape"):
        trace_of((torch.zeros(1, 4), torch.zeros(1, 5)))
    with pytest.raises(ValueError, match="rows \\[7\\] are outside"):
        plot_commit_trace({"x": (torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))}, tokenizer,
                          rows=[7])
    with pytest.raises(ValueError, match="history is empty"):
        commit_steps_from_history([], 4, MASK)


def test_terminal_rendering(tokenizer):
    ids = tokenizer(" 63 - 39 = 24", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    steps = list(range(len(ids), 0, -1))
    coloured = render_commit_trace(torch.tensor([ids]), torch.tensor([steps]), tokenizer)
    assert coloured.count("\033[48;2;") >= len(ids) and "commit step 1" in coloured
    plain = render_commit_trace(torch.tensor([ids]), torch.tensor([steps]), tokenizer, color=False)
    tokens_line, steps_line = plain.splitlines()
    assert "\033" not in plain and tokens_line.split() == token_labels(tokenizer, ids)
    assert [int(s) for s in steps_line.split()] == steps
    half = render_commit_trace(torch.tensor([[ids[0], MASK]]), torch.tensor([[1, 0]]), tokenizer, color=False,
                               mask_token_id=MASK)
    assert half.splitlines()[0].split()[1] == "·"
    assert token_labels(tokenizer, [tokenizer.eos_token_id, tokenizer.pad_token_id]) == ["eos", "pad"]
    assert step_color(1, 10) == (68, 1, 84) and step_color(10, 10) == (253, 231, 37)
    assert re.fullmatch(r"\(\d+, \d+, \d+\)", str(step_color(5, 10)))


@pytest.mark.slow
def test_the_trace_picture_example_runs(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "trace_picture.py"
    out = tmp_path / "trace.png"
    result = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "vanilla (one token per step): " in result.stdout and "threshold 0.9: " in result.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_the_stop_token_stays_visible_when_pad_is_eos(tokenizer):
    """LLaDA and Dream pad with their EOS id: the first EOS is drawn, the padding after it is not."""
    class EosPads:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        pad_token_id = tokenizer.eos_token_id

    eos = tokenizer.eos_token_id
    ids = tokenizer(" 24", add_special_tokens=False)["input_ids"] + [eos, eos, eos]
    text = render_commit_trace(torch.tensor([ids]), torch.tensor([[1] * len(ids)]), EosPads(), color=False)
    assert text.splitlines()[0].split() == token_labels(tokenizer, ids[:-2])
    figure = plot_commit_trace({"x": (torch.tensor([ids]), torch.tensor([[1] * len(ids)]))}, EosPads())
    assert "eos" in {t.get_text() for t in figure.axes[0].texts}
    assert figure.axes[0].get_title(loc="left") == "x: last commit step 1"
    with pytest.raises(ValueError, match="rows is empty"):
        plot_commit_trace({"x": (torch.tensor([ids]), torch.tensor([[1] * len(ids)]))}, tokenizer, rows=[])
    assert render_commit_trace(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long),
                               tokenizer) == ""
