"""`dlm-serve`: an OpenAI-compatible HTTP server for diffusion LMs, on Ray Serve and `DiffusionEngine`.

    dlm-serve model_cards/tiny-llada-chain-arith --port 8000
    dlm-serve MODEL --num-replicas 2 --max-batch-size 16 --max-queued-requests 64 --api-key SECRET

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="SECRET")
    client.chat.completions.create(model="model_cards/tiny-llada-chain-arith",
                                   messages=[{"role": "user", "content": "Start with 12. Add 30."}],
                                   max_tokens=32, extra_body={"threshold": 0.9, "cache_implementation": "dual"})

Each Ray Serve replica loads the model once and owns one `DiffusionEngine`. The engine is not thread-safe, so one
thread per replica (the *stepping thread*) owns it: HTTP handlers hand it submissions and aborts through a
thread-safe queue, it steps the engine continuously while there is work (continuous batching: requests join and leave
the running batch at every denoising step), and it delivers each request's outputs to that request's asyncio queue
(`loop.call_soon_threadsafe`). Each request's text equals a solo `model.diffusion_generate` call with the same
settings (see `engine.py`).

Endpoints (every one answers 401 without `Authorization: Bearer KEY` when the server has a key):

- `GET /v1/models`, `GET /v1/models/{id}`: the served model (with a `dlm` field: engine limits, live counts and the
  answering replica's process id, `pid`).
- `POST /v1/completions`: `prompt` is a string, a list of strings, a list of token ids or a list of such lists (one
  choice per prompt); a string is tokenized as `tokenizer(prompt).input_ids`. `echo` prepends the prompt text.
- `POST /v1/chat/completions`: `messages` rendered by the model's chat template
  (`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`).

Request fields: `model` (the served name), `max_tokens` / `max_completion_tokens` (the canvas, `max_new_tokens`),
`temperature`, `top_p`, `stop` (`stop_strings`; the returned text ends before the stop string), `stream`,
`stream_options.include_usage`, and every `DiffusionGenerationConfig` field as an extra field (`threshold`,
`block_length`, `steps`, `cache_implementation`, `cache_config`, `alg`, `eos_early_stop`, ...; the OpenAI client
passes them with `extra_body=`); a field left out keeps the model's generation_config.json, an explicit `null` asks
for the library's default. OpenAI features diffusion decoding does not have (`n` > 1, `logprobs`, `best_of`,
penalties, `logit_bias`, `seed`, tools, structured output, ...) answer 400 saying so.

Responses follow OpenAI's shapes. `usage` adds `nfe` (the forwards each request took part in, summed over choices)
and `tokens_per_forward` (completion tokens / nfe); each choice has a `dlm` field with its `token_ids`,
`commit_steps` (the forward after which each token settled) and `nfe`. `stream: true` answers server-sent events:
one chunk per engine output with the newly settled text, the canvas in progress as `"dlm": {"canvas": [token ids,
mask ids where undecided], "nfe": n}`, the finish reason on the choice's last chunk, a usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`.

Errors (OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`): an invalid setting or prompt, an
unknown field, a request longer than the model (or `--max-canvas-length`) allows: 400 with the config's or engine's
own message; an unknown model name: 404; the engine queue full (`--max-queued-requests`: requests allowed to wait
beyond the free rows of the batch): 429 with `Retry-After`; the server shutting down: 503; a failure while decoding
(`RequestOutput.error`, or the engine step itself): 500, or an error event in a stream. A client that disconnects
(streaming or not) aborts its request in the engine, which frees its row at once. Ctrl-C / SIGTERM stop accepting
requests, let running ones finish (up to `--shutdown-timeout` seconds), then stop Serve and Ray.

`create_app` builds the same FastAPI app without Ray (one engine in this process), e.g. for uvicorn or tests.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import difflib
import hmac
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .cli import OneLineParser, one_line
from .configuration_diffusion import ALIASES, LEGACY_GENERATION_FIELDS, DiffusionGenerationConfig
from .engine import EngineFullError

try:  # Starlette (FastAPI's base) comes with Ray Serve, the `serve` extra; the module imports without it
    from starlette.requests import Request
except ImportError:  # pragma: no cover
    Request = Any  # type: ignore[misc,assignment]

logger = logging.getLogger("dlm_generation.serve")

API_KEY_ENV = "DLM_SERVE_API_KEY"
INSTALL_HINT = "pip install 'dlm-generation[serve]'"
APP_NAME = "dlm-serve"
RETRY_AFTER_S = 1

# ------------------------------------------------------------------------------------------------ request fields
# The OpenAI fields each endpoint knows.
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "n", "seed",
                 "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user"}
ENDPOINT_FIELDS = {
    "completions": COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"},
    "chat": COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                             "function_call", "parallel_tool_calls", "response_format", "store", "metadata",
                             "service_tier", "modalities", "audio", "prediction", "reasoning_effort",
                             "web_search_options"},
}


def _none_or(*allowed) -> Callable[[Any], bool]:
    return lambda value: value is None or any(value == a and type(value) is type(a) for a in allowed)


# OpenAI fields that diffusion decoding cannot honour: (accepted values, why not).
UNSUPPORTED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_none_or(1), "one choice per prompt; send n requests (with temperature > 0 for different samples)"),
    "best_of": (_none_or(1), "one candidate per prompt"),
    "logprobs": (_none_or(False), "diffusion decoding does not report token log-probabilities"),
    "top_logprobs": (_none_or(0), "diffusion decoding does not report token log-probabilities"),
    "suffix": (_none_or(""), "insertion after a suffix is not implemented; put the text in the prompt"),
    "seed": (lambda value: value is None,
             "sampled decoding (temperature > 0) draws from the replica's shared random generator, so a request "
             "cannot be seeded"),
    "presence_penalty": (_none_or(0, 0.0), "penalties depend on a left-to-right history; diffusion decodes "
                                           "positions in any order"),
    "frequency_penalty": (_none_or(0, 0.0), "penalties depend on a left-to-right history; diffusion decodes "
                                            "positions in any order"),
    "logit_bias": (lambda value: value is None or value == {}, "logit biases are not implemented"),
    "tools": (lambda value: value is None or value == [], "tool calling is not supported"),
    "functions": (lambda value: value is None or value == [], "function calling is not supported"),
    "tool_choice": (_none_or("none"), "tool calling is not supported"),
    "function_call": (_none_or("none"), "function calling is not supported"),
    "response_format": (lambda value: value is None or value == {"type": "text"},
                        "structured output (json_object / json_schema) is not supported; only text"),
    "modalities": (lambda value: value is None or value == ["text"], "the model reads and writes text only"),
    "audio": (lambda value: value is None, "the model reads and writes text only"),
    "prediction": (lambda value: value is None, "predicted outputs are not supported"),
    "reasoning_effort": (lambda value: value is None, "the model has no reasoning-effort setting"),
    "web_search_options": (lambda value: value is None, "web search is not supported"),
}
# Accepted and ignored (metadata that does not change the answer).
IGNORED_FIELDS = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}
# Config fields the server sets itself, and why.
SERVER_OWNED_FIELDS = {
    "return_dict_in_generate": "the response format is fixed",
    "output_history": "the stream's `dlm.canvas` shows the canvas after every step",
    "output_confidences": "confidences are not reported",
    "output_commit_steps": "commit steps are always in each choice's `dlm.commit_steps`",
    "output_attentions": "the response format is fixed",
    "output_hidden_states": "the response format is fixed",
    "output_scores": "the response format is fixed",
    "output_logits": "the response format is fixed",
    "num_return_sequences": "one choice per prompt; send one request per sequence",
}
CONFIG_FIELDS = frozenset(
    {name for name in vars(DiffusionGenerationConfig()) if not name.startswith("_")} | set(ALIASES)
) - LEGACY_GENERATION_FIELDS - set(SERVER_OWNED_FIELDS)


class ServeError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class QueueFullError(EngineFullError):
    """The server's queue limit (`--max-queued-requests`) is reached."""


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ServeError:
    return ServeError(400, message, code=code, param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ParsedRequest:
    """A validated OpenAI request: the prompts (token ids, with their text for `echo`) and the decoding settings."""

    kind: str  # "completions" or "chat"
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    settings: dict[str, Any]  # DiffusionGenerationConfig fields for add_request
    stop: list[str]
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


def parse_request(body: Any, kind: str, tokenizer, served_model_name: str) -> ParsedRequest:
    """Check an OpenAI request body and turn it into prompts and decoding settings; `ServeError` (400 / 404) says what
    to change. The decoding settings themselves are validated by the engine (`add_request`)."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    known = ENDPOINT_FIELDS[kind]
    unknown = [key for key in body if key not in known and key not in CONFIG_FIELDS]
    if unknown:
        owned = [key for key in unknown if key in SERVER_OWNED_FIELDS]
        if owned:
            key = owned[0]
            raise _bad(f"{key} is set by dlm-serve ({SERVER_OWNED_FIELDS[key]}); leave it out", param=key,
                       code="unsupported_parameter")
        candidates = sorted(known | CONFIG_FIELDS)
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), candidates, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        other = "completions" if kind == "chat" else "chat"
        where = [key for key in unknown if key in ENDPOINT_FIELDS[other]]
        hint = f"; {where[0]!r} belongs to the /v1/{'chat/' if other == 'chat' else ''}completions endpoint" \
            if where else ""
        raise _bad(f"Unknown field(s) {', '.join(hints)}{hint}. A request takes OpenAI's fields for this endpoint "
                   "and the fields of DiffusionGenerationConfig (threshold, block_length, steps, "
                   "cache_implementation, ...).", param=str(unknown[0]), code="unknown_parameter")
    for name, (accepted, why) in UNSUPPORTED_FIELDS.items():
        if name in body and not accepted(body[name]):
            raise _bad(f"{name}={body[name]!r} is not supported by dlm-serve ({why}); leave it out.", param=name,
                       code="unsupported_parameter")

    model = body.get("model")
    if model is not None and model != served_model_name:
        raise ServeError(404, f"The model {model!r} does not exist here; this server serves {served_model_name!r} "
                              "(GET /v1/models).", code="model_not_found", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad(f"stream_options must be an object such as {{\"include_usage\": true}}, got {options!r}",
                   param="stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad(f"stream_options.include_usage must be true or false, got {include_usage!r}",
                   param="stream_options")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise _bad(f"echo must be true or false, got {echo!r}", param="echo")

    settings = {key: copy.deepcopy(value) for key, value in body.items() if key in CONFIG_FIELDS and key not in known}
    # max_tokens / max_completion_tokens: the canvas (max_new_tokens).
    lengths = {key: body[key] for key in ("max_tokens", "max_completion_tokens") if body.get(key) is not None}
    for key, value in lengths.items():
        if not _is_int(value) or value <= 0:
            raise _bad(f"{key} must be a positive integer (the number of positions generated after the prompt, "
                       f"max_new_tokens), got {value!r}", param=key)
    if len(set(lengths.values())) > 1:
        raise _bad(f"max_tokens ({lengths['max_tokens']}) and max_completion_tokens "
                   f"({lengths['max_completion_tokens']}) disagree; pass one of them", param="max_tokens")
    if lengths:
        key, value = next(iter(lengths.items()))
        for alias in ("max_new_tokens", "gen_length"):
            if settings.get(alias) is not None and settings[alias] != value:
                raise _bad(f"{key}={value} and {alias}={settings[alias]} disagree; {key} is the canvas length "
                           f"({alias}), pass only one of them", param=key)
            settings.pop(alias, None)
        settings["max_new_tokens"] = value
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            settings[key] = body[key]
    stop: list[str] = []
    if body.get("stop") is not None:
        value = body["stop"]
        stop = [value] if isinstance(value, str) else value
        if not isinstance(stop, list) or not stop or not all(isinstance(s, str) and s for s in stop):
            raise _bad(f"stop must be a non-empty string or a list of non-empty strings, got {value!r}", param="stop")
        if settings.get("stop_strings") is not None and settings["stop_strings"] != stop:
            raise _bad(f"stop={value!r} and stop_strings={settings['stop_strings']!r} disagree; stop is "
                       "stop_strings, pass only one of them", param="stop")
        settings["stop_strings"] = list(stop)
    elif settings.get("stop_strings") is not None:
        strings = settings["stop_strings"]
        stop = [strings] if isinstance(strings, str) else list(strings) if isinstance(strings, list) else []
        stop = [s for s in stop if isinstance(s, str) and s]

    if kind == "completions":
        prompts, texts = _completion_prompts(body, tokenizer)
    else:
        prompts, texts = _chat_prompt(body, tokenizer), [None]
    return ParsedRequest(kind, prompts, texts, settings, stop, bool(stream), include_usage and bool(stream),
                         bool(echo))


def _completion_prompts(body: dict, tokenizer) -> tuple[list[list[int]], list[str | None]]:
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt is required: a string, a list of strings, a list of token ids, or a list of token-id "
                   "lists", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (isinstance(p, list) and p and all(
            _is_int(i) for i in p)) for p in prompt):
        items = prompt
    else:
        raise _bad("prompt must be a non-empty string, a list of strings, a list of token ids, or a list of "
                   f"token-id lists; got {json.dumps(prompt)[:200]}", param="prompt")
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise _bad("prompt is an empty string; pass some text (or token ids)", param="prompt")
            ids.append(list(tokenizer(item).input_ids))
            texts.append(item)
        else:
            ids.append(list(item))
            texts.append(None)
    return ids, texts


def _chat_prompt(body: dict, tokenizer) -> list[list[int]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                   param="messages")
    rendered = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{index}] must be an object with a string role and a content, got "
                       f"{json.dumps(message)[:200]}", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise _bad(f"messages[{index}].content[{part_index}] is a {kind!r} part; the model reads text "
                               "only ({\"type\": \"text\", \"text\": ...})", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _bad(f"messages[{index}].content must be a string or a list of text parts, got "
                       f"{json.dumps(content)[:200]}", param="messages")
        rendered.append({"role": message["role"], "content": content})
    if getattr(tokenizer, "chat_template", None) is None:
        raise _bad("this model's tokenizer has no chat template; send the prompt text to /v1/completions instead",
                   param="messages")
    try:
        encoded = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as error:  # noqa: BLE001 - a template's raise_exception (jinja2 TemplateError) and the like
        raise _bad(f"the model's chat template refused these messages: {one_line(error)}", param="messages") from None
    return [list(encoded["input_ids"])]


class StopCutter:
    """The visible text of one choice: the settled text up to (not including) the first stop string. While the
    request runs it holds back the tail that could still be the start of a stop string, so streamed deltas
    concatenate to the final text."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.emitted = ""
        self.done = False

    def _held(self, text: str) -> int:
        """The length of the longest end of `text` that could be the start of a stop string."""
        held = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:length]):
                    held = length
                    break
        return held

    def feed(self, text: str, finished: bool) -> str:
        """The new visible text since the last call, given the request's whole settled `text`."""
        if self.done:
            return ""
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            visible, self.done = text[:min(cuts)], True
        elif finished:
            visible = text
        else:
            visible = text[:len(text) - self._held(text)]
        if visible.startswith(self.emitted):
            delta = visible[len(self.emitted):]
        elif self.emitted.startswith(visible):  # held back further than before: nothing new yet
            return ""
        else:  # the decoded text changed behind us (rare): send what differs from here on
            common = 0
            while visible[common] == self.emitted[common]:
                common += 1
            delta = visible[common:]
        self.emitted = visible
        return delta


