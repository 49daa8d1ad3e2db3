"""`dlm-demo`: a web page that shows a diffusion model decoding, step by step.

    pip install -e ".[demo]"
    dlm-demo                                   # the shipped tiny-llada-chain-arith, offline, http://127.0.0.1:7860
    dlm-demo MODEL --assistant-model AR_MODEL  # any LLaDA / Dream folder or Hub id; AR guidance with a guide

Type a prompt (the model's chat template wraps it when it has one), choose the decoding settings and press
Generate: the canvas fills in as decoding runs, masked positions grey and committed tokens coloured by the forward
pass that committed them (dark blue early, yellow late). "Compare with vanilla" decodes the same prompt one token
per step next to it. Decoding runs at full speed in a worker thread and the page replays its frames at the chosen
pace, so the replay speed never changes the measured tokens/s. Every request decodes with its own streamer and
cache, so concurrent users never see each other's canvas.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generation_utils import generated_lengths
from .loading import load_models
from .streamers import CanvasFrame, CanvasStreamer
from .visualize import step_color, token_labels

REPOSITORY_MODELS = Path(__file__).resolve().parents[2] / "model_cards"
DEFAULT_MODEL = REPOSITORY_MODELS / "tiny-llada-chain-arith"
DEFAULT_GUIDE = REPOSITORY_MODELS / "tiny-ar-chain-arith"
CACHES = ["none", "prefix", "dual", "freecache", "dllm", "d2cache"]
BLOCK_CHOICES = ["whole canvas", "8", "16", "32", "64", "128"]
SCORERS = ["model default", "low_confidence", "maskgit_plus", "topk_margin", "entropy"]
# Chain-arith questions for the shipped models (their chat template adds "Question: " and " What is the result?").
EXAMPLES = [
    "Start with 63. Subtract 39. Add 46.",
    "Start with 8. Add 75. Subtract 19. Add 52. Subtract 90.",
    "Start with 41. Add 17.",
]


@dataclass
class Settings:
    """What the page's controls ask for, turned into `diffusion_generate` keyword arguments."""

    max_new_tokens: int = 256
    block_length: str = "32"
    steps: int = 0
    threshold: float = 0.0
    scorer: str = "model default"
    cache: str = "none"
    eos_early_stop: bool = True
    guidance: bool = False
    notes: list[str] = field(default_factory=list)

    def overrides(self, model_alg: str | None, has_guide: bool, threshold_off: float | None = None) -> dict[str, Any]:
        """The config fields this request sets (everything else stays the model's `generation_config`);
        `threshold_off`: the model's value for no threshold (`diffusion_threshold_off`)."""
        self.notes = []
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens),
            "block_length": None if self.block_length == "whole canvas" else int(self.block_length),
            "steps": int(self.steps) if self.steps else None,
            "eos_early_stop": bool(self.eos_early_stop),
            "cache_implementation": None if self.cache == "none" else self.cache,
            "threshold": threshold_off,
        }
        if self.scorer != "model default":
            kwargs["alg"] = self.scorer
        if self.guidance:
            if not has_guide:
                raise ValueError("AR guidance needs a guide model: start the demo with --assistant-model PATH.")
            kwargs["guidance"] = {"strategy": "deterministic"}
            if self.threshold:
                self.notes.append("the guide's acceptance replaces the threshold, so the threshold is unused")
            return kwargs
        if self.threshold:
            kwargs["threshold"] = float(self.threshold)
            if kwargs.get("alg", model_alg) == "entropy":
                kwargs["alg"] = "maskgit_plus"
                self.notes.append("a threshold compares probabilities, so the scorer is maskgit_plus instead of the "
                                  "model's entropy")
        return kwargs


def vanilla_overrides(settings: Settings, threshold_off: float | None = None) -> dict[str, Any]:
    """One token per step with the same length, blocks and early stop: the reference the comparison runs."""
    return {"max_new_tokens": int(settings.max_new_tokens),
            "block_length": None if settings.block_length == "whole canvas" else int(settings.block_length),
            "steps": None, "threshold": threshold_off, "eos_early_stop": bool(settings.eos_early_stop),
            "cache_implementation": None}


