"""Offline generation at scale: prompts mapped through a pool of Ray actors, one model per actor.

    import ray
    from dlm_generation.ray_data import generate_dataset

    ray.init(num_cpus=2, include_dashboard=False)
    rows = generate_dataset(["Start with 63. Subtract 39. Add 46.", "Start with 8. Add 75."],
                            "model_cards/tiny-llada-chain-arith", num_workers=2)
    rows[0]["completion"], rows[0]["tokens"], rows[0]["nfe"]

`generate_dataset` takes a list of prompt strings (and returns a list of rows) or a `ray.data.Dataset` with a prompt
column (and returns a Dataset: the input's columns plus the results, lazily computed like any Dataset). Either way:

- the prompts are numbered in input order and cut into the batches that `dlm-generate --batch-size` makes (prompts
  0..7, 8..15, ... for 8); each batch is one Ray Data block, decoded whole by one actor with the CLI's own code
  (`cli.generate_prompts`: chat template or bare text, left padding, one `diffusion_generate` call). So every row,
  its stats included, equals the single-process run's, whichever actor decoded it and in whatever order;
- each actor loads the model once (`loading.load_models`) and decodes with `threads_per_worker` torch threads
  (its Ray `num_cpus`; one GPU per actor when `device` is a CUDA device); there are `num_workers` actors, or one per
  batch when there are fewer batches;
- rows come back in input order, each with `index` (its position in the input), `batch` (the batch that decoded
  it), `completion` (the first completion's text, cut at the stop token), `completions` (all of them, one per
  `num_return_sequences`), `tokens` (generated tokens, stop token included, all completions), `nfe` (forward
  passes of its batch's `diffusion_generate` call: one batch, one count), `tokens_per_forward` (`tokens / nfe`),
  `seconds` (its batch's decode time) and, with an `assistant_model`, `guide_forwards` (its batch's guide calls).

A Dataset's prompts are read through the driver once (in order, to number them and cut the batches); the model
work is all on the actors. Ray must already be initialised (`ray.init(...)`, or a cluster to join); otherwise Ray
starts a local one with its defaults. `dlm-generate --ray --num-workers N` runs the same function.
"""

from __future__ import annotations

import os
import re
from typing import Any

# What `dlm-generate --ray` gives a local Ray's object store (prompts and completions are small).
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 ** 2
# The columns a result row adds to its input's.
RESULT_COLUMNS = ("index", "batch", "completion", "completions", "tokens", "nfe", "tokens_per_forward", "seconds",
                  "guide_forwards")
INSTALL_HINT = "pip install 'dlm-generation[serve]' (or pip install 'ray[data]')"