# ------------------------------------------------------------------------------------------------ stepping thread
class EngineRunner:
    """Owns a `DiffusionEngine` on one thread that steps it while it has work.

    `submit` and `abort` may be called from any thread; they only put commands on a queue. The thread adds
    submissions with `engine.add_request` between steps and calls `sink(event)` (on the thread: the sink must be
    thread-safe, e.g. `loop.call_soon_threadsafe`) with, per submission:

    - `("accepted", None, None)` or `("rejected", index, exception)` (nothing was added then), and after acceptance
    - `("output", index, RequestOutput)` for every output of request `index` (the last one `finished`), or
    - `("failed", index, message)` when the engine step itself failed for it.

    `max_queued_requests` counts the requests that wait beyond the rows the batch has free (so 0 means: refuse a
    request when all rows are busy); a submission that would exceed it is rejected with `QueueFullError`.
    """

    def __init__(self, engine, max_queued_requests: int | None = None):
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, tuple[Callable, int]] = {}
        self._stopping = False
        self._force = False
        self.dead: str | None = None
        self._thread = threading.Thread(target=self._run, name="dlm-engine", daemon=True)

    def start(self) -> EngineRunner:
        self._thread.start()
        return self

    # -------------------------------------------------------------------------------- any thread
    def submit(self, requests: list[tuple[str, list[int], dict]], sink: Callable[[tuple], None]) -> None:
        """Queue `[(request_id, input_ids, settings), ...]` (added together or not at all); events go to `sink`."""
        if self.dead is not None:
            raise ServeError(503, f"the engine stopped after an error ({self.dead}); the replica restarts",
                             type="server_error", code="engine_dead")
        self._commands.put(("submit", requests, sink))

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests (a client went away): the engine frees their rows; they report nothing more."""
        self._commands.put(("abort", list(request_ids), None))

    def stop(self, timeout: float = 30.0) -> bool:
        """Refuse new submissions, let running requests finish (up to `timeout` s, then fail them); True if the
        thread ended in time."""
        self._stopping = True
        self._commands.put(("wake", None, None))
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            self._force = True
            self._commands.put(("wake", None, None))
            self._thread.join(5)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    def stats(self) -> dict:
        engine = self.engine
        return {"running": len(getattr(engine, "running", ())), "waiting": len(getattr(engine, "waiting", ())),
                "alive": self.alive}

    # -------------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while not self._force:
                    busy = self.engine.has_unfinished_requests()
                    self._drain(block=not busy)
                    if self._force:
                        break
                    if self.engine.has_unfinished_requests():
                        self._step()
                    elif self._stopping and self._commands.empty():
                        break
            self._fail_all("the server shut down before this request finished")
        except BaseException as error:  # noqa: BLE001 - the thread must never die silently
            logger.exception("dlm-serve: the engine thread failed")
            self.dead = f"{type(error).__name__}: {error}"
            self._fail_all(f"the engine failed: {self.dead}")

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, verb: str, payload, sink) -> None:
        if verb == "abort":
            for request_id in payload:
                if self._routes.pop(request_id, None) is not None:
                    self.engine.abort_request(request_id)
        elif verb == "submit":
            self._add(payload, sink)

    def _add(self, requests, sink) -> None:
        if self._stopping:
            sink(("rejected", None, ServeError(503, "the server is shutting down; retry on another replica",
                                               type="server_error", code="shutting_down",
                                               headers={"Retry-After": str(RETRY_AFTER_S)})))
            return
        added, index = [], 0
        try:
            for index, (request_id, input_ids, settings) in enumerate(requests):
                self.engine.add_request(request_id, input_ids, **copy.deepcopy(settings))
                added.append(request_id)
            if self.max_queued_requests is not None:
                beyond = self._queued_beyond_free_rows()
                if beyond > self.max_queued_requests:
                    raise QueueFullError(self._full_message(beyond - len(added)))
        except Exception as error:  # noqa: BLE001 - reported to the request, the engine goes on
            for request_id in added:
                self.engine.abort_request(request_id)
            sink(("rejected", index, error))
            return
        for index, (request_id, _, _) in enumerate(requests):
            self._routes[request_id] = (sink, index)
        sink(("accepted", None, None))

    def _queued_beyond_free_rows(self) -> int:
        """Waiting requests that will not be admitted at the next step (the engine admits first come first served)."""
        return self.engine.queued_beyond_free_rows()

    def _full_message(self, queued: int) -> str:
        return (f"the server is full: all {self.engine.max_batch_size} batch rows are taken and {max(queued, 0)} "
                f"request(s) already wait for one (--max-queued-requests {self.max_queued_requests}); retry after "
                "the Retry-After delay")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 - fail the requests it concerns, keep serving the others
            logger.exception("dlm-serve: engine.step() failed")
            self._step_failed(error)
            return
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:  # aborted meanwhile
                continue
            if output.finished:
                del self._routes[output.request_id]
            sink, index = route
            sink(("output", index, output))

    def _step_failed(self, error: Exception) -> None:
        engine = self.engine
        live = {r.request_id for r in getattr(engine, "waiting", ())} | \
               {r.request_id for r in getattr(engine, "running", ())}
        lost = [request_id for request_id in self._routes if request_id not in live]
        if not lost:  # not attributable to one request: fail them all rather than fail again at every step
            lost = list(self._routes)
        message = f"the engine failed while decoding: {type(error).__name__}: {error}"
        for request_id in lost:
            sink, index = self._routes.pop(request_id)
            engine.abort_request(request_id)
            sink(("failed", index, message))

    def _fail_all(self, message: str) -> None:
        for request_id, (sink, index) in list(self._routes.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001
                pass
            sink(("failed", index, message))
        self._routes.clear()
        while True:
            try:
                verb, _, sink = self._commands.get_nowait()
            except queue.Empty:
                break
            if verb == "submit":
                sink(("rejected", None, ServeError(503, message, type="server_error", code="engine_stopped")))


def rejection_error(error: BaseException) -> ServeError:
    """The HTTP answer to a submission the engine refused."""
    if isinstance(error, ServeError):
        return error
    if isinstance(error, EngineFullError):
        return ServeError(429, str(error), type="rate_limit_error", code="queue_full",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, (ValueError, TypeError)):
        message = str(error)
        code = "context_length_exceeded" if "positions, more than" in message else "invalid_value"
        return ServeError(400, message, code=code)
    return ServeError(500, f"the engine could not take the request: {type(error).__name__}: {error}",
                      type="server_error", code="engine_error")


# ------------------------------------------------------------------------------------------------ the HTTP app
class _Job:
    """One HTTP request's view of its engine requests: the events the stepping thread sends, on this loop."""

    def __init__(self, request_ids: list[str]):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.request_ids = request_ids
        self.unfinished = set(request_ids)

    def sink(self, event: tuple) -> None:  # the stepping thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class _BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer <key>`."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = ServeError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                        "with the key this dlm-serve was started with (--api-key or "
                                        f"{API_KEY_ENV}).", code="invalid_api_key",
                                   headers={"WWW-Authenticate": "Bearer"})
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _json_response(content: Any, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(content, ensure_ascii=False, default=str), status_code=status,
                    media_type="application/json", headers=headers)