# ---------------------------------------------------------------------------------------------------- rendering
def render_canvas(frame: CanvasFrame | None, tokenizer, mask_token_id: int, title: str, done: bool = False,
                  row: int = 0, block_length: int | None = None) -> str:
    """HTML of one canvas: committed tokens on their step colour, masks as grey cells, padding left out.

    Colours are scaled to the steps so far, so the latest commits are yellow; a wider gap marks each block start.
    """
    if frame is None:
        body = '<span style="color:#888">waiting for the first forward pass…</span>'
        step, masked = 0, -1
    else:
        tokens = frame.tokens[row].tolist()
        steps = frame.commit_steps[row].tolist()
        last = max(max(steps), 1)
        labels = token_labels(tokenizer, tokens)
        pad = tokenizer.pad_token_id
        cells = []
        for position, (token_id, label, commit) in enumerate(zip(tokens, labels, steps)):
            gap = "8px" if block_length and position and position % block_length == 0 else "1px"
            if token_id == mask_token_id:
                cells.append(f'<span class="dlm-cell dlm-mask" style="display:inline-block;min-width:0.9em;'
                             f'margin:1px 1px 1px {gap};padding:1px 2px;background:#d0d0d0;color:#d0d0d0;'
                             'border-radius:3px">·</span>')
                continue
            if pad is not None and token_id == pad:
                continue
            r, g, b = step_color(commit, last)
            ink = "#fff" if (commit - 1) / max(last - 1, 1) < 0.55 else "#000"
            cells.append(f'<span class="dlm-cell" title="committed at step {commit}" style="display:inline-block;'
                         f'min-width:0.9em;margin:1px 1px 1px {gap};padding:1px 2px;background:rgb({r},{g},{b});'
                         f'color:{ink};border-radius:3px;font-family:monospace">{html.escape(label)}</span>')
        body = "".join(cells)
        step, masked = frame.step, sum(t == mask_token_id for t in tokens)
    state = "done" if done else "decoding"
    return (f'<div class="dlm-canvas" data-title="{html.escape(title)}" data-step="{step}" data-masked="{masked}" '
            f'data-state="{state}" style="line-height:1.9">'
            f'<div style="font-weight:600;margin-bottom:4px">{html.escape(title)} · step {step} · '
            f'{"done" if done else "decoding"}</div>{body}</div>')


