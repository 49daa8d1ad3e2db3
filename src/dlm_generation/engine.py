"""`DiffusionEngine`: continuous batching over the denoising step.

`diffusion_generate` decodes one batch from start to end: every row waits for the slowest. The engine keeps one
decode state per request (the same `DecodeState` / `DecodeRules` a `diffusion_generate` call builds for that prompt
alone) and advances all of them by one denoising step per `step()`: each request plans its own step (its block, its
window, its cache's plan), the plans run as one model forward (one per group of similar query counts, so that a
block's few-query cached steps are not padded to a whole-canvas forward), and each request commits from its own
logits.
Requests join at the next step and leave when they finish, so a short request that arrives while a long one decodes
finishes first.

Why a request's tokens equal its solo `diffusion_generate` call: its decisions (schedule, policy, thresholds, cache
plan, stop rules) are made on its own state by the same methods the call uses; only the forward is shared. In the
shared forward each request's queries are left-padded to the longest, and its keys (the ones its own cache returns)
are left-padded to the longest key range, with an attention mask that hides the padding from it: a row attends to
exactly the keys it attends to alone. (Float results can differ from a solo forward in the last bits, as in any
padded batch, which can only matter where two candidates tie to within rounding.)

Which requests share the forward: those whose cache only supplies keys and values (no cache, the prefix and dual
caches, FreeCache). A cache that recomputes a subset of rows per layer (dLLM-Cache) or reads attention weights
(d2Cache) runs its request in a forward of its own, in the same `step()`; nothing about it changes.
"""

from __future__ import annotations

import copy
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .diffusion_cache import DiffusionCache
from .generation_utils import DecodeRules, DecodeState, PlannedStep, shared_forwards


class EngineFullError(RuntimeError):
    """`add_request` when the engine's queue of waiting requests is full (a server answers 429: retry later)."""


@dataclass
class RequestOutput:
    """What `DiffusionEngine.step()` reports about one request.

    Attributes:
        request_id: the id given to `add_request`.
        token_ids: the settled generated tokens so far: those before the first masked position, cut before the
            first stop token (a finished request: its whole completion without the stop token or padding).
        new_token_ids: the part of `token_ids` that is new since this request's previous output.
        text / new_text: `token_ids` / the new part decoded (special tokens skipped); None without a tokenizer.
        finished: True in the request's last output.
        finish_reason: when finished: "stop" (a stop token, stop string or stopping rule ended it), "length" (the
            canvas filled without a stop), "abort" never appears (an aborted request reports nothing), or "error"
            (`error` says what went wrong; other requests are not affected).
        nfe: forwards this request took part in so far (its `nfe` in a solo `diffusion_generate` call).
        commit_steps: when finished, per generated position the forward (1-based) after which it was settled, as
            `diffusion_generate(..., output_commit_steps=True)` returns it.
        canvas: the generated canvas in progress (mask ids where nothing is committed yet), for clients that draw it.
        prompt_tokens: the prompt's length.
    """

    request_id: str
    token_ids: list[int]
    new_token_ids: list[int]
    text: str | None
    new_text: str | None
    finished: bool
    finish_reason: str | None
    nfe: int
    prompt_tokens: int
    commit_steps: list[int] | None = None
    canvas: list[int] | None = None
    error: str | None = None


@dataclass
class _Request:
    request_id: str
    input_ids: torch.Tensor  # (1, prompt_len)
    config: Any
    guidance: dict | None
    hidden_ids: list
    rows: int  # forward rows (2 with classifier-free guidance)
    state: DecodeState | None = None
    rules: DecodeRules | None = None
    planned: PlannedStep | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""


def _shares_forward(cache: DiffusionCache) -> bool:
    """True when the cache only supplies keys and values (`update`): its request can run in a shared forward."""
    base = DiffusionCache
    return (not cache.needs_attention_weights
            and type(cache).recompute_rows is base.recompute_rows
            and type(cache).reuse is base.reuse
            and type(cache).observe_attention is base.observe_attention)