def import_ray():
    """The `ray` module with Ray Data, or `ImportError` saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise ImportError(f"generation on Ray needs Ray Data, which is not installed ({error}): {INSTALL_HINT}") \
            from error
    return ray


def generate_dataset(dataset_or_prompts, model: str, *, num_workers: int = 2, batch_size: int = 8,
                     threads_per_worker: int = 1, use_chat_template: bool = True, assistant_model: str | None = None,
                     peft: str | None = None, device: str = "cpu", dtype: str | None = None, seed: int | None = None,
                     prompt_column: str = "prompt", **config_fields):
    """Decode every prompt with `model` on `num_workers` Ray actors; the rows come back in input order, with stats.

    Args:
        dataset_or_prompts: a list of prompt strings, or a `ray.data.Dataset` whose `prompt_column` holds them.
        model: a model folder or Hub id (LLaDA or Dream), loaded once by each actor.
        num_workers: actors in the pool (one model each).
        batch_size: prompts per `diffusion_generate` call (`dlm-generate --batch-size`).
        threads_per_worker: torch threads per actor, and the CPUs Ray reserves for it.
        use_chat_template: wrap each prompt in the tokenizer's chat template when it has one (False: `--raw`).
        assistant_model, peft, dtype: as `loading.load_models` (`--assistant-model`, `--peft`, `--dtype`); local
            folders must be at the same path for the driver and the actors (one machine, or a shared file system).
        device: "cpu", or "cuda" for one GPU per actor (Ray shows each actor its GPU as cuda:0).
        seed: for sampled decoding, batch `b` is decoded after `torch.manual_seed(seed + b)` (reproducible whichever
            actor takes it; a different random stream from one process's, which seeds once).
        prompt_column: the Dataset's prompt column.
        **config_fields: `DiffusionGenerationConfig` fields for `diffusion_generate` (`threshold=0.9`, ...); fields
            left out keep the model's generation_config.json.

    Returns:
        For a list, a list of dicts `{"index", "prompt", "batch", "completion", "completions", "tokens", "nfe",
        "tokens_per_forward", "seconds"[, "guide_forwards"]}` in input order (decoded before returning). For a
        Dataset, a Dataset of the input's columns plus those (in input order; decoded when consumed).

    Raises:
        ValueError: a bad argument (`num_workers` < 1, no prompts, a missing prompt column, a prompt that is not a
            string, a bad config field, a model that is not there), found before any actor starts; or what
            `diffusion_generate` refused in an actor (a list is decoded at once, so its errors come from here).
        ImportError: Ray Data is not installed.
    """
    _check_counts(num_workers=num_workers, batch_size=batch_size, threads_per_worker=threads_per_worker)
    ray = import_ray()
    is_dataset = isinstance(dataset_or_prompts, ray.data.Dataset)
    if not is_dataset:
        prompts = _prompt_list(dataset_or_prompts)
    sources = check_settings(model, assistant_model=assistant_model, peft=peft, device=device, dtype=dtype,
                             **config_fields)
    on_gpu = _device_type(device) == "cuda"
    tables = (_dataset_tables(dataset_or_prompts, prompt_column, batch_size) if is_dataset
              else _list_tables(prompts, prompt_column, batch_size))
    blocks = ray.data.from_arrow(tables)  # one block per batch: the unit an actor decodes
    worker_args = dict(sources, device=device, dtype=dtype, threads=threads_per_worker,
                       use_chat_template=use_chat_template, overrides=config_fields, prompt_column=prompt_column,
                       seed=seed)
    mapped = blocks.map_batches(
        BatchGenerator, batch_size=None, batch_format="pyarrow", fn_constructor_kwargs=worker_args,
        compute=ray.data.ActorPoolStrategy(size=min(num_workers, len(tables))), num_cpus=threads_per_worker,
        num_gpus=1 if on_gpu else None)
    mapped.context.execution_options.preserve_order = True  # the context is this run's own copy
    if is_dataset:
        return mapped
    try:
        rows = [row for table in mapped.iter_batches(batch_size=None, batch_format="pyarrow")
                for row in table.to_pylist()]
    except Exception as error:  # noqa: BLE001  (Ray wraps what the actors raised)
        refused = _value_error(error)
        if refused is None:
            raise
        raise ValueError(refused) from error
    rows.sort(key=lambda row: row["index"])
    return [{key: row[key] for key in ("index", prompt_column, *RESULT_COLUMNS[1:]) if key in row} for row in rows]


def check_settings(model: str, *, assistant_model: str | None = None, peft: str | None = None, device: str = "cpu",
                   dtype: str | None = None, **config_fields) -> dict[str, str | None]:
    """What `generate_dataset` checks before any actor starts (`dlm-generate --ray` before it starts Ray): the config
    fields, the dtype and device names, and that the model, guide and adapter are existing folders or Hub ids.
    Returns them as the actors get them (`{"model", "assistant_model", "peft"}`, local folders made absolute: an
    actor's working folder may differ); raises `ValueError` (`loading.load_models`' message) for the first mistake."""
    from .configuration_diffusion import DiffusionGenerationConfig
    from .loading import check_model_source, resolve_dtype

    DiffusionGenerationConfig(**config_fields)
    resolve_dtype(dtype)
    _device_type(device)  # whether the actors' machines have it, they check

    def source(value, what, marker="config.json"):
        if not value:
            return None
        checked = check_model_source(value, what, marker)
        return os.path.abspath(checked) if os.path.isdir(checked) else checked

    return {"model": source(model, "model"), "assistant_model": source(assistant_model, "assistant model"),
            "peft": source(peft, "PEFT adapter", "adapter_config.json")}


def totals(rows: list[dict]) -> dict:
    """The run's stats as `dlm-generate` adds them up: each batch's nfe, seconds and guide forwards once, tokens per
    row (`{"nfe", "tokens", "seconds", "guide_forwards"}`; guide_forwards None without a guide)."""
    batches = {row["batch"]: row for row in rows}
    guided = [row["guide_forwards"] for row in batches.values() if row.get("guide_forwards") is not None]
    return {"nfe": sum(row["nfe"] for row in batches.values()), "tokens": sum(row["tokens"] for row in rows),
            "seconds": sum(row["seconds"] for row in batches.values()),
            "guide_forwards": sum(guided) if guided else None}


class BatchGenerator:
    """The actor's callable: loads the model once, decodes each batch of a block with `cli.generate_prompts`."""

    def __init__(self, model: str, assistant_model: str | None, peft: str | None, device: str, dtype: str | None,
                 threads: int, use_chat_template: bool, overrides: dict, prompt_column: str, seed: int | None):
        import torch

        from .cli import uses_chat_template
        from .loading import load_models

        torch.set_num_threads(threads)
        self.model, self.tokenizer, self.guide = load_models(model, assistant_model, device, dtype, peft)
        self.device = device
        self.use_template = uses_chat_template(self.tokenizer, raw=not use_chat_template)
        self.overrides = dict(overrides)
        self.copies = self.overrides.get("num_return_sequences") or 1
        self.prompt_column = prompt_column
        self.seed = seed

    def __call__(self, table):
        import pyarrow as pa
        import torch

        from .cli import generate_prompts

        columns = {name: [] for name in RESULT_COLUMNS[2:]}
        numbers = table.column("batch").to_pylist()
        prompts = table.column(self.prompt_column).to_pylist()
        start = 0
        while start < len(numbers):  # a block is one batch; were it ever more, each batch is decoded on its own
            stop = start + 1
            while stop < len(numbers) and numbers[stop] == numbers[start]:
                stop += 1
            if self.seed is not None:
                torch.manual_seed(self.seed + numbers[start])
            with torch.inference_mode():
                completions, stats = generate_prompts(self.model, self.tokenizer, self.guide, prompts[start:stop],
                                                      self.overrides, self.use_template, self.device)
            for row in range(stop - start):
                mine = slice(row * self.copies, (row + 1) * self.copies)
                tokens = sum(stats["lengths"][mine])
                columns["completion"].append(completions[mine][0])
                columns["completions"].append(completions[mine])
                columns["tokens"].append(tokens)
                columns["nfe"].append(stats["nfe"])
                columns["tokens_per_forward"].append(tokens / max(stats["nfe"], 1))
                columns["seconds"].append(stats["seconds"])
                columns["guide_forwards"].append(stats["guide_forwards"])
            start = stop
        if self.guide is None:
            del columns["guide_forwards"]
        types = {"completions": pa.list_(pa.string()), "tokens": pa.int64(), "nfe": pa.int64(),
                 "tokens_per_forward": pa.float64(), "seconds": pa.float64(), "completion": pa.string(),
                 "guide_forwards": pa.int64()}
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values, type=types[name]))
        return table


