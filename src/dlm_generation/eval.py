"""lm-evaluation-harness integration: the `dlm` model type and the `dlm-eval` command.

    dlm-eval run --model dlm --model_args pretrained=model_cards/tiny-llada-chain-arith,threshold=0.9 \\
        --tasks chain_arith --limit 50

`dlm-eval` is lm-eval's own command line with this model type registered and this package's tasks (`chain_arith`)
on the task path. From Python: `import dlm_generation.eval` registers `dlm` for `lm_eval.simple_evaluate(model="dlm",
model_args=...)`, or pass `DiffusionLM(...)` as the model.

`--model_args` take `pretrained` (folder or Hub id), `dtype`, `device`, `batch_size`, `peft` (a LoRA adapter),
`assistant_model` (an AR guide), `mc_num` (Monte Carlo samples per log-likelihood, 128) and every field of
`DiffusionGenerationConfig` (values read as JSON, so `cache_config={"window_left":64}` works in Python; on the
command line lm-eval splits arguments on commas). `--gen_kwargs` may set any config field per run as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .cli import parse_value
from .configuration_diffusion import LIBRARY_DEFAULTS, DiffusionGenerationConfig
from .generation_utils import generated_lengths
from .loading import load_models

TASKS_PATH = Path(__file__).resolve().parent / "lm_eval_tasks"
_INSTANCES: list = []  # the DiffusionLM instances of this process (dlm-eval prints their speed)
MODEL_KEYS = {"pretrained", "dtype", "device", "batch_size", "peft", "assistant_model", "mc_num", "trust_remote_code",
              "max_batch_size"}


@register_model("dlm")
class DiffusionLM(TemplateLM):
    """A LLaDA or Dream model of this library for lm-eval: `generate_until` through `diffusion_generate` (batched,
    left-padded), `loglikelihood` by the Monte Carlo estimate LLaDA's evaluation uses."""

    def __init__(self, pretrained: str, dtype: str | None = None, device: str | None = None, batch_size: int | str = 8,
                 peft: str | None = None, assistant_model: str | None = None, mc_num: int = 128, **config):
        super().__init__()
        config.pop("trust_remote_code", None)  # lm-eval adds it; the installed package needs no remote code
        config.pop("max_batch_size", None)
        unknown = sorted(set(config) - set(LIBRARY_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown model_args {unknown} for the dlm model: use {sorted(MODEL_KEYS)} or fields of "
                             "DiffusionGenerationConfig")
        self.config = {name: parse_value(value, name, flag=name) for name, value in config.items()}
        DiffusionGenerationConfig(**self.config)  # bad values fail here, with the config's message
        self.batch_size = 8 if batch_size in (None, "auto") else int(batch_size)
        self.mc_num = int(mc_num)
        if self.batch_size < 1 or self.mc_num < 1:
            raise ValueError(f"batch_size and mc_num must be positive, got {batch_size} and {mc_num}")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's own default is cuda:0
                print(f"dlm: CUDA is not available, running on cpu instead of {device} (pass --device cpu)",
                      file=sys.stderr)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch: data parallel
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=self._device.type == "cpu")
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            if self._device.type == "cuda":
                self._device = self.accelerator.device
        # the command line's loader: paths checked at once, a left-padding tokenizer, models in eval mode
        model, self.tokenizer, self.guide = load_models(pretrained, assistant_model, self._device, dtype, peft)
        self.model = model
        self.mask_token_id = getattr(model.generation_config, "mask_token_id", None)
        if self.mask_token_id is None:
            self.mask_token_id = model.config.mask_token_id
        vocab = model.get_input_embeddings().num_embeddings
        if self.mask_token_id is None or not 0 <= self.mask_token_id < vocab:
            raise ValueError(f"{pretrained} has no usable mask_token_id in its config or generation_config (got "
                             f"{self.mask_token_id}, vocabulary [0, {vocab})); set it to the id of the model's mask "
                             "token (tokenizer.mask_token_id) in config.json.")
        self.logits_shift = getattr(model, "diffusion_logits_shift", 0)
        self.chat_applied = False
        self.stats = {"calls": 0, "nfe": 0, "tokens": 0, "seconds": 0.0, "rows": 0, "row_rates": 0.0}
        _INSTANCES.append(self)

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.chat_applied = True  # the template writes the special tokens itself
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = not self.chat_applied
        return self.tokenizer(string, add_special_tokens=add_special_tokens).input_ids

    # data parallel (accelerate launch): lm-eval shards the requests by rank and gathers through these
    def all_gather(self, tensor):
        return tensor if self.world_size <= 1 else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def get_model_info(self) -> dict:
        """Added by lm-eval to the results' `config` (saved with them): the decoding settings and the run's speed
        (this process's calls; with data parallel, rank 0's share)."""
        return {"dlm_config": self.config, "dlm_speed": self.speed(), "dlm_processes": self.world_size}

    def speed(self) -> dict[str, float]:
        """NFE, tokens per forward (per row, as the benchmark counts) and tokens/s over this instance's calls."""
        stats = self.stats
        return {"generate_calls": stats["calls"], "nfe": stats["nfe"],
                "nfe_per_call": stats["nfe"] / max(stats["calls"], 1),
                # per row, as the benchmark counts it: a row's generated tokens / its call's forwards, averaged
                "tokens_per_forward": stats["row_rates"] / max(stats["rows"], 1),
                "tokens_per_second": stats["tokens"] / max(stats["seconds"], 1e-9), "seconds": stats["seconds"]}

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched `diffusion_generate` per group of identical gen_kwargs; text cut at the first `until` string.

        `max_gen_toks` becomes `max_new_tokens`, rounded up to a multiple of the block length in force."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        bar = tqdm(total=len(requests), desc="dlm generate_until", disable=disable_tqdm or self.rank != 0)
        for key, indices in groups.items():
            kwargs = dict(json.loads(key))
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            settings = {**self.config, **{k: parse_value(v, k, flag=k) for k, v in kwargs.items()
                                          if k in LIBRARY_DEFAULTS}}
            settings["max_new_tokens"] = self._canvas(kwargs.get("max_gen_toks", settings.get("max_new_tokens")),
                                                      settings)
            if not kwargs.get("do_sample", False) and "temperature" not in settings:
                settings["temperature"] = 0.0
            settings.setdefault("eos_early_stop", True)  # lossless for the text up to EOS
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], settings)
                for i, text in zip(chunk, texts):
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results

    def _canvas(self, wanted, settings) -> int:
        wanted = int(wanted or getattr(self.model.generation_config, "max_new_tokens", None) or 256)
        block = settings.get("block_length", getattr(self.model.generation_config, "block_length", None))
        return -(-wanted // block) * block if block else wanted

    def _generate(self, contexts: list[str], settings: dict) -> list[str]:
        encoded = [self.tok_encode(c) for c in contexts]
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=self._device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=self._device)
        extra = {"assistant_model": self.guide} if self.guide is not None else {}
        began = time.perf_counter()
        with torch.inference_mode():
            out = self.model.diffusion_generate(ids, attention_mask=mask, return_dict_in_generate=True,
                                                tokenizer=self.tokenizer, **settings, **extra)
        self.stats["seconds"] += time.perf_counter() - began
        generated = out.sequences[:, width:]
        texts = []
        for row, cut in zip(generated.tolist(), generated_lengths(generated, self.eot_token_id).tolist()):
            self.stats["tokens"] += cut
            self.stats["rows"] += 1
            self.stats["row_rates"] += cut / max(out.nfe, 1)
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        self.stats["calls"] += 1
        self.stats["nfe"] += out.nfe
        return texts

    # ------------------------------------------------------------------ log-likelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """log p(continuation | context) by Monte Carlo over masked-diffusion states (LLaDA's evaluation).

        For each sample the continuation's L tokens get m masks (m stratified over 1..L across the `mc_num` samples,
        positions uniformly random); the estimate is the mean over samples of -(L / m) x the cross-entropy summed
        over the masked positions (the ELBO's 1/t weighting with t = m / L). The draws are seeded by the request's
        tokens, so a score does not depend on batching or on which process computes it. `is_greedy`: with the
        whole continuation masked, every position's argmax is its token."""
        results = []
        for cache_key, context, continuation in tqdm(requests, desc="dlm loglikelihood",
                                                     disable=disable_tqdm or self.rank != 0):
            results.append(self._score(context, continuation))
            self.cache_hook.add_partial("loglikelihood", cache_key, results[-1])
        return results

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        sequence = torch.tensor(context + continuation, device=self._device)
        length, prompt = len(continuation), len(context)
        seed = int.from_bytes(hashlib.sha256(json.dumps([context, continuation]).encode()).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.rand((), generator=generator)
        counts = ((torch.arange(self.mc_num) + offsets) * length / self.mc_num).long().clamp(0, length - 1) + 1
        total = 0.0
        for start in range(0, self.mc_num, self.batch_size):
            batch_counts = counts[start:start + self.batch_size]
            ranks = torch.rand(len(batch_counts), length, generator=generator).argsort(-1).argsort(-1)
            masked = ranks < batch_counts[:, None]  # m random positions per sample
            noisy = sequence.repeat(len(batch_counts), 1)
            noisy[:, prompt:] = torch.where(masked.to(self._device), self.mask_token_id, noisy[:, prompt:])
            token_loss = self._continuation_loss(noisy, sequence, prompt)
            weighted = (token_loss * masked.to(token_loss.device)).sum(-1) * length / batch_counts.to(token_loss.device)
            total += float(weighted.sum())
        noisy = sequence.clone()[None]
        noisy[0, prompt:] = self.mask_token_id
        greedy = bool((self._continuation_logits(noisy, prompt).argmax(-1)[0] == sequence[prompt:]).all())
        return -total / self.mc_num, greedy

    def _continuation_logits(self, noisy: torch.Tensor, prompt: int) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(input_ids=noisy).logits.float()
        shift = self.logits_shift  # a shifted model (Dream) reads position i's prediction at i - 1
        return logits[:, prompt - shift:noisy.shape[1] - shift]

    def _continuation_loss(self, noisy: torch.Tensor, sequence: torch.Tensor, prompt: int) -> torch.Tensor:
        logits = self._continuation_logits(noisy, prompt)
        targets = sequence[prompt:].expand(noisy.shape[0], -1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction="none").view(noisy.shape[0], -1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "loglikelihood_rolling (perplexity tasks such as wikitext) is not supported by the dlm model: a masked "
            "diffusion model has no left-to-right factorisation to roll over; use generate_until or loglikelihood "
            "(multiple-choice) tasks."
        )


def main(argv: list[str] | None = None) -> None:
    """`dlm-eval`: lm-eval's command line with the `dlm` model and this package's tasks available."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")  # lm-eval's own shorthand: arguments without a subcommand mean `run`
    if argv and argv[0] in ("run", "ls", "validate") and "--include_path" not in argv:
        argv += ["--include_path", str(TASKS_PATH)]
    setup_logging()
    parser = HarnessCLI()
    saved, sys.argv = sys.argv, ["dlm-eval", *argv]  # HarnessCLI reads sys.argv
    try:
        args = parser.parse_args()
    finally:
        sys.argv = saved
    parser.execute(args)
    for instance in _INSTANCES:
        print(f"dlm speed: {json.dumps({k: round(v, 3) for k, v in instance.speed().items()})}")


if __name__ == "__main__":  # accelerate launch -m dlm_generation.eval run ...
    main()
