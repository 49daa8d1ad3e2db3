"""Accuracy and speed of decoding configurations on chain-arith, measured side by side in one run.

    python -m dlm_generation.benchmark model_cards/tiny-llada-chain-arith \\
        --ar-model model_cards/tiny-ar-chain-arith --problems 500 --gen-lengths 64 --batch-sizes 50

For every generation length x batch size it runs the named decoding configurations (default: all of
`NAMED_CONFIGS`) on the first `--problems` dev problems and prints one table: accuracy, NFE (model forwards per
generate call), tokens per forward, tokens/s, speedup vs `vanilla` (or `--baseline`; same length and batch size, median wall time of
`--repeats` timed passes), peak memory, and the share of wall time spent outside model forwards (loop overhead).
An autoregressive model (`--ar-model`, through `transformers`' `generate` with its KV cache) is a baseline row and
the guide of the AR-guided configurations (``guided*``); the table then also gives the guide's forwards per call
and the speed relative to the AR model alone ("vs AR"). For guided rows, "overhead" includes the guide's forwards.
It also writes the rows as JSON (`--json`) and a PNG of accuracy against speedup (`--plot`, needs matplotlib).

Every configuration is decoded greedily (temperature 0) with one fixed base: ``steps = gen_length`` (one token per
step unless the configuration commits more), ``block_length = --block-length``, no threshold/factor (Fast-dLLM v2,
whose family default is a threshold: ``threshold=1``, its reference's one token per step), no early stop; the model's own `generation_config.json` is ignored except by the ``model-default`` configuration, which
uses it as shipped (plus ``max_new_tokens``). Generated tokens are counted up to and including the first EOS.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .generation_utils import generated_lengths
from .tasks.chain_arith import ChainArithProblem, accuracy, dev_split

VANILLA = "vanilla"
MODEL_DEFAULT = "model-default"
AR_BASELINE = "ar-kv-cache"
NAMED_CONFIGS: dict[str, dict] = {
    VANILLA: {},
    "vanilla+eos": {"eos_early_stop": True},
    "threshold-0.7": {"alg": "low_confidence", "threshold": 0.7},
    "threshold-0.8": {"alg": "low_confidence", "threshold": 0.8},
    "threshold-0.9": {"alg": "low_confidence", "threshold": 0.9},
    "threshold-0.9+eos": {"alg": "low_confidence", "threshold": 0.9, "eos_early_stop": True},
    "factor-1.0": {"alg": "low_confidence", "factor": 1.0},
    "factor-1.0+eos": {"alg": "low_confidence", "factor": 1.0, "eos_early_stop": True},
}
THRESHOLD_EOS = {"alg": "low_confidence", "threshold": 0.9, "eos_early_stop": True}
for _cache in ("prefix", "dual", "freecache"):  # each cache alone, with threshold 0.9, and with early stop too
    NAMED_CONFIGS[_cache] = {"cache_implementation": _cache}
    NAMED_CONFIGS[f"{_cache}+threshold-0.9"] = {"cache_implementation": _cache, "alg": "low_confidence",
                                                 "threshold": 0.9}
    NAMED_CONFIGS[f"{_cache}+threshold-0.9+eos"] = {"cache_implementation": _cache, **THRESHOLD_EOS}
# FreeCache with a right window too (FlashDLM's GSM8K setting uses 256/256): forwards that never cover the far
# masked suffix, so their cost does not grow with the canvas.
NAMED_CONFIGS["freecache-64+threshold-0.9+eos"] = {"cache_implementation": "freecache",
                                                   "cache_config": {"window_left": 64, "window_right": 64},
                                                   **THRESHOLD_EOS}
# The adaptive caches: dLLM-Cache with its defaults; d2Cache as its paper decodes (one block, certainty prior) and
# as a cache under Fast-dLLM's threshold decoding (semi-AR blocks, plain confidence).
NAMED_CONFIGS["dllm"] = {"cache_implementation": "dllm"}
NAMED_CONFIGS["dllm+threshold-0.9+eos"] = {"cache_implementation": "dllm", **THRESHOLD_EOS}
NAMED_CONFIGS["d2cache"] = {"cache_implementation": "d2cache", "block_length": None, "alg": "low_confidence"}
NAMED_CONFIGS["d2cache+eos"] = {**NAMED_CONFIGS["d2cache"], "eos_early_stop": True}
NAMED_CONFIGS["d2cache+threshold-0.9+eos"] = {"cache_implementation": "d2cache",
                                              "cache_config": {"certainty_prior": False}, **THRESHOLD_EOS}
# Issue 25: accuracy-keeping parallel decoding and flat cost on long canvases, alone and combined with the dual cache:
# PC-Sampler's position decay, EB-Sampler's entropy bound, Elastic-Cache, DPad's suffix window.
_DUAL_THRESHOLD_EOS = {"cache_implementation": "dual", **THRESHOLD_EOS}
NAMED_CONFIGS["dual+threshold-0.9+pd-0.03+eos"] = {**_DUAL_THRESHOLD_EOS, "position_decay": 0.03}
NAMED_CONFIGS["dual+eb-0.1+eos"] = {"cache_implementation": "dual", "entropy_bound": 0.1, "eos_early_stop": True}
NAMED_CONFIGS["elastic+threshold-0.9+eos"] = {"cache_implementation": "elastic", **THRESHOLD_EOS}
NAMED_CONFIGS["dual+threshold-0.9+dpad-32+eos"] = {**_DUAL_THRESHOLD_EOS, "suffix_window": 32}
NAMED_CONFIGS["dual+threshold-0.9+pd-0.03+dpad-32+eos"] = {**_DUAL_THRESHOLD_EOS, "position_decay": 0.03,
                                                           "suffix_window": 32}
NAMED_CONFIGS["elastic+threshold-0.9+pd-0.03+dpad-32+eos"] = {"cache_implementation": "elastic", **THRESHOLD_EOS,
                                                              "position_decay": 0.03, "suffix_window": 32}
# AR-guided diffusion (FlashDLM) with the --ar-model as the guide: the whole canvas as one window (FlashDLM's
# setting), within Fast-dLLM's blocks, lossless (speculative), and with the caches FlashDLM pairs it with.
GUIDED = {"guidance": {"strategy": "deterministic"}, "block_length": None}
NAMED_CONFIGS["guided"] = GUIDED
NAMED_CONFIGS["guided+blocks"] = {"guidance": {"strategy": "deterministic"}}
NAMED_CONFIGS["guided-topk"] = {**GUIDED, "guidance": {"strategy": "topk_relative"}}
NAMED_CONFIGS["guided-speculative"] = {**GUIDED, "guidance": {"strategy": "speculative"}}
NAMED_CONFIGS["guided+freecache"] = {**GUIDED, "cache_implementation": "freecache"}
NAMED_CONFIGS["guided+dual"] = {"guidance": {"strategy": "deterministic"}, "cache_implementation": "dual"}
# Set by the benchmark itself; a configuration may not override them.
RESERVED_KEYS = {"input_ids", "attention_mask", "max_new_tokens", "return_dict_in_generate", "generation_config",
                 "assistant_model"}
# Every diffusion configuration starts from this base (None = the model family's default, e.g. Dream's entropy).
# Vanilla is one token per step for every family, so the schedule is "linear": Dream's reference "eps" schedule
# commits no token at a block's first step and two at its last (pass `NAME:schedule=eps` to measure it).
# cache_implementation None: no cache, whatever the model's generation_config.json ships.
# Every field a shipped generation_config.json may set that changes decoding, reset (None: back to the library or
# family default), so that only `model-default` reads the model's own configuration.
BASE_CONFIG = {"alg": None, "schedule": "linear", "threshold": None, "factor": None, "entropy_bound": None,
               "position_decay": None, "suffix_window": None, "cache_implementation": None, "cache_config": None,
               "eos_early_stop": False, "temperature": 0.0}


@dataclass
class Row:
    config: str
    settings: dict
    gen_length: int
    batch_size: int
    problems: int
    accuracy: float
    nfe: float  # model forwards per generate call (mean over calls)
    tokens_per_forward: float  # generated tokens per forward, mean over rows
    tokens_per_second: float
    seconds: float  # median wall time of one pass over all problems
    seconds_all: list[float] = field(default_factory=list)
    speedup: float | None = None
    peak_memory_mib: float | None = None
    loop_overhead: float | None = None  # share of wall time outside model forwards (guided: the guide's included)
    guide_forwards: float | None = None  # the AR guide's forwards per generate call (guided configurations)
    speedup_vs_ar: float | None = None  # wall time of the AR baseline / this row's (with --ar-model)


def parse_config(text: str) -> tuple[str, dict]:
    """`name` (one of NAMED_CONFIGS) or `name:key=value,key=value` (values parsed as JSON, else strings)."""
    if ":" not in text:
        if text in NAMED_CONFIGS or text == MODEL_DEFAULT:
            return text, dict(NAMED_CONFIGS.get(text, {}))
        raise ValueError(
            f"unknown decoding configuration {text!r}; known: {', '.join([*NAMED_CONFIGS, MODEL_DEFAULT])}, "
            "or define one as NAME:key=value,key=value (e.g. 'tau85:alg=low_confidence,threshold=0.85')"
        )
    name, _, body = text.partition(":")
    settings = {}
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"configuration {text!r}: expected key=value items separated by commas, got {item!r}")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value
    if not name:
        raise ValueError(f"configuration {text!r} needs a name before ':'")
    if name in NAMED_CONFIGS or name == MODEL_DEFAULT:
        raise ValueError(f"configuration {text!r} reuses the built-in name {name!r}; give it a name of its own")
    reserved = sorted(RESERVED_KEYS & settings.keys())
    if reserved:
        raise ValueError(f"configuration {text!r} sets {reserved}: the benchmark sets these itself (use"
                         " --gen-lengths for the generation length)")
    return name, settings


class ForwardTimer:
    """Counts a model's forwards and the wall time spent inside them (synchronising CUDA when asked)."""

    def __init__(self, model: torch.nn.Module, sync: bool):
        self.calls, self.seconds, self._start, self._sync = 0, 0.0, 0.0, sync
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, *_):
        if self._sync:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def _post(self, *_):
        if self._sync:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def remove(self):
        for handle in self._handles:
            handle.remove()