class DiffusionEngine:
    """Continuous batching for a diffusion LM: requests join and leave a running batch at every denoising step.

    The verbs follow vLLM's engine: `add_request`, `step`, `abort_request`, `has_unfinished_requests`.

    ```python
    engine = DiffusionEngine(model, tokenizer, max_batch_size=16)
    engine.add_request("a", tokenizer("...").input_ids, max_new_tokens=256)
    while engine.has_unfinished_requests():
        for output in engine.step():
            print(output.request_id, output.new_text, output.finished)
    ```

    Each request's tokens equal a solo `model.diffusion_generate(prompt[None], **settings)` call (greedy), whatever
    runs beside it: the engine keeps one decode state per request and shares only the forward (see the module
    docstring). Settings are resolved per request as in `diffusion_generate` (request kwargs > `generation_config` >
    the model's generation_config > family and library defaults) and validated at `add_request`.

    Args:
        model: a diffusion LM of this library (LLaDA, Dream, ...), in eval mode.
        tokenizer: for `text` / `new_text` in the outputs and for `stop_strings` (optional).
        max_batch_size: forward rows decoded at once (a request with classifier-free guidance takes two); requests
            beyond it wait, first come first served.
        max_queued_requests: requests allowed to wait beyond the rows the batch has free (0: refuse a request when
            every row is taken) before `add_request` raises `EngineFullError` (None: no limit).
        max_canvas_length: the longest prompt + max_new_tokens a request may ask for (default: the model's position
            limit); a longer request is refused at `add_request`.
        assistant_model: the AR guide for requests whose config sets `guidance` (as in `diffusion_generate`).
        scheduling: "continuous" (default: a waiting request joins at the next step with a free row) or "static"
            (waiting requests join only when the running batch has finished entirely: the batch waits for its
            slowest row, as `diffusion_generate` on a batch does; kept for comparisons).
    """

    def __init__(self, model, tokenizer=None, max_batch_size: int = 16, max_queued_requests: int | None = None,
                 max_canvas_length: int | None = None, assistant_model=None, scheduling: str = "continuous"):
        if scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling must be 'continuous' or 'static', got {scheduling!r}.")
        self.scheduling = scheduling
        if not hasattr(model, "_next_step"):
            raise ValueError(f"DiffusionEngine needs a diffusion LM of dlm-generation (LLaDA, Dream, ...); got "
                             f"{type(model).__name__}.")
        for name, value, least in (("max_batch_size", max_batch_size, 1), ("max_queued_requests", max_queued_requests, 0),
                                   ("max_canvas_length", max_canvas_length, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")
        self.model, self.tokenizer, self.assistant_model = model, tokenizer, assistant_model
        self.max_batch_size, self.max_queued_requests = max_batch_size, max_queued_requests
        self.max_canvas_length = max_canvas_length
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._ids = set()
        self.forwards = 0  # model forwards run (per step: one per bucket of similar query counts, one per non-sharing request)

    # ------------------------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, input_ids, generation_config=None, **kwargs) -> None:
        """Queue a prompt; it joins the running batch at the next `step()` with a free row.

        Args:
            request_id: a unique id (in use: `ValueError`).
            input_ids: the prompt's token ids: a list of ints, a 1-D tensor, a (1, prompt_len) tensor, or what a
                tokenizer returns for one prompt (`tokenizer(text)`, `tokenizer.apply_chat_template(messages)`).
            generation_config: a `DiffusionGenerationConfig` for this request (the model's own when None).
            kwargs: any `DiffusionGenerationConfig` field (`max_new_tokens`, `threshold`, `cache_implementation`, ...).

        Raises:
            ValueError: an invalid setting or prompt (the message `diffusion_generate` gives), a request that can
                never fit (more rows than `max_batch_size`, a canvas longer than `max_canvas_length`).
            EngineFullError: `max_queued_requests` requests are already waiting.
        """
        request_id = str(request_id)
        if request_id in self._ids:
            raise ValueError(f"request_id {request_id!r} is already in the engine; use a new id per request.")
        if self.max_queued_requests is not None and self.queued_beyond_free_rows() >= self.max_queued_requests:
            raise EngineFullError(f"every one of the {self.max_batch_size} rows is taken and "
                                  f"{self.queued_beyond_free_rows()} request(s) already wait for one "
                                  f"(max_queued_requests={self.max_queued_requests}); retry later.")
        model = self.model
        if hasattr(input_ids, "keys") and "input_ids" in input_ids:  # a tokenizer's BatchEncoding / dict
            input_ids = input_ids["input_ids"]
        if isinstance(input_ids, (list, tuple)) and len(input_ids) == 1 and isinstance(input_ids[0], (list, tuple)):
            input_ids = input_ids[0]
        if isinstance(input_ids, (list, tuple)):
            if not input_ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in input_ids):
                raise ValueError("input_ids must be a non-empty list of token ids (ints), e.g. "
                                 "tokenizer(prompt).input_ids.")
            input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
        elif isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
            input_ids = input_ids[None]
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(f"add_request takes one prompt; got input_ids of shape {tuple(input_ids.shape)}. "
                             "Add one request per prompt.")
        config = model._prepare_generation_config(generation_config, dict(kwargs))
        input_ids, _ = model._prepare_prompt(input_ids, None, config)
        if config.num_return_sequences != 1:
            raise ValueError(f"num_return_sequences={config.num_return_sequences}: the engine decodes one sequence "
                             "per request; add that many requests (each with its own id) instead.")
        config = model._resolve_lengths(config, input_ids.shape[1])
        length = input_ids.shape[1] + config.max_new_tokens
        if self.max_canvas_length is not None and length > self.max_canvas_length:
            raise ValueError(f"The prompt ({input_ids.shape[1]} tokens) plus max_new_tokens ({config.max_new_tokens}) "
                             f"needs {length} positions, more than this engine's max_canvas_length "
                             f"({self.max_canvas_length}); shorten the prompt or lower max_new_tokens.")
        config.output_commit_steps = True
        rows = 2 if config.cfg_scale > 0 else 1
        if rows > self.max_batch_size:
            raise ValueError(f"This request needs {rows} forward rows (classifier-free guidance runs the prompt twice) "
                             f"but the engine's max_batch_size is {self.max_batch_size}.")
        guidance, _, hidden_ids = model._prepare_guidance(config, self.assistant_model if config.guidance is not None
                                                          else None, self.tokenizer, None, input_ids.device)
        if config.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer to read the text: create the engine with "
                             "DiffusionEngine(model, tokenizer).")
        self.waiting.append(_Request(request_id, input_ids, config, guidance, hidden_ids, rows))
        self._ids.add(request_id)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request (waiting or running) and free its row; it reports nothing more. False if unknown."""
        request_id = str(request_id)
        for queue in (self.waiting, self.running):
            for request in list(queue):
                if request.request_id == request_id:
                    queue.remove(request)
                    self._release(request)
                    return True
        return False

    def has_unfinished_requests(self) -> bool:
        """True while a request is waiting or running."""
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def rows_in_use(self) -> int:
        """Forward rows taken by running requests (at most `max_batch_size`)."""
        return sum(r.rows for r in self.running)

    def queued_beyond_free_rows(self) -> int:
        """Waiting requests that the next step will not admit (admission is first come, first served)."""
        used, beyond = self.rows_in_use, 0
        static_full = self.scheduling == "static" and bool(self.running)
        for request in self.waiting:
            if beyond == 0 and not static_full and used + request.rows <= self.max_batch_size:
                used += request.rows
            else:
                beyond += 1
        return beyond

    # ------------------------------------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Admit waiting requests into free rows, advance every running request by one denoising step (one shared
        forward), and report each running request: its settled text so far, and for those that finished, the end
        (a request is reported finished at the step whose commits finished it)."""
        admitted, outputs = self._admit()
        outputs += [output for output in map(self._plan, admitted) if output is not None]
        stepping = [r for r in self.running if r.planned is not None]
        shares = [_shares_forward(r.state.cache) for r in stepping]
        shared = [r for r, share in zip(stepping, shares) if share]
        groups = ([shared] if shared else []) + [[r] for r, share in zip(stepping, shares) if not share]
        for group in groups:
            try:
                entries = [(self.model._step_inputs(r.state, r.rules, r.planned), r.state.cache) for r in group]
                all_logits, forwards = shared_forwards(self.model, entries)
                self.forwards += forwards
            except Exception as error:  # noqa: BLE001 - a failed forward fails its requests, not the engine
                outputs.extend(self._fail(r, error) for r in group)
                continue
            for request, logits in zip(group, all_logits):
                try:
                    self.model._finish_step(request.state, request.rules, request.planned, logits)
                except Exception as error:  # noqa: BLE001 - one request's failure is its own
                    outputs.append(self._fail(request, error))
                    continue
                outputs.append(self._plan(request) or self._report(request))
        return outputs

    def _plan(self, request: _Request) -> RequestOutput | None:
        """Plan the request's next step; its final output when it has none (None while it runs on)."""
        try:
            request.planned = self.model._next_step(request.state, request.rules)
        except Exception as error:  # noqa: BLE001 - e.g. non-finite logits: this request's error
            return self._fail(request, error)
        return self._finish(request) if request.planned is None else None

    def _admit(self) -> tuple[list[_Request], list[RequestOutput]]:
        """Move waiting requests into free rows (first come, first served); returns those admitted, and the error
        outputs of those whose decode state could not be built."""
        admitted, failed = [], []
        if self.scheduling == "static" and self.running:
            return admitted, failed
        used = sum(r.rows for r in self.running)
        while self.waiting and used + self.waiting[0].rows <= self.max_batch_size:
            request = self.waiting.popleft()
            try:
                request.state, request.rules = self.model._start_decoding(
                    request.input_ids, None, request.config, guidance=request.guidance,
                    assistant_model=self.assistant_model, hidden_ids=request.hidden_ids, tokenizer=self.tokenizer,
                )
            except Exception as error:  # noqa: BLE001 - e.g. out of memory: this request fails, the engine goes on
                failed.append(self._fail(request, error))
                continue
            self.running.append(request)
            admitted.append(request)
            used += request.rows
        return admitted, failed

    def _release(self, request: _Request) -> None:
        self._ids.discard(request.request_id)
        if request.state is not None:
            request.state.cache.end_generation()

    def _settled(self, request: _Request) -> list[int]:
        state, rules = request.state, request.rules
        generated = state.canvas[0, state.prompt_len:]
        masks = (generated == rules.mask_id).nonzero()
        settled = generated[: int(masks[0]) if len(masks) else len(generated)]
        stops = torch.isin(settled, rules.stop_ids).nonzero()
        if len(stops):
            settled = settled[: int(stops[0])]
        ids = settled.tolist()
        if bool(state.finished[0]):  # a stop string or stopping rule fills what follows with padding
            pad_id = self.model._pad_id(request.config)
            while ids and ids[-1] == pad_id and pad_id not in (rules.stop_ids.tolist() or [None]):
                ids.pop()
        return ids

    def _report(self, request: _Request, finished: bool = False, reason: str | None = None,
                error: str | None = None) -> RequestOutput:
        state = request.state
        ids = self._settled(request) if state is not None else []
        new_ids = ids[len(request.token_ids):] if ids[: len(request.token_ids)] == request.token_ids else ids
        request.token_ids = ids
        text = new_text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if not finished and text.endswith("\ufffd"):  # a character cut in the middle of its bytes: wait for it
                text = request.text
            new_text = text[len(request.text):] if text.startswith(request.text) else text
            request.text = text
        commit_steps = None
        if finished and state is not None and state.commit_steps is not None:
            commit_steps = state.commit_steps[0].tolist()
        return RequestOutput(
            request_id=request.request_id, token_ids=list(ids), new_token_ids=new_ids, text=text, new_text=new_text,
            finished=finished, finish_reason=reason, nfe=state.nfe if state is not None else 0,
            prompt_tokens=request.input_ids.shape[1], commit_steps=commit_steps,
            canvas=state.canvas[0, state.prompt_len:].tolist() if state is not None else None, error=error,
        )

    def _finish(self, request: _Request) -> RequestOutput:
        state, rules = request.state, request.rules
        generated = state.canvas[0, state.prompt_len:]
        stopped = bool(state.finished[0]) or bool(torch.isin(generated, rules.stop_ids).any())
        output = self._report(request, finished=True, reason="stop" if stopped else "length")
        self.running.remove(request)
        self._release(request)
        return output

    def _fail(self, request: _Request, error: Exception) -> RequestOutput:
        output = self._report(request, finished=True, reason="error", error=f"{type(error).__name__}: {error}")
        if request in self.running:
            self.running.remove(request)
        self._release(request)
        return output

    # ------------------------------------------------------------------------------------------- convenience
    def generate(self, prompts: list, generation_config=None, **kwargs) -> list[RequestOutput]:
        """Run prompts (token id lists) to completion through the engine; returns their final outputs in order."""
        ids = [f"generate-{next(_counter)}" for _ in prompts]
        for request_id, prompt in zip(ids, prompts):
            self.add_request(request_id, prompt, generation_config, **copy.deepcopy(kwargs))
        final = {}
        while any(i not in final for i in ids):
            for output in self.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[i] for i in ids]


_counter = itertools.count()
