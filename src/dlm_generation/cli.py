"""`dlm-generate`: diffusion generation from the command line.

    dlm-generate model_cards/tiny-llada-chain-arith --prompt "Start with 63. Subtract 39. Add 46."
    dlm-generate MODEL --prompts-file questions.txt --threshold 0.9 --cache-implementation dual --json
    echo "Start with 8. Add 75." | dlm-generate MODEL --prompts-file -
    dlm-generate MODEL --chat
    dlm-generate MODEL --prompts-file questions.txt --ray --num-workers 4   # one model per Ray actor

Every field of `DiffusionGenerationConfig` that `diffusion_generate` reads is a flag (`--block-length 32`,
`--eos-early-stop`, `--cache-config '{"window_left": 64}'`; values are read as JSON, so `--block-length null`
asks for the default, and a field that takes a dict or a list must get valid JSON); flags left out keep the model's
own `generation_config.json`. Completions go to stdout, followed by a stats line; `--json` prints one JSON document
instead; a progress bar on stderr follows many prompts. Every error (a bad flag value, a model folder that does not
exist, a prompt the model refuses) is one line `dlm-generate: error: ...` on stderr, exit status 2.

`--ray` decodes the prompts on a pool of Ray actors (`dlm_generation.ray_data.generate_dataset`, one model per actor,
`--num-workers` of them, on a local Ray started for the run or the cluster at `--address`); the prompts are cut into
the same `--batch-size` batches, so the output is the single-process run's (timings aside).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

from .configuration_diffusion import LIBRARY_DEFAULTS, DiffusionGenerationConfig
from .generation_utils import generated_lengths
from .loading import load_models

# Fields that the CLI sets itself.
CLI_OWNED = {"return_dict_in_generate", "output_commit_steps"}
# Help for the fields that `GenerationConfig` owns (the diffusion fields' help comes from the config docstring).
SHARED_HELP = {
    "max_new_tokens": "canvas length: the number of positions generated after the prompt",
    "max_length": "prompt + generated length (alternative to max_new_tokens)",
    "temperature": "0 = greedy (default); > 0 samples with Gumbel noise",
    "top_p": "nucleus sampling threshold in (0, 1]",
    "top_k": "sample only among the k most likely tokens",
    "do_sample": "False forces greedy decoding",
    "num_return_sequences": "completions per prompt",
    "cache_implementation": "diffusion cache: prefix, dual, freecache, dllm or d2cache",
    "cache_config": "the cache's hyper-parameters as JSON, e.g. '{\"window_left\": 64}'",
    "stop_strings": "stop a row once its text contains this string (JSON list for several)",
    "pad_token_id": "token written after a row's end",
    "bos_token_id": "beginning-of-sequence token id",
    "eos_token_id": "end-of-sequence token id (JSON list for several)",
}


def field_help() -> dict[str, str]:
    """One line of help per config field, read from the `DiffusionGenerationConfig` docstring."""
    doc = DiffusionGenerationConfig.__doc__ or ""
    entries = re.findall(r"^\s*- ((?:`\w+`(?:, )?)+) \(([^)]*)\): (.*?)(?=^\s*- `|^\s*$)", doc, re.M | re.S)
    helps = dict(SHARED_HELP)
    for names, kind, text in entries:
        line = " ".join(text.split())
        for name in re.findall(r"`(\w+)`", names):
            helps[name] = f"({kind}) {line}"
    return helps


# Fields whose value is a JSON object, and an example of each; fields that may be a JSON list.
OBJECT_FIELDS = {"cache_config": '{"window_left": 64}', "guidance": '{"strategy": "speculative"}'}
LIST_FIELDS = {"stop_strings": '["####", "Question"]', "eos_token_id": "[2, 7]"}


def parse_value(text: Any, name: str | None = None, flag: str | None = None) -> Any:
    """A flag's value: JSON when it parses (numbers, true/false, null, lists, dicts), else the string itself;
    values that are not strings pass through (lm-eval's `model_args` parser has already typed some).

    With the field's `name`, text that is not valid JSON raises `ValueError` (json's message and the fix) where the
    field expects a JSON object (`cache_config`, `guidance`), and wherever the text was meant as a JSON object or
    list (it starts with `{`, or with `[` and holds a quote or a comma). `flag` is how the message shows the
    setting (default `--cache-config` for `cache_config`).
    """
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        stripped = text.strip()
        meant_as_json = stripped.startswith("{") or (stripped.startswith("[") and any(c in stripped for c in "\"',"))
        if name is None or not (name in OBJECT_FIELDS or meant_as_json):
            return text
        raise ValueError(json_error(name, text, error, flag)) from None


def json_error(name: str, text: str, error: json.JSONDecodeError, flag: str | None = None) -> str:
    """What is wrong with `text` as JSON for field `name`, and the value to pass instead."""
    flag = flag or "--" + name.replace("_", "-")
    example = repair_json(text) or OBJECT_FIELDS.get(name) or LIST_FIELDS.get(name) or '{"key": 1}'

    def setting(value: str) -> str:  # a command-line flag takes a quoted shell word; model_args take name=value
        return f"{flag} '{value}'" if flag.startswith("-") else f"{flag}={value}"

    kind = "a JSON object" if name in OBJECT_FIELDS else "JSON"
    message = (f"{text!r} is not valid JSON ({error.msg} at character {error.pos}): {name} takes {kind}, with keys "
               f"and strings in double quotes, e.g. {setting(example)}")
    if name == "stop_strings":
        message += f" (to stop at the text itself, pass it as a JSON string: {setting(json.dumps(text))})"
    return message


def repair_json(text: str) -> str | None:
    """`text` with single quotes, bare keys and words, and Python's True / False / None made JSON, if that parses."""
    fixed = re.sub(r"'([^'\\]*)'", r'"\1"', text)
    fixed = re.sub(r'([{,]\s*)([A-Za-z_][\w\-]*)(\s*:)', r'\1"\2"\3', fixed)
    fixed = re.sub(r'(:\s*)(?!(?:true|false|null|True|False|None)\b)([A-Za-z_][\w\-.]*)(\s*[,}])', r'\1"\2"\3', fixed)
    for python, json_name in (("True", "true"), ("False", "false"), ("None", "null")):
        fixed = re.sub(rf"(?<![\w\"]){python}(?![\w\"])", json_name, fixed)
    try:
        json.loads(fixed)
    except json.JSONDecodeError:
        return None
    return fixed