def _error_response(error: ServeError):
    return _json_response(error.body(), error.status, error.headers)


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, default=str)}\n\n"


def create_app(runner: EngineRunner, tokenizer, served_model_name: str, api_key: str | None = None,
               model_info: dict | None = None):
    """The FastAPI app of one replica: the OpenAI endpoints in front of `runner` (an `EngineRunner`, started).

    `tokenizer` encodes prompts and renders chats on the event loop (give it a copy of the engine's tokenizer: the
    stepping thread decodes with that one). `model_info` is shown in `GET /v1/models` under `dlm`.
    """
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException
    from starlette.responses import StreamingResponse

    created = int(time.time())
    app = FastAPI(title="dlm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key:
        app.add_middleware(_BearerAuth, key=api_key)

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, error: ServeError):
        return _error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code == 404:
            message += " (endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions)"
        return _error_response(ServeError(error.status_code, message, code=codes.get(error.status_code)))

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "dlm-generation",
                "dlm": {**(model_info or {}), **runner.stats()}}

    @app.get("/v1/models")
    async def models():
        return _json_response({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != served_model_name:
            raise ServeError(404, f"The model {model_id!r} does not exist here; this server serves "
                                  f"{served_model_name!r}.", code="model_not_found", param="model")
        return _json_response(model_card())

    async def read_body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _bad(f"the request body is not valid JSON ({error})", code="invalid_json") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(parse_request(await read_body(request), "completions", tokenizer, served_model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(parse_request(await read_body(request), "chat", tokenizer, served_model_name))

    async def run(parsed: ParsedRequest):
        prefix = "chatcmpl" if parsed.kind == "chat" else "cmpl"
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        job = _Job([f"{response_id}-{index}" for index in range(len(parsed.prompts))])
        runner.submit([(request_id, ids, parsed.settings) for request_id, ids in zip(job.request_ids,
                                                                                      parsed.prompts)], job.sink)
        handed_over = False
        try:
            verdict, _, error = await job.events.get()
            if verdict == "rejected":
                job.unfinished.clear()
                raise rejection_error(error)
            if parsed.stream:
                handed_over = True
                return _EngineStream(stream_events(parsed, job, response_id), lambda: close(job))
            return _json_response(await collect(parsed, job, response_id))
        finally:
            if not handed_over:
                close(job)

    def close(job: _Job) -> None:
        """Abort what is still running of a request whose client is gone (or that failed)."""
        if job.unfinished:
            runner.abort(sorted(job.unfinished))
            job.unfinished.clear()

    def text_of(parsed: ParsedRequest, index: int, body: str) -> str:
        if parsed.echo:
            prompt = parsed.prompt_texts[index]
            if prompt is None:
                prompt = tokenizer.decode(parsed.prompts[index], skip_special_tokens=True)
            return prompt + body
        return body

    def usage_of(finals: dict) -> dict:
        prompt = sum(out.prompt_tokens for out in finals.values())
        completion = sum(len(out.token_ids) for out in finals.values())
        nfe = sum(out.nfe for out in finals.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "nfe": nfe, "tokens_per_forward": completion / nfe if nfe else 0.0}

    async def collect(parsed: ParsedRequest, job: _Job, response_id: str) -> dict:
        finals: dict[int, Any] = {}
        while len(finals) < len(job.request_ids):
            kind, index, payload = await job.events.get()
            if kind == "failed":
                raise ServeError(500, payload, type="server_error", code="generation_failed")
            if payload.finished:
                job.unfinished.discard(job.request_ids[index])
                if payload.finish_reason == "error":
                    raise ServeError(500, f"generation failed: {payload.error}", type="server_error",
                                     code="generation_failed")
                finals[index] = payload
        choices = []
        for index in range(len(job.request_ids)):
            out = finals[index]
            text = StopCutter(parsed.stop).feed(out.text or "", True)
            dlm = {"token_ids": out.token_ids, "commit_steps": (out.commit_steps or [])[:len(out.token_ids)],
                   "nfe": out.nfe}
            if parsed.kind == "chat":
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "finish_reason": out.finish_reason, "logprobs": None, "dlm": dlm})
            else:
                choices.append({"index": index, "text": text_of(parsed, index, text),
                                "finish_reason": out.finish_reason, "logprobs": None, "dlm": dlm})
        return {"id": response_id, "object": "chat.completion" if parsed.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": served_model_name, "choices": choices,
                "usage": usage_of(finals)}

    async def stream_events(parsed: ParsedRequest, job: _Job, response_id: str):
        chat = parsed.kind == "chat"
        created_at = int(time.time())
        base = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created_at, "model": served_model_name}

        def chunk(index: int, text: str | None, finish_reason: str | None = None, dlm: dict | None = None,
                  role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
            payload = {**base, "choices": [choice]}
            if dlm is not None:
                payload["dlm"] = dlm
            return _sse(payload)

        for index in range(len(job.request_ids)):
            if chat:
                yield chunk(index, None, role=True)
            elif parsed.echo:
                yield chunk(index, text_of(parsed, index, ""))
        cutters = [StopCutter(parsed.stop) for _ in job.request_ids]
        finals: dict[int, Any] = {}
        while len(finals) < len(job.request_ids):
            kind, index, payload = await job.events.get()
            if kind == "failed" or payload.finish_reason == "error":
                message = payload if kind == "failed" else f"generation failed: {payload.error}"
                if kind == "output":
                    job.unfinished.discard(job.request_ids[index])
                yield _sse(ServeError(500, message, type="server_error", code="generation_failed").body())
                yield "data: [DONE]\n\n"
                return
            out = payload
            if out.finished:
                job.unfinished.discard(job.request_ids[index])
                finals[index] = out
            delta = cutters[index].feed(out.text or "", out.finished)
            yield chunk(index, delta, out.finish_reason if out.finished else None,
                        {"canvas": out.canvas, "nfe": out.nfe})
        if parsed.include_usage:
            yield _sse({**base, "choices": [], "usage": usage_of(finals)})
        yield "data: [DONE]\n\n"

    class _EngineStream(StreamingResponse):
        """A server-sent event stream that aborts its engine requests however it ends (done, error, disconnect)."""

        def __init__(self, content, on_close: Callable[[], None]):
            super().__init__(content, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    return app


# ------------------------------------------------------------------------------------------------ one replica
def build_engine(options: dict):
    """(engine, tokenizer) from the server options: the model loaded as `dlm-generate` loads it."""
    import torch

    from .engine import DiffusionEngine
    from .loading import load_models

    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    model, tokenizer, guide = load_models(options["model"], options.get("assistant_model"),
                                          options.get("device") or "cpu", options.get("dtype"), options.get("peft"),
                                          option_names={"assistant_model": "--assistant-model", "peft": "--peft"})
    engine = DiffusionEngine(model, tokenizer, max_batch_size=options.get("max_batch_size") or 16,
                             max_canvas_length=options.get("max_canvas_length"), assistant_model=guide,
                             scheduling=options.get("scheduling") or "continuous")
    return engine, tokenizer


def build_app(options: dict):
    """(FastAPI app, EngineRunner) for one replica; `options` as `server_options` builds them."""
    engine, tokenizer = build_engine(options)
    runner = EngineRunner(engine, options.get("max_queued_requests")).start()
    model = engine.model
    info = {"max_batch_size": engine.max_batch_size, "max_queued_requests": options.get("max_queued_requests"),
            "max_canvas_length": options.get("max_canvas_length"),
            "mask_token_id": getattr(model.generation_config, "mask_token_id", None)
            or getattr(model.config, "mask_token_id", None),
            "model_type": getattr(model.config, "model_type", None), "pid": os.getpid()}
    app = create_app(runner, copy.deepcopy(tokenizer), options["served_model_name"], options.get("api_key"), info)
    return app, runner


class DLMServer:
    """A Ray Serve replica: one model, one engine, one stepping thread, the FastAPI app (`serve.ingress()`)."""

    def __init__(self, options: dict):
        # (`app` is a property of Serve's ingress wrapper: the names here are our own)
        self.dlm_options = options
        self.dlm_app, self.dlm_runner = build_app(options)

    def __serve_build_asgi_app__(self):
        return self.dlm_app

    def check_health(self) -> None:
        if not self.dlm_runner.alive:
            raise RuntimeError(f"the engine thread stopped: {self.dlm_runner.dead or 'shut down'}")

    def __del__(self):
        runner = getattr(self, "dlm_runner", None)
        if runner is not None:
            runner.stop(timeout=self.dlm_options.get("shutdown_timeout", 30.0))


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dlm-serve",
        description="Serve a diffusion language model (LLaDA, Dream) through an OpenAI-compatible HTTP API "
                    "(/v1/models, /v1/completions, /v1/chat/completions) on Ray Serve, with continuous batching.",
        epilog="Every DiffusionGenerationConfig field is a request field (the OpenAI client: extra_body={'threshold': "
               "0.9}); fields left out keep the model's generation_config.json. Example: dlm-serve "
               "model_cards/tiny-llada-chain-arith --port 8000, then OpenAI(base_url='http://127.0.0.1:8000/v1', "
               "api_key='none'). Stop with Ctrl-C or SIGTERM: running requests finish first.",
    )
    parser.add_argument("model", help="a model folder or Hub id (LLaDA or Dream)")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", metavar="HOST", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    http.add_argument("--port", metavar="PORT", type=int, default=8000, help="port to listen on (default 8000)")
    http.add_argument("--api-key", metavar="KEY", default=None,
                      help=f"require 'Authorization: Bearer KEY' on every endpoint (default: ${API_KEY_ENV}, else "
                           "no key)")
    http.add_argument("--served-model-name", metavar="NAME", default=None,
                      help="the model id clients pass as `model` (default: the MODEL argument as given)")
    engine = parser.add_argument_group("engine (per replica)")
    engine.add_argument("--max-batch-size", metavar="B", type=int, default=16,
                        help="rows decoded together by one engine (default 16; classifier-free guidance takes two)")
    engine.add_argument("--max-queued-requests", metavar="Q", type=int, default=None,
                        help="requests allowed to wait for a free row; more answer 429 with Retry-After (default: no "
                             "limit; 0: refuse when every row is busy)")
    engine.add_argument("--max-canvas-length", metavar="N", type=int, default=None,
                        help="the longest prompt + max_tokens a request may ask for (default: the model's limit)")
    engine.add_argument("--assistant-model", metavar="GUIDE",
                        help="an autoregressive guide (folder or Hub id) for AR-guided requests")
    engine.add_argument("--peft", metavar="ADAPTER",
                        help="a PEFT (LoRA) adapter folder or Hub id to apply to the model")
    engine.add_argument("--device", metavar="DEVICE", default="cpu",
                        help="torch device of each replica (default cpu; cuda takes one GPU per replica)")
    engine.add_argument("--dtype", metavar="DTYPE", default=None, help="float32 (CPU default), bfloat16, float16")
    engine.add_argument("--scheduling", choices=("continuous", "static"), default="continuous",
                        help="continuous (default): requests join and leave the batch at every step; static: a batch "
                             "waits for its slowest row before new requests join (for comparisons)")
    engine.add_argument("--threads", metavar="T", type=int, default=1, help="torch CPU threads per replica (default 1)")
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--num-replicas", metavar="N", type=int, default=1,
                           help="model replicas, one engine each (default 1)")
    ray_group.add_argument("--address", metavar="RAY_ADDRESS", default=None,
                           help="join this running Ray cluster (e.g. auto or HOST:6379) instead of starting a local "
                                "Ray; a Serve instance already running there keeps its own HTTP host and port")
    ray_group.add_argument("--shutdown-timeout", metavar="S", type=float, default=30.0,
                           help="seconds running requests get to finish at shutdown (default 30)")
    return parser


def server_options(args) -> dict:
    """The replica options from the parsed command line (what `build_app` reads)."""
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return {"model": args.model, "assistant_model": args.assistant_model, "peft": args.peft, "device": args.device,
            "dtype": args.dtype, "threads": args.threads, "max_batch_size": args.max_batch_size,
            "max_queued_requests": args.max_queued_requests, "max_canvas_length": args.max_canvas_length,
            "served_model_name": args.served_model_name or args.model, "api_key": api_key,
            "scheduling": args.scheduling,
            "shutdown_timeout": args.shutdown_timeout}


def check_args(args, parser) -> None:
    """Every command-line mistake answered before Ray starts or the model loads."""
    from .loading import check_model_source, resolve_device, resolve_dtype

    for flag, value, least in (("--port", args.port, 1), ("--max-batch-size", args.max_batch_size, 1),
                               ("--max-queued-requests", args.max_queued_requests, 0),
                               ("--max-canvas-length", args.max_canvas_length, 1), ("--threads", args.threads, 1),
                               ("--num-replicas", args.num_replicas, 1)):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if args.port > 65535:
        parser.error(f"--port must be at most 65535, got {args.port}")
    if args.shutdown_timeout < 0:
        parser.error(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key is empty; pass a key, or leave the flag out to serve without one")
    try:
        check_model_source(args.model, "model")
        for flag, source, what, marker in (("--assistant-model", args.assistant_model, "assistant model",
                                            "config.json"),
                                           ("--peft", args.peft, "PEFT adapter", "adapter_config.json")):
            if source:
                try:
                    check_model_source(source, what, marker)
                except ValueError as error:
                    raise ValueError(f"{flag} {source!r}: {error}") from None
        resolve_dtype(args.dtype)
        if args.address is None:  # a joined cluster's replicas may have devices this machine lacks
            resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.address is None:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds: TIME_WAIT is no conflict
            try:
                sock.bind((args.host, args.port))
            except OSError as error:
                parser.error(f"cannot listen on {args.host}:{args.port}: {error.strerror} (another server on that "
                             "port? pass --port)")


def _import_ray(parser):
    try:
        import ray
        from ray import serve
    except ImportError:
        parser.error(f"dlm-serve needs Ray Serve, which is not installed: {INSTALL_HINT}")
    try:
        import fastapi  # noqa: F401
    except ImportError:
        parser.error(f"dlm-serve needs FastAPI (part of Ray Serve), which is not installed: {INSTALL_HINT}")
    return ray, serve


def _deploy_error(text: str) -> str:
    """The line of a failed deployment's messages that says why (the replica's own ValueError when there is one)."""
    for line in reversed(text.splitlines()):
        for marker in ("ValueError: ", "OSError: ", "RuntimeError: "):
            if marker in line:
                return line[line.index(marker) + len(marker):].strip()
    return one_line(text)[:2000]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    options = server_options(args)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray, serve = _import_ray(parser)

    local = args.address is None
    gpus = 1 if str(args.device).startswith("cuda") else 0
    if local:
        ray.init(address="local", num_cpus=args.num_replicas * args.threads, include_dashboard=False,
                 logging_level=logging.WARNING)
    else:
        ray.init(address=args.address, logging_level=logging.WARNING)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends at once

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        deployment = serve.deployment(
            name="DLMServer", num_replicas=args.num_replicas,
            # the engine queues and answers 429 itself; Ray only routes
            max_ongoing_requests=max(1024, 4 * (args.max_batch_size + (args.max_queued_requests or 0))),
            graceful_shutdown_timeout_s=args.shutdown_timeout, graceful_shutdown_wait_loop_s=0.5,
            max_constructor_retry_count=args.num_replicas + 1,  # a model that cannot load fails the start soon
            ray_actor_options={"num_cpus": args.threads, "num_gpus": gpus},
        )(serve.ingress()(DLMServer))
        try:
            serve.run(deployment.bind(options), name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as error:  # noqa: BLE001 - a replica that cannot start (model, memory, ...)
            details = str(error)
            try:  # the replica's own traceback is in the deployment's status message
                app_status = serve.status().applications[APP_NAME]
                details += "\n" + "\n".join([app_status.message or ""] + [
                    d.message or "" for d in app_status.deployments.values()])
            except Exception:  # noqa: BLE001
                pass
            print(f"dlm-serve: error: the server did not start: {_deploy_error(details)}", file=sys.stderr)
            return 1
        key_note = " (API key required)" if options["api_key"] else ""
        print(f"dlm-serve: serving {options['served_model_name']!r} on http://{args.host}:{args.port}/v1 with "
              f"{args.num_replicas} replica(s){key_note}; Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            pass
        print(f"dlm-serve: shutting down (running requests get up to {args.shutdown_timeout:g} s to finish)",
              file=sys.stderr, flush=True)
        return 0
    finally:
        try:
            # Deleting the app first drains its replicas (running requests finish, up to --shutdown-timeout) while
            # the HTTP proxy still carries their responses; serve.shutdown() alone stops the proxy at once.
            serve.delete(APP_NAME)
            if local:
                serve.shutdown()
        except Exception as error:  # noqa: BLE001
            print(f"dlm-serve: Serve did not shut down cleanly: {one_line(error)}", file=sys.stderr)
        ray.shutdown()


if __name__ == "__main__":
    # `python -m dlm_generation.serve`: run the importable module's main, so that Ray ships the replica class by
    # reference (a class of `__main__` is pickled by value, which loses the names its route annotations refer to).
    from dlm_generation.serve import main as module_main

    sys.exit(module_main())
