"""Accuracy and speed of decoding configurations on chain-arith, measured side by side in one run.

    python -m dlm_generation.benchmark model_cards/tiny-llada-chain-arith \\
        --ar-model model_cards/tiny-ar-chain-arith --problems 500 --gen-lengths 64 --batch-sizes 50

For every generation length x batch size it runs the named decoding configurations (default: all of
`NAMED_CONFIGS`) on the first `--problems` dev problems and prints one table: accuracy, NFE (model forwards per
generate call), tokens per forward, tokens/s, speedup vs `vanilla` (same length and batch size, median wall time of
`--repeats` timed passes), peak memory, and the share of wall time spent outside model forwards (loop overhead).
An autoregressive model (`--ar-model`, through `transformers`' `generate` with its KV cache) is a baseline row.
It also writes the rows as JSON (`--json`) and a PNG of accuracy against speedup (`--plot`, needs matplotlib).

Every configuration is decoded greedily (temperature 0) with one fixed base: ``steps = gen_length`` (one token per
step unless the configuration commits more), ``block_length = --block-length``, no threshold/factor, no early
stop; the model's own `generation_config.json` is ignored except by the ``model-default`` configuration, which
uses it as shipped (plus ``max_new_tokens``). Generated tokens are counted up to and including the first EOS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .tasks.chain_arith import ChainArithProblem, dev_split, is_correct

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
# Every diffusion configuration starts from this base (None = the model family's default, e.g. Dream's entropy).
BASE_CONFIG = {"alg": None, "threshold": None, "factor": None, "eos_early_stop": False, "temperature": 0.0}


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
    loop_overhead: float | None = None  # share of wall time outside model forwards


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
    return name, settings


def generated_lengths(completions: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Tokens per row up to and including the first EOS (the whole row when there is none)."""
    if eos_token_id is None:
        return torch.full((completions.shape[0],), completions.shape[1])
    is_eos = completions == eos_token_id
    return torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, completions.shape[1])


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
    """Peak memory of a pass: CUDA max allocated, or on Linux CPUs the process's peak RSS (VmHWM, reset first)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/clear_refs"):
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def read_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


def solve(model, tokenizer, problems: list[ChainArithProblem], gen_length: int, batch_size: int,
          settings: dict | None = None, autoregressive: bool = False) -> tuple[list[str], list[dict]]:
    """Decode `problems` in batches; return the completions and per-call stats (nfe, generated token counts).

    Diffusion models go through `diffusion_generate(**settings)`; `autoregressive=True` uses `generate` (greedy,
    KV cache) and counts its forwards.
    """
    device = next(model.parameters()).device
    completions, calls = [], []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        inputs = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True).to(device)
        prompt_len = inputs.input_ids.shape[1]
        if autoregressive:
            counter = ForwardTimer(model, sync=False)
            try:
                sequences = model.generate(**inputs, max_new_tokens=gen_length, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            finally:
                counter.remove()
            nfe = counter.calls
        else:
            out = model.diffusion_generate(inputs.input_ids, attention_mask=inputs.attention_mask,
                                           max_new_tokens=gen_length, return_dict_in_generate=True,
                                           **(settings or {}))
            sequences, nfe = out.sequences, out.nfe
        generated = sequences[:, prompt_len:]
        lengths = generated_lengths(generated, tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(generated, skip_special_tokens=True)
        calls.append({"nfe": nfe, "tokens": lengths.tolist()})
    return completions, calls


def measure(model, tokenizer, problems, name: str, settings: dict | None, gen_length: int, batch_size: int,
            repeats: int, autoregressive: bool = False) -> Row:
    """One row from `repeats` passes over `problems` (at least one); the median wall time is reported.

    The first pass is instrumented (accuracy, NFE, peak memory, time inside model forwards). On CPU its hooks cost
    nothing measurable, so it is also one of the timed passes; on CUDA they synchronise, so it is an extra pass.
    """
    device = next(model.parameters()).device
    sync = device.type == "cuda"
    memory = PeakMemory(device)
    memory.reset()
    timer = ForwardTimer(model, sync=sync)
    try:
        start = time.perf_counter()
        completions, calls = solve(model, tokenizer, problems, gen_length, batch_size, settings, autoregressive)
        instrumented = time.perf_counter() - start
    finally:
        timer.remove()
    peak = memory.read_mib()
    seconds = [] if sync else [instrumented]
    while len(seconds) < max(1, repeats):
        start = time.perf_counter()
        solve(model, tokenizer, problems, gen_length, batch_size, settings, autoregressive)
        if sync:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    tokens = [n for call in calls for n in call["tokens"]]
    per_forward = [n / call["nfe"] for call in calls for n in call["tokens"] if call["nfe"]]
    return Row(
        config=name, settings=settings or {}, gen_length=gen_length, batch_size=batch_size, problems=len(problems),
        accuracy=sum(is_correct(c, p) for c, p in zip(completions, problems)) / len(problems),
        nfe=statistics.mean(call["nfe"] for call in calls),
        tokens_per_forward=statistics.mean(per_forward) if per_forward else 0.0,
        tokens_per_second=sum(tokens) / median, seconds=median, seconds_all=seconds,
        peak_memory_mib=peak, loop_overhead=max(0.0, 1.0 - timer.seconds / instrumented),
    )


def format_table(rows: list[Row]) -> str:
    header = ("config", "gen", "batch", "accuracy", "NFE", "tok/fwd", "tok/s", "speedup", "peak MiB", "overhead")
    lines = [header]
    for r in rows:
        lines.append((
            r.config, str(r.gen_length), str(r.batch_size), f"{100 * r.accuracy:.1f}%", f"{r.nfe:.1f}",
            f"{r.tokens_per_forward:.2f}", f"{r.tokens_per_second:.0f}",
            "-" if r.speedup is None else f"{r.speedup:.2f}x",
            "-" if r.peak_memory_mib is None else f"{r.peak_memory_mib:.0f}",
            "-" if r.loop_overhead is None else f"{100 * r.loop_overhead:.0f}%",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def plot(rows: list[Row], path: Path, title: str) -> None:
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
    ax.set_xlabel("speedup vs vanilla (wall time, same run)")
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
        log=print) -> dict:
    """Run the benchmark and return its report (rows as dicts plus machine facts); see the module docstring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import DiffusionGenerationMixin

    parsed = [parse_config(c) for c in (configs or list(NAMED_CONFIGS))]
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique, got {names}")
    if VANILLA not in names:
        raise ValueError("the configurations must include 'vanilla': every speedup is measured against it")
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
        raise TypeError(f"{model_path} holds a {type(model).__name__}, not a diffusion model of this library;"
                        " pass autoregressive models with --ar-model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    dev = list(dev_split(problems))
    ar_model = None
    if ar_model_path:
        ar_model = AutoModelForCausalLM.from_pretrained(ar_model_path, dtype=torch_dtype).to(device).eval()

    rows = []
    with torch.inference_mode():
        for gen_length in gen_lengths:
            for batch_size in batch_sizes:
                # Warm-up (allocator, kernels) so the first configuration is not penalised.
                solve(model, tokenizer, dev[:batch_size], gen_length, batch_size,
                      {**BASE_CONFIG, "steps": gen_length, "block_length": block_length})
                group = []
                for name, overrides in parsed:
                    settings = ({} if name == MODEL_DEFAULT else
                                {**BASE_CONFIG, "steps": gen_length, "block_length": block_length, **overrides})
                    row = measure(model, tokenizer, dev, name, settings, gen_length, batch_size, repeats)
                    group.append(row)
                    log(f"  {name} gen={gen_length} batch={batch_size}: accuracy {row.accuracy:.3f}, "
                        f"{row.seconds:.2f}s, nfe {row.nfe:.1f}")
                if ar_model is not None:
                    solve(ar_model, tokenizer, dev[:batch_size], gen_length, batch_size, autoregressive=True)
                    group.append(measure(ar_model, tokenizer, dev, AR_BASELINE, {"model": str(ar_model_path)},
                                         gen_length, batch_size, repeats, autoregressive=True))
                vanilla = next(r for r in group if r.config == VANILLA)
                for row in group:
                    row.speedup = vanilla.seconds / row.seconds
                rows += group
    return {
        "task": "chain-arith dev", "model": str(model_path), "ar_model": str(ar_model_path) if ar_model_path else None,
        "device": device, "dtype": dtype, "block_length": block_length, "repeats": repeats,
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
    parser.add_argument("model", help="folder of a diffusion model (LLaDA or Dream) with its tokenizer")
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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        parser.error(f"--dtype {dtype!r} is not a torch dtype (use float32 or bfloat16)")
    try:
        report = run(args.model, args.configs, args.ar_model, args.problems, tuple(args.gen_lengths),
                     tuple(args.batch_sizes), args.block_length, args.repeats, args.device, dtype,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError, TypeError) as error:
        parser.error(str(error))
    report["command"] = " ".join(["python -m dlm_generation.benchmark", *(sys.argv[1:] if argv is None else argv)])
    rows = [Row(**r) for r in report["rows"]]
    print(f"chain-arith dev, {report['rows'][0]['problems']} problems, {args.model}, {args.device} {dtype}, "
          f"{report['machine']['threads']} threads, block_length {args.block_length}, median of {args.repeats}")
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot, f"chain-arith dev: {Path(args.model).name} ({args.device} {dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