def field_type(name: str):
    """The argparse `type` of a config field's flag: `parse_value`, JSON mistakes reported as the flag's error."""
    def parse(text: str) -> Any:
        try:
            return parse_value(text, name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name
    return parse


def one_line(message: Any) -> str:
    """A (possibly multi-line) error message as one line: lines joined, list bullets dropped."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " ".join(line[2:] if line.startswith("- ") else line for line in lines)


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that an error is one line `prog: error: ...` on stderr (exit status 2), without the usage
    block; `--help` prints the full help as usual."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dlm-generate",
        description="Generate with a diffusion language model (LLaDA, Dream) through dlm-generation. Prompts come "
                    "from --prompt (repeatable), --prompts-file (one per line; '-' reads stdin) or --chat.",
        epilog="Decoding flags not given keep the model's generation_config.json. Example: dlm-generate "
               "model_cards/tiny-llada-chain-arith --prompt 'Start with 63. Subtract 39. Add 46.' --threshold 0.9 "
               "--alg low_confidence --cache-implementation dual (the chain-arith chat template turns the bare "
               "question into 'Question: ... What is the result?'). Errors are one line on stderr, exit status 2.",
    )
    parser.add_argument("model", help="a model folder or Hub id (LLaDA or Dream)")
    source = parser.add_argument_group("prompts")
    source.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the flag for several)")
    source.add_argument("--prompts-file", help="a file with one prompt per line; '-' reads standard input")
    source.add_argument("--chat", action="store_true", help="an interactive chat (the model's chat template)")
    source.add_argument("--raw", action="store_true",
                        help="do not wrap prompts in the tokenizer's chat template (used by default when it has one)")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=8, help="prompts per diffusion_generate call (default 8)")
    run.add_argument("--assistant-model", help="an autoregressive guide (folder or Hub id) for AR-guided diffusion")
    run.add_argument("--peft", help="a PEFT (LoRA) adapter folder or Hub id to apply to the model")
    run.add_argument("--device", default="cpu", help="torch device (default cpu)")
    run.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    run.add_argument("--seed", type=int, default=None, help="seed for sampled decoding")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    run.add_argument("--ray", action="store_true",
                     help="decode on a pool of Ray actors, one model each (pip install 'dlm-generation[serve]'); "
                          "same batches and output as without it")
    run.add_argument("--num-workers", type=int, default=None,
                     help="with --ray: the number of actors (default 2), each using --threads CPU threads (default 1)")
    run.add_argument("--address", default=None,
                     help="with --ray: the Ray cluster to join (default: start a local Ray for the run)")
    run.add_argument("--trace", action="store_true",
                     help="show when each token was committed: a coloured trace under each completion (step numbers "
                          "under the tokens when stdout is not a terminal); with --json, each completion's "
                          "commit_steps")
    config = parser.add_argument_group("decoding (fields of DiffusionGenerationConfig)")
    helps = field_help()
    for name, default in LIBRARY_DEFAULTS.items():
        if name in CLI_OWNED:
            continue
        flag = "--" + name.replace("_", "-")
        text = helps.get(name, "see DiffusionGenerationConfig")
        # Flags left out are absent from the namespace (SUPPRESS), so an explicit `null` can still be passed.
        if isinstance(default, bool) or name == "do_sample":
            config.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=text)
        else:
            config.add_argument(flag, dest=name, type=field_type(name), default=argparse.SUPPRESS, metavar="VALUE",
                                help=text)
    return parser


def read_prompts(args, parser) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if args.prompts_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            try:
                with open(args.prompts_file, encoding="utf-8") as handle:
                    lines = handle.read().splitlines()
            except OSError as error:
                parser.error(f"cannot read --prompts-file {args.prompts_file}: {error.strerror}")
        prompts += [line for line in lines if line.strip()]
    if not prompts and not args.chat:
        parser.error("no prompt: pass --prompt TEXT, --prompts-file FILE (or - for stdin), or --chat")
    if prompts and args.chat:
        parser.error("--chat reads its prompts interactively; drop --prompt / --prompts-file")
    return prompts


def load(args, parser):
    """`loading.load_models` for the command line's flags; its errors end the command with one line."""
    try:
        return load_models(args.model, args.assistant_model, args.device, args.dtype, args.peft,
                           option_names={"assistant_model": "--assistant-model", "peft": "--peft"})
    except OSError as error:
        parser.error(f"cannot load {args.model!r}: {one_line(error)}")
    except ValueError as error:
        parser.error(str(error))


def config_overrides(args) -> dict[str, Any]:
    return {name: getattr(args, name) for name in LIBRARY_DEFAULTS if name not in CLI_OWNED and hasattr(args, name)}


def encode(tokenizer, messages_or_prompts, use_template: bool, device):
    if use_template:
        return tokenizer.apply_chat_template(messages_or_prompts, add_generation_prompt=True, padding=True,
                                             return_tensors="pt", return_dict=True).to(device)
    return tokenizer(messages_or_prompts, return_tensors="pt", padding=True).to(device)


def uses_chat_template(tokenizer, raw: bool = False) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template: it has one and `raw` (--raw) is not asked."""
    return not raw and tokenizer.chat_template is not None


def generate_prompts(model, tokenizer, guide, prompts: list[str], overrides, use_template: bool, device,
                     trace: bool = False) -> tuple[list[str], dict]:
    """Decode one batch of prompt strings as `dlm-generate` does: each prompt is one user turn of the chat template
    (or the bare text without it), the batch is left-padded and decoded by one `generate` call."""
    messages = [[{"role": "user", "content": p}] for p in prompts] if use_template else list(prompts)
    return generate(model, tokenizer, guide, encode(tokenizer, messages, use_template, device), overrides, trace)


def generate(model, tokenizer, guide, inputs, overrides, trace: bool = False) -> tuple[list[str], dict]:
    """Decode one batch; return the completions (cut at the first stop token) and the call's stats.

    stats["lengths"] holds each completion's generated token count (up to and including its stop token). With
    `trace`, stats["commit_steps"] holds each completion's commit steps (up to its stop token).
    """
    extra = {"assistant_model": guide} if guide is not None else {}
    if trace:
        extra["output_commit_steps"] = True
    began = time.perf_counter()
    out = model.diffusion_generate(**inputs, tokenizer=tokenizer, return_dict_in_generate=True, **overrides, **extra)
    seconds = time.perf_counter() - began
    prompt_len = inputs["input_ids"].shape[1]
    generated = out.sequences[:, prompt_len:]
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else model.config.eos_token_id
    lengths = generated_lengths(generated, eos).tolist()
    completions = tokenizer.batch_decode([row[:n] for row, n in zip(generated.tolist(), lengths)],
                                         skip_special_tokens=True)
    stats = {"nfe": out.nfe, "tokens": sum(lengths), "seconds": seconds,
             "guide_forwards": out.assistant_forwards, "lengths": lengths}
    if trace:
        stats["tokens_ids"] = [row[:n] for row, n in zip(generated.tolist(), lengths)]
        stats["commit_steps"] = [row[:n] for row, n in zip(out.commit_steps.tolist(), lengths)]
    return completions, stats


def trace_text(tokenizer, token_ids: list[int], commit_steps: list[int]) -> str:
    """A completion's commit trace for the terminal (colours on a TTY, step numbers under the tokens otherwise)."""
    import torch

    from .visualize import render_commit_trace

    return render_commit_trace(torch.tensor([token_ids]), torch.tensor([commit_steps]), tokenizer,
                               color=sys.stdout.isatty())


def stats_line(stats: dict) -> str:
    per_forward = stats["tokens"] / max(stats["nfe"], 1)
    guide = "" if stats.get("guide_forwards") is None else f", guide forwards {stats['guide_forwards']}"
    return (f"[NFE {stats['nfe']}{guide}, {stats['tokens']} tokens, {per_forward:.2f} tokens/forward, "
            f"{stats['tokens'] / max(stats['seconds'], 1e-9):.1f} tokens/s, {stats['seconds']:.2f} s]")


def chat(model, tokenizer, guide, overrides, device, use_template: bool, trace: bool = False) -> int:
    """Interactive session: each reply is generated from the whole conversation (the chat template's format)."""
    messages: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model; an empty line or Ctrl-D ends the session.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        messages.append({"role": "user", "content": line.strip()})
        inputs = encode(tokenizer, [messages] if use_template else [line.strip()], use_template, device)
        completions, stats = generate(model, tokenizer, guide, inputs, overrides, trace)
        reply = completions[0].strip()
        messages.append({"role": "assistant", "content": reply})
        print(reply)
        if trace:
            print(trace_text(tokenizer, stats["tokens_ids"][0], stats["commit_steps"][0]))
        print(stats_line(stats), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = read_prompts(args, parser)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    check_ray_flags(args, parser)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    overrides = config_overrides(args)
    try:
        DiffusionGenerationConfig(**overrides)  # every bad flag value, reported before the model loads
    except ValueError as error:
        parser.error(str(error))
    if args.ray:
        return run_ray(args, parser, prompts, overrides)
    model, tokenizer, guide = load(args, parser)
    use_template = uses_chat_template(tokenizer, args.raw)
    with torch.inference_mode():
        try:
            if args.chat:
                return chat(model, tokenizer, guide, overrides, args.device, use_template, args.trace)
            return run_prompts(args, model, tokenizer, guide, prompts, overrides, use_template)
        except ValueError as error:  # what diffusion_generate refuses (prompt too long, guide vocabulary, ...)
            parser.error(str(error))


def run_prompts(args, model, tokenizer, guide, prompts, overrides, use_template) -> int:
    from tqdm.auto import tqdm

    results, totals = [], {"nfe": 0, "tokens": 0, "seconds": 0.0, "guide_forwards": None}
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    bar = tqdm(total=len(prompts), unit="prompt", disable=len(batches) < 2, file=sys.stderr)
    copies = overrides.get("num_return_sequences") or 1
    for batch in batches:
        completions, stats = generate_prompts(model, tokenizer, guide, batch, overrides, use_template, args.device,
                                              args.trace)
        for index, prompt in enumerate(batch):
            result = {"prompt": prompt, "completions": completions[index * copies:(index + 1) * copies]}
            if args.trace:
                rows = range(index * copies, (index + 1) * copies)
                result["commit_steps"] = [stats["commit_steps"][r] for r in rows]
                result["traces"] = [(stats["tokens_ids"][r], stats["commit_steps"][r]) for r in rows]
            results.append(result)
        for key in ("nfe", "tokens", "seconds"):
            totals[key] += stats[key]
        if stats["guide_forwards"] is not None:
            totals["guide_forwards"] = (totals["guide_forwards"] or 0) + stats["guide_forwards"]
        bar.update(len(batch))
    bar.close()
    return print_results(args, tokenizer, results, totals, overrides)


def print_results(args, tokenizer, results: list[dict], totals: dict, overrides) -> int:
    """Print the completions and the stats line, or with --json one JSON document."""
    if args.json:
        totals["tokens_per_forward"] = totals["tokens"] / max(totals["nfe"], 1)
        totals["tokens_per_second"] = totals["tokens"] / max(totals["seconds"], 1e-9)
        for result in results:
            result.pop("traces", None)
        print(json.dumps({"model": args.model, "config": overrides, "results": results, "stats": totals},
                         indent=2, default=str))
        return 0
    for result in results:
        for index, completion in enumerate(result["completions"]):
            print(completion.strip())
            if args.trace:
                print(trace_text(tokenizer, *result["traces"][index]))
    print(stats_line(totals))
    return 0


def check_ray_flags(args, parser) -> None:
    """--num-workers and --address need --ray; --ray decodes a prompt list (no --chat, no --trace)."""
    if not args.ray:
        for flag, value in (("--num-workers", args.num_workers), ("--address", args.address)):
            if value is not None:
                parser.error(f"{flag} needs --ray")
        return
    if args.num_workers is None:
        args.num_workers = 2
    if args.num_workers < 1:
        parser.error(f"--num-workers must be at least 1, got {args.num_workers}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    for flag, value in (("--chat", args.chat), ("--trace", args.trace)):
        if value:
            parser.error(f"{flag} does not run with --ray; drop one of them")


def run_ray(args, parser, prompts: list[str], overrides) -> int:
    """The prompts through `ray_data.generate_dataset` (same batches as `run_prompts`, so the same output). A local Ray
    is started for the run (num_cpus = workers x threads, no dashboard, a small object store) and shut down after it,
    unless this process runs Ray already or --address (else RAY_ADDRESS) names a cluster to join."""
    from . import ray_data

    try:  # a mistake answers before Ray starts
        ray_data.check_settings(args.model, assistant_model=args.assistant_model, peft=args.peft, device=args.device,
                                dtype=args.dtype, **overrides)
        ray = ray_data.import_ray()
    except (ValueError, ImportError) as error:
        parser.error(one_line(error))
    threads = args.threads or 1
    address = args.address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level="WARNING")
            else:
                ray.init(num_cpus=args.num_workers * threads, include_dashboard=False, log_to_driver=False,
                         logging_level="WARNING", object_store_memory=ray_data.LOCAL_OBJECT_STORE_BYTES)
        except (ConnectionError, RuntimeError, ValueError) as error:
            parser.error(f"cannot start or join Ray{' at ' + address if address else ''}: "
                         f"{one_line(error)}")
    try:
        rows = ray_data.generate_dataset(
            prompts, args.model, num_workers=args.num_workers, batch_size=args.batch_size, threads_per_worker=threads,
            use_chat_template=not args.raw, assistant_model=args.assistant_model, peft=args.peft, device=args.device,
            dtype=args.dtype, seed=args.seed, **overrides)
    except ValueError as error:
        parser.error(one_line(error))
    finally:
        if started:
            ray.shutdown()
    results = [{"prompt": row["prompt"], "completions": row["completions"]} for row in rows]
    return print_results(args, None, results, ray_data.totals(rows), overrides)


if __name__ == "__main__":
    sys.exit(main())