def stats_markdown(results: list[dict]) -> str:
    lines = ["| configuration | NFE | tokens | tokens / forward | tokens / s | seconds |", "|---|---|---|---|---|---|"]
    for result in results:
        tokens, nfe, seconds = result["tokens"], result["nfe"], result["seconds"]
        guide = f" (+{result['guide_forwards']} guide)" if result.get("guide_forwards") else ""
        lines.append(f"| {result['label']} | {nfe}{guide} | {tokens} | {tokens / max(nfe, 1):.2f} | "
                     f"{tokens / max(seconds, 1e-9):.1f} | {seconds:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- decoding
class DemoSession:
    """The model, its tokenizer and the optional guide, shared read-only by every request."""

    def __init__(self, model, tokenizer, guide=None, name: str = ""):
        self.model, self.tokenizer, self.guide, self.name = model, tokenizer, guide, name
        mask = model.generation_config.mask_token_id
        self.mask_token_id = int(mask if mask is not None else model.config.mask_token_id)
        self.model_alg = getattr(model.generation_config, "alg", None)
        eos = model.generation_config.eos_token_id
        self.eos_token_id = eos if eos is not None else model.config.eos_token_id

    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        if not prompt or not prompt.strip():
            raise ValueError("The prompt is empty: type a question (for the chain-arith models, one of the examples).")
        if self.tokenizer.chat_template is not None:
            return self.tokenizer.apply_chat_template([[{"role": "user", "content": prompt.strip()}]],
                                                      add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True).to(self.model.device)
        return self.tokenizer([prompt], return_tensors="pt").to(self.model.device)

    def start(self, inputs, jobs: list[tuple[str, dict]], cancelled: threading.Event) -> list[dict]:
        """Decode each job in turn in one worker thread; return the per-job records the page reads. Setting
        `cancelled` (the page went away) stops the running decode at its next step and skips the rest; a failed job
        skips the rest too."""
        records = [{"label": label, "overrides": overrides, "streamer": CanvasStreamer(self.mask_token_id),
                    "output": None, "error": None, "finished": threading.Event()} for label, overrides in jobs]
        stop = [lambda canvas, scores: torch.full((canvas.shape[0],), cancelled.is_set(), dtype=torch.bool)]

        def work():
            failed = None
            for record in records:
                extra = {"assistant_model": self.guide} if record["overrides"].get("guidance") else {}
                began = time.perf_counter()
                try:
                    if failed is not None or cancelled.is_set():
                        raise RuntimeError("not run: an earlier decode of this request failed or was cancelled") \
                            from failed
                    with torch.inference_mode():
                        record["output"] = self.model.diffusion_generate(
                            **inputs, streamer=record["streamer"], return_dict_in_generate=True,
                            output_commit_steps=True, tokenizer=self.tokenizer, stopping_criteria=stop,
                            **record["overrides"], **extra)
                    record["seconds"] = time.perf_counter() - began
                except BaseException as error:  # the page shows it; the next request starts afresh
                    failed = failed or error
                    record["error"] = error
                    record["streamer"].close(error)
                finally:
                    record["finished"].set()  # the streamer ends inside the call, before its output is returned

        threading.Thread(target=work, daemon=True, name="dlm-demo-decode").start()
        return records

    def summary(self, record: dict, prompt_length: int) -> dict:
        out = record["output"]
        generated = out.sequences[:1, prompt_length:]
        end = int(generated_lengths(generated, self.eos_token_id)[0])
        text = self.tokenizer.decode(generated[0, :end], skip_special_tokens=True).strip()
        return {"label": record["label"], "nfe": out.nfe, "tokens": end, "seconds": record["seconds"],
                "guide_forwards": out.assistant_forwards, "text": text}


def decode_stream(session: DemoSession, prompt: str, settings: Settings, compare: bool, replay_ms: float):
    """Yield (main canvas HTML, vanilla canvas HTML, stats markdown, answer text) as decoding proceeds."""
    threshold_off = session.model.diffusion_threshold_off
    overrides = settings.overrides(session.model_alg, session.guide is not None, threshold_off)
    from .configuration_diffusion import DiffusionGenerationConfig

    DiffusionGenerationConfig(**{k: v for k, v in overrides.items() if v is not None})  # config errors before work
    inputs = session.encode(prompt)
    prompt_length = inputs["input_ids"].shape[1]
    jobs = [("this configuration", overrides)] + ([("vanilla", vanilla_overrides(settings, threshold_off))] if compare else [])
    cancelled = threading.Event()
    records = session.start(inputs, jobs, cancelled)
    frames: list[CanvasFrame | None] = [None] * len(records)
    done = [False] * len(records)
    notes = "".join(f"\n\nNote: {note}." for note in settings.notes)

    def canvases():
        shown = [render_canvas(frames[i], session.tokenizer, session.mask_token_id, records[i]["label"], done[i],
                               block_length=records[i]["overrides"].get("block_length"))
                 for i in range(len(records))]
        return shown[0], shown[1] if len(shown) > 1 else ""

    yield *canvases(), "decoding…" + notes, ""
    try:
        while not all(done):
            moved = False
            for index, record in enumerate(records):  # never blocks on a job that has not started yet
                if done[index]:
                    continue
                try:
                    frame = record["streamer"].get(timeout=0)
                except StopIteration:
                    done[index] = moved = True
                    continue
                if frame is not None:
                    frames[index], moved = frame, True
            if not moved:
                time.sleep(0.01)
                continue
            main_html, vanilla_html = canvases()
            yield main_html, vanilla_html, "decoding…" + notes, ""
            if replay_ms > 0:
                time.sleep(replay_ms / 1000)
    finally:  # also when the page goes away mid-stream (the generator is closed): stop decoding
        if not all(done):
            cancelled.set()
    for record in records:
        record["finished"].wait()
        if record["error"] is not None:
            raise record["error"]
    summaries = [session.summary(record, prompt_length) for record in records]
    main_html, vanilla_html = canvases()
    answer = summaries[0]["text"]
    effective = json.dumps({k: v for k, v in overrides.items() if v is not None})
    yield (main_html, vanilla_html, stats_markdown(summaries) + notes + f"\n\nSettings: `{effective}`", answer)


# ---------------------------------------------------------------------------------------------------- the page
def build_demo(session: DemoSession):
    """The Gradio Blocks app for `session` (call `.queue().launch()` on it)."""
    import gradio as gr

    generation = session.model.generation_config
    default_block = str(generation.block_length) if str(generation.block_length) in BLOCK_CHOICES else "whole canvas"
    with gr.Blocks(title="dlm-generation demo", analytics_enabled=False) as demo:
        gr.Markdown(f"## Watch a diffusion LM decode\nModel: `{session.name}` · "
                    f"{sum(p.numel() for p in session.model.parameters()) / 1e6:.1f}M parameters. Masked positions "
                    "are grey; committed tokens are coloured by the forward pass that committed them (dark blue "
                    "first, yellow latest); a gap marks each block. Hover a token for its step.")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], lines=2, scale=4, elem_id="prompt")
            run = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
        gr.Examples(EXAMPLES, inputs=prompt, label="chain-arith questions")
        with gr.Accordion("Decoding settings", open=True):
            with gr.Row():
                max_new_tokens = gr.Slider(16, 1024, value=int(generation.max_new_tokens or 256), step=16,
                                           label="generation length (max_new_tokens)", elem_id="max-new-tokens")
                block_length = gr.Dropdown(BLOCK_CHOICES, value=default_block, label="block length",
                                           elem_id="block-length")
                steps = gr.Number(value=0, precision=0, minimum=0, label="steps (0 = one per token)",
                                  elem_id="steps")
            with gr.Row():
                threshold = gr.Slider(0, 1, value=float(generation.threshold or 0), step=0.05,
                                      label="confidence threshold (0 = off)", elem_id="threshold")
                scorer = gr.Dropdown(SCORERS, value="model default", label="scorer (alg)", elem_id="scorer")
                cache = gr.Dropdown(CACHES, value=generation.cache_implementation or "none", label="cache",
                                    elem_id="cache")
            with gr.Row():
                eos_early_stop = gr.Checkbox(value=True, label="stop at EOS (lossless)", elem_id="eos-early-stop")
                guidance = gr.Checkbox(value=False, label="AR guidance" + ("" if session.guide else
                                                                            " (start with --assistant-model)"),
                                       interactive=session.guide is not None, elem_id="guidance")
                compare = gr.Checkbox(value=True, label="compare with vanilla (one token per step)",
                                      elem_id="compare")
                replay_ms = gr.Slider(0, 500, value=25, step=5, label="replay: ms per step (display only)",
                                      elem_id="replay-ms")
        canvas = gr.HTML(render_canvas(None, session.tokenizer, session.mask_token_id, "this configuration"),
                         elem_id="canvas")
        vanilla_canvas = gr.HTML("", elem_id="vanilla-canvas")
        stats = gr.Markdown("", elem_id="stats")
        answer = gr.Textbox(label="Answer (up to the first EOS)", interactive=False, elem_id="answer")

        def on_generate(prompt_text, length, block, step_count, thr, alg, cache_name, early, guided, both, pace):
            settings = Settings(length, block, int(step_count or 0), float(thr), alg, cache_name, early, guided)
            try:
                yield from decode_stream(session, prompt_text, settings, both, float(pace))
            except ValueError as error:  # a bad setting or prompt: say it on the page
                raise gr.Error(str(error), duration=None) from None

        run.click(on_generate, [prompt, max_new_tokens, block_length, steps, threshold, scorer, cache, eos_early_stop,
                                guidance, compare, replay_ms], [canvas, vanilla_canvas, stats, answer],
                  show_progress="hidden")  # the canvas itself shows the progress
    return demo