# ------------------------------------------------------------------------------------------------------ helpers
def _device_type(device) -> str:
    import torch

    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device: pass cpu or cuda") from None


def _check_counts(**counts: Any) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")


def _prompt_list(prompts) -> list[str]:
    if isinstance(prompts, (str, bytes)):
        raise ValueError("pass a list of prompt strings (or a ray.data.Dataset), not a single string: [prompt]")
    try:
        prompts = list(prompts)
    except TypeError:
        raise ValueError(f"pass a list of prompt strings or a ray.data.Dataset, got {type(prompts).__name__}") \
            from None
    if not prompts:
        raise ValueError("no prompts to decode: the list is empty")
    _check_prompts(prompts, 0, "prompt")
    return prompts


def _check_prompts(prompts: list, offset: int, what: str) -> None:
    for number, prompt in enumerate(prompts, offset):
        if not isinstance(prompt, str):
            raise ValueError(f"{what} {number} is {type(prompt).__name__} {prompt!r}, not a string")


def _batch_table(columns: dict, start: int, batch: int, batch_size_here: int):
    import pyarrow as pa

    taken = [name for name in columns if name in RESULT_COLUMNS]
    if taken:
        raise ValueError(f"the dataset already has the column(s) {', '.join(taken)}, which generate_dataset "
                         f"writes; rename them first (ds.rename_columns)")
    table = pa.table(columns)
    table = table.append_column("index", pa.array(range(start, start + batch_size_here), type=pa.int64()))
    return table.append_column("batch", pa.array([batch] * batch_size_here, type=pa.int64()))


def _list_tables(prompts: list[str], column: str, batch_size: int) -> list:
    return [_batch_table({column: prompts[start:start + batch_size]}, start, start // batch_size,
                         len(prompts[start:start + batch_size])) for start in range(0, len(prompts), batch_size)]


def _dataset_tables(dataset, column: str, batch_size: int) -> list:
    """The Dataset's rows in order, cut into `batch_size` tables with `index` and `batch` columns."""
    options = dataset.context.execution_options
    preserved, options.preserve_order = options.preserve_order, True
    try:
        tables, start = [], 0
        for table in dataset.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            if column not in table.column_names:
                raise ValueError(f"the dataset has no prompt column {column!r} (its columns: "
                                 f"{', '.join(table.column_names)}); pass prompt_column=")
            _check_prompts(table.column(column).to_pylist(), start, f"{column!r} of row")
            tables.append(_batch_table({name: table.column(name) for name in table.column_names}, start,
                                       len(tables), table.num_rows))
            start += table.num_rows
    finally:
        options.preserve_order = preserved
    if not tables:
        raise ValueError("no prompts to decode: the dataset is empty")
    return tables


def _value_error(error: BaseException) -> str | None:
    """The message of the ValueError an actor raised (a refused prompt, a model that is no diffusion model), from the
    errors Ray wraps it in: their chain of causes, else the `ValueError: ...` line of Ray's report (None if none)."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current) is ValueError:
            return str(current)
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else (current.__cause__ or current.__context__)
    found = re.search(r"^ValueError: (.+)$", re.sub(r"\x1b\[[0-9;]*m", "", str(error)), re.M)
    return found.group(1).strip() if found else None