class PeakMemory:
    """Peak memory of a pass above the level at its start: CUDA max allocated, or on Linux CPUs the process's peak
    RSS (VmHWM, reset first). Elsewhere (macOS, Windows CPUs) it is not reported."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> float | None:
        """Start a new peak; return the memory in use now (MiB), the baseline the peak is reported above."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        except OSError:
            return None
        return self._status("VmRSS:")

    def read_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._status("VmHWM:")

    @staticmethod
    def _status(field_name: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field_name):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


@dataclass
class Pass:
    """One pass over the problems: completions (cut at the first EOS), per-call stats, time inside generate calls."""

    completions: list[str]
    calls: list[dict]
    seconds: float


def prompt_batches(tokenizer, problems: list[ChainArithProblem], batch_size: int, device):
    """(problems, tokenized prompts on `device`) in batches of `batch_size` (the tokenizer pads on its side)."""
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        yield chunk, tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True).to(device)


def solve(model, tokenizer, problems: list[ChainArithProblem], gen_length: int, batch_size: int,
          settings: dict | None = None, autoregressive: bool = False, sync: bool = False, guide=None,
          progress: str | None = None) -> Pass:
    """Decode `problems` in batches of `batch_size`.

    Diffusion models go through `diffusion_generate(**settings)`; `autoregressive=True` uses `generate` (greedy,
    KV cache) and counts its forwards; `guide` is the AR guide of guided settings; `progress` names a progress bar
    over the batches (on stderr; none when None or for a single batch). Only the generate calls are timed (tokenising and decoding are not), and
    completions are cut at the first EOS before decoding, so text after it is never scored.
    """
    device = next(model.parameters()).device
    completions, calls, seconds = [], [], 0.0
    from tqdm.auto import tqdm

    batches = -(-len(problems) // batch_size)
    bar = tqdm(total=len(problems), desc=progress, unit="problem", file=sys.stderr, leave=False,
               disable=progress is None or batches < 2)
    for chunk, inputs in prompt_batches(tokenizer, problems, batch_size, device):
        prompt_len = inputs.input_ids.shape[1]
        counter = ForwardTimer(model, sync=False) if autoregressive else None
        began = time.perf_counter()
        try:
            if autoregressive:
                sequences = model.generate(**inputs, max_new_tokens=gen_length, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            else:
                extra = {"assistant_model": guide} if (settings or {}).get("guidance") is not None else {}
                out = model.diffusion_generate(inputs.input_ids, attention_mask=inputs.attention_mask,
                                               max_new_tokens=gen_length, return_dict_in_generate=True,
                                               **(settings or {}), **extra)
                sequences = out.sequences
            if sync:
                torch.cuda.synchronize()
        finally:
            seconds += time.perf_counter() - began
            if counter is not None:
                counter.remove()
        nfe = counter.calls if autoregressive else out.nfe
        generated = sequences[:, prompt_len:]
        lengths = generated_lengths(generated, tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(
            [row[:n] for row, n in zip(generated.tolist(), lengths.tolist())], skip_special_tokens=True
        )
        calls.append({"nfe": nfe, "tokens": lengths.tolist(),
                      "guide_forwards": None if autoregressive else out.assistant_forwards})
        bar.update(len(chunk))  # after the batch is decoded
    bar.close()
    return Pass(completions, calls, seconds)


def reference_tokens(tokenizer, problems: list[ChainArithProblem], generated: torch.Tensor) -> torch.Tensor:
    """Per row of `generated`, its problem's tokenized completion then EOS padding, cut to the canvas length."""
    reference = torch.full_like(generated, tokenizer.eos_token_id)
    for row, problem in enumerate(problems):
        ids = tokenizer(problem.completion, add_special_tokens=False).input_ids[: generated.shape[1]]
        reference[row, : len(ids)] = torch.tensor(ids)
    return reference


def calibration(model, tokenizer, problems: list[ChainArithProblem], gen_length: int, batch_size: int,
                settings: dict, bins: int = 10) -> dict:
    """How well the confidences of committed tokens predict that they are right (a reliability diagram).

    Decodes `problems` with `settings` (a confidence-based `alg`, e.g. ``low_confidence`` with a threshold, whose
    scores are probabilities) and takes every committed position up to and including the row's first EOS. A
    position is correct when its token equals the reference's at that position (the tokenized completion, then
    EOS padding). Returns per equal-width confidence bin the token count, mean confidence and share correct, the
    expected calibration error (count-weighted mean |confidence - share correct|), and the totals.
    """
    device = next(model.parameters()).device
    confidence_all, correct_all = [], []
    for chunk, inputs in prompt_batches(tokenizer, problems, batch_size, device):
        out = model.diffusion_generate(inputs.input_ids, attention_mask=inputs.attention_mask,
                                       max_new_tokens=gen_length, return_dict_in_generate=True,
                                       output_confidences=True, **settings)
        generated = out.sequences[:, inputs.input_ids.shape[1]:].cpu()
        reference = reference_tokens(tokenizer, chunk, generated)
        lengths = generated_lengths(generated, tokenizer.eos_token_id)
        scored = (torch.arange(gen_length)[None] < lengths[:, None]) & ~out.confidences.cpu().isnan()
        confidence_all.append(out.confidences.cpu()[scored])
        correct_all.append((generated == reference)[scored])
    confidence, correct = torch.cat(confidence_all).double(), torch.cat(correct_all).double()
    index = (confidence * bins).long().clamp(0, bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append({"low": b / bins, "high": (b + 1) / bins, "count": count,
                      "mean_confidence": float(confidence[members].mean()) if count else None,
                      "accuracy": float(correct[members].mean()) if count else None})
    ece = sum(row["count"] * abs(row["mean_confidence"] - row["accuracy"]) for row in table if row["count"])
    return {"settings": settings, "gen_length": gen_length, "problems": len(problems), "tokens": len(confidence),
            "token_accuracy": float(correct.mean()) if len(correct) else None,
            "ece": ece / max(1, len(confidence)), "bins": table}


@dataclass
class Candidate:
    """A configuration being measured: how to run it, and what its passes gave."""

    name: str
    model: torch.nn.Module
    settings: dict
    autoregressive: bool = False
    guide: torch.nn.Module | None = None
    first: Pass | None = None
    forward_seconds: float = 0.0
    peak_memory_mib: float | None = None
    seconds: list[float] = field(default_factory=list)

    def run(self, tokenizer, problems, gen_length, batch_size, sync) -> Pass:
        return solve(self.model, tokenizer, problems, gen_length, batch_size, self.settings, self.autoregressive,
                     sync=sync, guide=self.guide)

    def instrumented_pass(self, tokenizer, problems, gen_length, batch_size, sync) -> None:
        """Accuracy, NFE, peak memory above the level at its start, and time inside model forwards."""
        device = next(self.model.parameters()).device
        memory = PeakMemory(device)
        baseline = memory.reset()
        timer = ForwardTimer(self.model, sync=sync)
        try:
            self.first = solve(self.model, tokenizer, problems, gen_length, batch_size, self.settings,
                               self.autoregressive, sync=sync, guide=self.guide,
                               progress=f"{self.name} gen={gen_length} batch={batch_size}")
        finally:
            timer.remove()
        peak = memory.read_mib()
        self.peak_memory_mib = None if peak is None or baseline is None else max(0.0, peak - baseline)
        self.forward_seconds = timer.seconds
        if not sync:  # on CPU the hooks cost nothing measurable: this pass is also a timed one
            self.seconds.append(self.first.seconds)

    def row(self, problems, gen_length: int, batch_size: int) -> Row:
        median = statistics.median(self.seconds)
        calls = self.first.calls
        tokens = [n for call in calls for n in call["tokens"]]
        per_forward = [n / call["nfe"] for call in calls for n in call["tokens"] if call["nfe"]]
        return Row(
            config=self.name, settings=self.settings, gen_length=gen_length, batch_size=batch_size,
            problems=len(problems),
            accuracy=accuracy(self.first.completions, problems),
            nfe=statistics.mean(call["nfe"] for call in calls),
            tokens_per_forward=statistics.mean(per_forward) if per_forward else 0.0,
            tokens_per_second=sum(tokens) / median, seconds=median, seconds_all=list(self.seconds),
            peak_memory_mib=self.peak_memory_mib,
            loop_overhead=max(0.0, 1.0 - self.forward_seconds / self.first.seconds) if self.first.seconds else None,
            guide_forwards=(statistics.mean(call["guide_forwards"] for call in calls)
                            if calls and calls[0].get("guide_forwards") is not None else None),
        )


def one_block(settings: dict, gen_length: int) -> tuple[int, dict]:
    """The generation length and settings of a cheap run of the same configuration: its first block only (the
    whole length when the settings do not fix the block length and steps, e.g. the model's own defaults)."""
    block = settings.get("block_length")
    if not block or "steps" not in settings or settings["steps"] != gen_length or gen_length % block:
        return gen_length, settings
    return block, {**settings, "steps": block}


def measure(candidates: list[Candidate], tokenizer, problems, gen_length: int, batch_size: int, repeats: int,
            log=print, baseline: str = VANILLA) -> list[Row]:
    """Rows for `candidates` on `problems`: per candidate a warm-up call and an instrumented pass, then timed
    passes round-robin over the candidates (so drift of the machine affects all alike) until each has `repeats`
    timings; the median is reported. On CUDA the instrumented pass synchronises around forwards, so it is not
    timed."""
    device = next(candidates[0].model.parameters()).device
    sync = device.type == "cuda"
    for candidate in candidates:
        short_length, short = one_block(candidate.settings, gen_length)  # warm-up: one block is enough
        solve(candidate.model, tokenizer, problems[:batch_size], short_length, batch_size, short,
              candidate.autoregressive, sync=sync, guide=candidate.guide)
        candidate.instrumented_pass(tokenizer, problems, gen_length, batch_size, sync)
        log(f"  {candidate.name} gen={gen_length} batch={batch_size}: accuracy "
            f"{accuracy(candidate.first.completions, problems):.3f}, {candidate.first.seconds:.2f}s")
    while any(len(c.seconds) < repeats for c in candidates):
        for candidate in candidates:
            if len(candidate.seconds) < repeats:
                candidate.seconds.append(candidate.run(tokenizer, problems, gen_length, batch_size, sync).seconds)
    rows = [c.row(problems, gen_length, batch_size) for c in candidates]
    vanilla = next(r for r in rows if r.config == baseline)
    ar = next((r for r in rows if r.config == AR_BASELINE), None)
    for row in rows:
        row.speedup = vanilla.seconds / row.seconds
        row.speedup_vs_ar = None if ar is None else ar.seconds / row.seconds
    return rows


def markdown_table(lines: list[tuple[str, ...]]) -> str:
    """A Markdown table from a header row and data rows, columns padded to their widest cell."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def format_table(rows: list[Row]) -> str:
    header = ("config", "gen", "batch", "accuracy", "NFE", "tok/fwd", "tok/s", "ms/tok", "speedup", "+peak MiB",
              "overhead")
    guided = any(r.guide_forwards is not None for r in rows)
    versus_ar = any(r.speedup_vs_ar is not None for r in rows)
    header += ("guide fwd",) * guided + ("vs AR",) * versus_ar
    lines = [header]
    for r in rows:
        extra = ((("-" if r.guide_forwards is None else f"{r.guide_forwards:.1f}"),) * guided
                 + (("-" if r.speedup_vs_ar is None else f"{r.speedup_vs_ar:.2f}x"),) * versus_ar)
        lines.append((
            r.config, str(r.gen_length), str(r.batch_size), f"{100 * r.accuracy:.1f}%", f"{r.nfe:.1f}",
            f"{r.tokens_per_forward:.2f}", f"{r.tokens_per_second:.0f}",
            f"{1000 / r.tokens_per_second:.1f}" if r.tokens_per_second else "-",
            "-" if r.speedup is None else f"{r.speedup:.2f}x",
            "-" if r.peak_memory_mib is None else f"{r.peak_memory_mib:.1f}",
            "-" if r.loop_overhead is None else f"{100 * r.loop_overhead:.0f}%",
        ) + extra)
    return markdown_table(lines)


def format_scaling(rows: list[Row]) -> str | None:
    """Milliseconds per generated token of each configuration at each generation length (one table per batch size),
    with the ratio of the longest length's cost to the shortest's; None with fewer than two lengths."""
    lengths = sorted({r.gen_length for r in rows})
    if len(lengths) < 2:
        return None
    tables = []
    for batch_size in sorted({r.batch_size for r in rows}):
        cost = {(r.config, r.gen_length): 1000 / r.tokens_per_second if r.tokens_per_second else None
                for r in rows if r.batch_size == batch_size}
        header = ("config", *(f"ms/tok @{g}" for g in lengths), f"{lengths[-1]} / {lengths[0]}")
        lines = [header]
        for config in dict.fromkeys(r.config for r in rows if r.batch_size == batch_size):
            values = [cost.get((config, g)) for g in lengths]
            ratio = values[-1] / values[0] if values[0] and values[-1] else None
            lines.append((f"{config} (batch {batch_size})", *("-" if v is None else f"{v:.1f}" for v in values),
                          "-" if ratio is None else f"{ratio:.2f}x"))
        tables.append(markdown_table(lines))
    return "\n\n".join(tables)


def plot(rows: list[Row], path: Path, title: str, baseline: str = VANILLA) -> None:
    """Accuracy against speedup, one series per (generation length, batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({(r.gen_length, r.batch_size) for r in rows})
    for gen_length, batch_size in groups:
        members = [r for r in rows if (r.gen_length, r.batch_size) == (gen_length, batch_size) and r.speedup]
        ax.scatter([r.speedup for r in members], [100 * r.accuracy for r in members],
                   label=f"gen {gen_length}, batch {batch_size}")
        for r in members:
            ax.annotate(r.config, (r.speedup, 100 * r.accuracy), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_ylim(-2, 102)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"speedup vs {baseline} (wall time, same run)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(model_path: str | Path, configs: list[str] | None = None, ar_model_path: str | Path | None = None,
        problems: int = 500, gen_lengths: tuple[int, ...] = (64,), batch_sizes: tuple[int, ...] = (50,),
        block_length: int = 32, repeats: int = 3, device: str = "cpu", dtype: str = "float32",
        log=print, baseline: str = VANILLA) -> dict:
    """Run the benchmark and return its report (rows as dicts plus machine facts); see the module docstring.
    `baseline` names the configuration the speedups are measured against (default `vanilla`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import DiffusionGenerationMixin

    default = [name for name, c in NAMED_CONFIGS.items() if ar_model_path or c.get("guidance") is None]
    parsed = [parse_config(c) for c in (configs or default)]
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique, got {names}")
    if baseline not in names:
        raise ValueError(f"the configurations must include {baseline!r}: every speedup is measured against it"
                         + (" (--baseline names another configuration)" if baseline == VANILLA else ""))
    bad = [g for g in gen_lengths if g <= 0 or g % block_length]
    if bad:
        raise ValueError(f"every generation length must be a positive multiple of --block-length {block_length},"
                         f" got {bad}")
    if any(b <= 0 for b in batch_sizes) or problems <= 0 or repeats < 1:
        raise ValueError("batch sizes, --problems and --repeats must be positive")
    for path in filter(None, (model_path, ar_model_path)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model folder {path} does not exist (the benchmark loads local folders)")
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
    if not isinstance(model, DiffusionGenerationMixin):
        raise ValueError(f"{model_path} holds a {type(model).__name__}, not a diffusion model of this library;"
                        " pass autoregressive models with --ar-model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    dev = list(dev_split(problems))
    ar_model = None
    if ar_model_path:
        if AutoTokenizer.from_pretrained(ar_model_path).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{ar_model_path} uses a different tokenizer from {model_path}: the AR baseline must"
                             " share the diffusion model's tokenizer")
        ar_model = AutoModelForCausalLM.from_pretrained(ar_model_path, dtype=torch_dtype).to(device).eval()

    guided = [name for name, overrides in parsed if overrides.get("guidance") is not None]
    if guided and ar_model is None:
        raise ValueError(f"the guided configurations {guided} need an autoregressive guide: pass --ar-model")
    # One token per step: a family whose defaults hold a threshold (Fast-dLLM v2) needs its "off" value, since an
    # unset threshold falls back to that default.
    base = {**BASE_CONFIG, "threshold": model.diffusion_threshold_off}
    rows = []
    with torch.inference_mode():
        for gen_length in gen_lengths:
            candidates = []
            for name, overrides in parsed:
                settings = ({} if name == MODEL_DEFAULT else
                            {**base, "steps": gen_length, "block_length": block_length, **overrides})
                try:  # fail fast, naming the configuration, before anything is timed (one block is enough)
                    short_length, short = one_block(settings, gen_length)
                    solve(model, tokenizer, dev[:1], short_length, 1, short, guide=ar_model)
                except ValueError as error:
                    raise ValueError(f"configuration {name!r} ({settings}) is invalid: {error}") from None
                candidates.append(Candidate(name, model, settings, guide=ar_model))
            if ar_model is not None:
                candidates.append(Candidate(AR_BASELINE, ar_model, {"model": str(ar_model_path)}, autoregressive=True))
            for batch_size in batch_sizes:
                for candidate in candidates:
                    candidate.first, candidate.seconds = None, []
                rows += measure(candidates, tokenizer, dev, gen_length, batch_size, repeats, log, baseline)
    return {
        "task": "chain-arith dev", "model": str(model_path), "ar_model": str(ar_model_path) if ar_model_path else None,
        "device": device, "dtype": dtype, "block_length": block_length, "repeats": repeats, "baseline": baseline,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") else None},
        "rows": [asdict(r) for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlm_generation.benchmark", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="folder of a diffusion model (LLaDA, Dream, Fast-dLLM v2, SDAR) with its tokenizer")
    parser.add_argument("--ar-model", help="folder of an autoregressive baseline on the same tokenizer")
    parser.add_argument("--configs", nargs="+", default=None,
                        help=f"decoding configurations (default: all of {', '.join(NAMED_CONFIGS)}); also "
                             f"'{MODEL_DEFAULT}' or NAME:key=value,...")
    parser.add_argument("--problems", type=int, default=500, help="first N dev problems (default 500: all)")
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[64])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[50])
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row (>= 1); the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of accuracy against speedup here (needs matplotlib)")
    parser.add_argument("--baseline", default=VANILLA,
                        help="the configuration speedups are measured against (default: vanilla; e.g. vanilla+eos "
                             "where vanilla at a long canvas would take hours)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        parser.error(f"--dtype {dtype!r} is not a torch dtype (use float32 or bfloat16)")
    try:
        report = run(args.model, args.configs, args.ar_model, args.problems, tuple(args.gen_lengths),
                     tuple(args.batch_sizes), args.block_length, args.repeats, args.device, dtype,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True), baseline=args.baseline)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    report["command"] = " ".join(["python -m dlm_generation.benchmark", *(sys.argv[1:] if argv is None else argv)])
    rows = [Row(**r) for r in report["rows"]]
    print(f"chain-arith dev, {report['rows'][0]['problems']} problems, {args.model}, {args.device} {dtype}, "
          f"{report['machine']['threads']} threads, block_length {args.block_length}, median of {args.repeats}"
          + (f", speedup vs {args.baseline}" if args.baseline != VANILLA else ""))
    print(format_table(rows))
    scaling = format_scaling(rows)
    if scaling:
        print(f"\ncost per generated token by generation length:\n{scaling}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot, f"chain-arith dev: {Path(args.model).name} ({args.device} {dtype})", args.baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