def offline_theme():
    """Gradio's base theme with system fonts: the page loads no web fonts, so it renders the same offline."""
    import gradio as gr

    return gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["monospace"])


def display_name(model_path: str) -> str:
    """How the page names a model: a local folder by its own name (the page never shows a path of this machine), a
    Hub id as given."""
    path = os.path.expanduser(str(model_path))
    return os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else str(model_path)


def load_session(model_path: str, assistant_model: str | None, device: str, dtype: str | None) -> DemoSession:
    model, tokenizer, guide = load_models(model_path, assistant_model, device, dtype,
                                          option_names={"assistant_model": "--assistant-model"})
    return DemoSession(model, tokenizer, guide, name=display_name(model_path))


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser  # errors as one line, like dlm-generate's

    parser = OneLineParser(prog="dlm-demo", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None,
                        help=f"a LLaDA or Dream folder or Hub id (default: the shipped {DEFAULT_MODEL.name})")
    parser.add_argument("--assistant-model", default=None,
                        help="an autoregressive guide for AR guidance (default with the shipped model: "
                             f"{DEFAULT_GUIDE.name})")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for every one)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--concurrency", type=int, default=4, help="requests decoded at once (default 4)")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        parser.error("the demo needs Gradio: pip install 'dlm-generation[demo]'")
    model_path, guide_path = args.model, args.assistant_model
    if model_path is None:
        if not DEFAULT_MODEL.is_dir():
            parser.error(f"no model given and the shipped {DEFAULT_MODEL.name} is not next to this installation "
                         "(it ships in the repository's model_cards/): pass a model folder or Hub id")
        model_path = str(DEFAULT_MODEL)
        if guide_path is None and DEFAULT_GUIDE.is_dir():
            guide_path = str(DEFAULT_GUIDE)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        session = load_session(model_path, guide_path, args.device, args.dtype)
    except (OSError, ValueError) as error:
        parser.error(f"cannot load {display_name(model_path)!r}: {str(error).splitlines()[0]}")
    demo = build_demo(session)
    demo.queue(default_concurrency_limit=args.concurrency)
    print(f"dlm-demo: {session.name} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    demo.launch(server_name=args.host, server_port=args.port, show_error=True, footer_links=[], theme=offline_theme())
    return 0


if __name__ == "__main__":
    sys.exit(main())
