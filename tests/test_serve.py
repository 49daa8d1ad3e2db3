"""`dlm-serve`: the OpenAI-compatible server on Ray Serve (src/dlm_generation/serve.py).

One real `dlm-serve` (a local Ray on 127.0.0.1, the shipped tiny LLaDA, 16 rows, no queue beyond the free rows, an
API key from DLM_SERVE_API_KEY) is started once for the module as a subprocess and driven with the official `openai`
client: answers equal direct `diffusion_generate` calls, streams concatenate to the full text, bad inputs get their
status and message, a full server answers 429, disconnecting clients free their rows, and SIGTERM lets running
requests finish. The engine-failure paths and the command line's errors run in this process (no Ray).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import LLADA_CHAIN_ARITH, shared_model, shared_tokenizer

if importlib.util.find_spec("ray") is None:  # (found, not imported: Ray Serve takes seconds to import)
    pytest.skip("dlm-serve needs Ray Serve (pip install 'dlm-generation[serve]')", allow_module_level=True)
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from dlm_generation.engine import DiffusionEngine  # noqa: E402
from dlm_generation.generation_utils import generated_lengths  # noqa: E402
from dlm_generation.serve import EngineRunner, QueueFullError, StopCutter, create_app, main  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-serve")]

KEY = "test-key-123"
NAME = "tiny-llada"
START_TIMEOUT_S = 180
QUESTIONS = [f"Start with {a}. {op} {b}." for a, op, b in
             [(12, "Add", 30), (63, "Subtract", 39), (8, "Add", 75), (40, "Subtract", 7), (5, "Add", 5),
              (91, "Subtract", 45), (17, "Add", 26), (70, "Subtract", 12)]]
# A request that holds its row for minutes: one token per step, no early stop (cancelled by the tests).
SLOW = {"max_tokens": 512, "extra_body": {"steps": 512, "block_length": 8, "threshold": None,
                                         "suffix_window": None, "eos_early_stop": False}}


# ---------------------------------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "dlm-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dlm_generation.serve"]


class ServerProcess:
    """A `dlm-serve` subprocess: started on demand (again, after the shutdown test stopped it), stopped by pid."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.process, self.port, self.log_path = log_dir, None, None, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def running(self) -> ServerProcess:
        if self.process is None or self.process.poll() is not None:
            self.start()
        return self

    def start(self) -> None:
        self.port = _free_port()
        self.log_path = self.log_dir / f"dlm-serve-{self.port}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DLM_SERVE_API_KEY": KEY, "RAY_USAGE_STATS_ENABLED": "0"}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                _command() + [str(LLADA_CHAIN_ARITH), "--port", str(self.port), "--served-model-name", NAME,
                              "--max-batch-size", "16", "--max-queued-requests", "0", "--shutdown-timeout", "30"],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"dlm-serve exited with {self.process.returncode}:\n{self.log()}")
            if "dlm-serve: serving" in self.log():
                try:
                    if httpx.get(f"{self.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"dlm-serve did not answer within {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout: float = 90) -> int | None:
        """SIGTERM (the server's graceful shutdown), then SIGKILL after `timeout` s; the exit status."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            return None


@pytest.fixture(scope="module")
def _server_process(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("dlm-serve"))
    yield server
    server.stop()


@pytest.fixture
def server(_server_process) -> ServerProcess:
    return _server_process.running()


def client_for(server: ServerProcess, key: str = KEY, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=timeout)


# ---------------------------------------------------------------------------------------------------- references
def reference(input_ids: list[int], **settings) -> tuple[list[int], str]:
    """(token ids, text) of a direct diffusion_generate call, cut at the first EOS."""
    model = shared_model(LLADA_CHAIN_ARITH)
    tokenizer = shared_tokenizer(LLADA_CHAIN_ARITH)
    with torch.inference_mode():
        sequences = model.diffusion_generate(torch.tensor([input_ids]), **settings)
    generated = sequences[:, len(input_ids):]
    length = int(generated_lengths(generated, model.generation_config.eos_token_id)[0])
    ids = generated[0, :length].tolist()
    if ids and ids[-1] == model.generation_config.eos_token_id:
        ids = ids[:-1]
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def chat_ids(question: str) -> list[int]:
    tokenizer = shared_tokenizer(LLADA_CHAIN_ARITH)
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def completion_prompt(question: str) -> str:
    return f"Question: {question} What is the result?\nAnswer:"


# ---------------------------------------------------------------------------------------------------- Ray server
def test_models_lists_the_served_model(server):
    models = client_for(server).models.list()
    assert [m.id for m in models.data] == [NAME]
    dlm = models.data[0].model_extra["dlm"]
    assert dlm["max_batch_size"] == 16 and dlm["max_queued_requests"] == 0 and dlm["alive"] is True
    assert client_for(server).models.retrieve(NAME).id == NAME


def test_api_key_is_required_on_every_endpoint(server):
    for method, path in (("GET", "/v1/models"), ("GET", f"/v1/models/{NAME}"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("GET", "/nowhere")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x"}, timeout=10)
            assert response.status_code == 401, (method, path, headers)
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
    with pytest.raises(openai.AuthenticationError):
        client_for(server, key="wrong").models.list()


def test_sixteen_concurrent_clients_equal_diffusion_generate(server):
    """16 clients at once (chat and completions, several decoding settings): each answer equals its solo call."""
    settings = [{}, {"threshold": None}, {"cache_implementation": "prefix"}, {"alg": "topk_margin"},
                {"cache_implementation": None, "threshold": None, "block_length": 16},
                {"factor": 1.0, "threshold": None}, {"threshold": 0.7, "cache_implementation": "dual"}, {"steps": 8}]
    jobs = [(index, QUESTIONS[index % 8], settings[index % 8], index % 2 == 0) for index in range(16)]
    client = client_for(server, timeout=120)
    barrier = threading.Barrier(16, timeout=60)

    def ask(job):
        index, question, extra, chat = job
        barrier.wait()
        if chat:
            response = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                                      max_tokens=32, extra_body=extra)
            choice = response.choices[0]
            return choice.message.content, choice.model_extra["dlm"], response.usage
        response = client.completions.create(model=NAME, prompt=completion_prompt(question), max_tokens=32,
                                             extra_body=extra)
        choice = response.choices[0]
        return choice.text, choice.model_extra["dlm"], response.usage

    began = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    assert time.monotonic() - began < 120
    tokenizer = shared_tokenizer(LLADA_CHAIN_ARITH)
    for (index, question, extra, chat), (text, dlm, usage) in zip(jobs, answers):
        ids = chat_ids(question) if chat else list(tokenizer(completion_prompt(question)).input_ids)
        expected_ids, expected_text = reference(ids, max_new_tokens=32, **extra)
        assert text == expected_text, (index, extra)
        assert dlm["token_ids"] == expected_ids, (index, extra)
        assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(expected_ids)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.model_extra["nfe"] == dlm["nfe"] >= 1
        assert usage.model_extra["tokens_per_forward"] == pytest.approx(len(expected_ids) / dlm["nfe"])
    assert any("42" in text for text, _, _ in answers)  # 12 + 30: the model does get it right


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_stream_concatenates_to_the_full_answer(server, chat):
    client = client_for(server)
    question = QUESTIONS[1]
    kwargs = {"model": NAME, "max_tokens": 64, "extra_body": {"threshold": None}}
    if chat:
        create, kwargs["messages"] = client.chat.completions.create, [{"role": "user", "content": question}]
    else:
        create, kwargs["prompt"] = client.completions.create, completion_prompt(question)
    full = create(**kwargs)
    full_text = full.choices[0].message.content if chat else full.choices[0].text
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kwargs))
    pieces = [c.choices[0].delta.content or "" if chat else c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == full_text and full_text
    outputs = [c for c in chunks if c.choices and c.model_extra.get("dlm")]
    assert len(outputs) >= 2  # one chunk per engine output, each with the canvas in progress
    nfes = [c.model_extra["dlm"]["nfe"] for c in outputs]
    assert nfes == sorted(nfes) and nfes[-1] == full.usage.model_extra["nfe"]
    canvases = [c.model_extra["dlm"]["canvas"] for c in outputs]
    assert all(len(canvas) == 64 for canvas in canvases)
    mask_id = shared_model(LLADA_CHAIN_ARITH).config.mask_token_id
    assert mask_id in canvases[0] and mask_id not in canvases[-1]
    assert [c.choices[0].finish_reason for c in outputs][-1] == full.choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    if chat:
        assert chunks[0].choices[0].delta.role == "assistant"


def test_stop_strings_cut_the_text_streamed_or_not(server):
    client = client_for(server)
    prompt = completion_prompt(QUESTIONS[0])
    kwargs = {"model": NAME, "prompt": prompt, "max_tokens": 32, "stop": ["####"], "extra_body": {"threshold": None}}
    full = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    _, unstopped = reference(list(shared_tokenizer(LLADA_CHAIN_ARITH)(prompt).input_ids), max_new_tokens=32,
                             threshold=None)
    assert "####" in unstopped
    assert full == streamed == unstopped.split("####")[0]


@pytest.mark.parametrize("body, status, code, words", [
    ({"block_length": 0}, 400, "invalid_value", "block_length must be a positive integer"),
    ({"max_tokens": 30}, 400, "invalid_value", "must be a multiple of block_length (32)"),
    ({"cache_implementation": "bogus"}, 400, "invalid_value", "is not a diffusion cache"),
    ({"blok_length": 8}, 400, "unknown_parameter", "did you mean 'block_length'"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "unknown_parameter", "/v1/chat/completions"),
    ({"n": 2}, 400, "unsupported_parameter", "n=2 is not supported"),
    ({"logprobs": 2}, 400, "unsupported_parameter", "log-probabilities"),
    ({"seed": 1}, 400, "unsupported_parameter", "cannot be seeded"),
    ({"output_history": True}, 400, "unsupported_parameter", "set by dlm-serve"),
    ({"max_tokens": 8192}, 400, "context_length_exceeded", "more than the model's 4096"),
    ({"prompt": [5] * 4100}, 400, "context_length_exceeded", "more than the model's 4096"),
    ({"prompt": [10**6]}, 400, "invalid_value", "outside the model's vocabulary"),
    ({"prompt": ""}, 400, "invalid_value", "prompt is an empty string"),
    ({"stop": [""]}, 400, "invalid_value", "stop must be"),
    ({"model": "gpt-4"}, 404, "model_not_found", "this server serves 'tiny-llada'"),
])
def test_bad_completion_requests_answer_with_their_message(server, body, status, code, words):
    request = {"model": NAME, "prompt": "Start with 1.", **body}
    response = httpx.post(f"{server.url}/v1/completions", json=request, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_requests_through_the_openai_client(server):
    client = client_for(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt="x", extra_body={"block_length": 0})
    assert caught.value.status_code == 400
    assert caught.value.body["message"].startswith("Invalid diffusion generation config:")
    with pytest.raises(openai.BadRequestError, match="chain-arith chats have only user and assistant messages"):
        client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "Be brief."}])
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], logprobs=True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_full_server_answers_429_and_disconnects_free_rows(server):
    """16 rows, no queue: a 17th request is refused with 429 + Retry-After; a client that goes away (timed out, or
    a closed stream) frees its row at once, so the next request is admitted and completes promptly."""
    client = client_for(server)
    quick = {"model": NAME, "prompt": completion_prompt(QUESTIONS[0]), "max_tokens": 32}

    def admitted_within(seconds: float) -> str:
        """Retry a quick request while the server answers 429; its text once admitted."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                return client.completions.create(**quick).choices[0].text
            except openai.RateLimitError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    prompt = completion_prompt(QUESTIONS[2])
    streams = []
    try:
        with ThreadPoolExecutor(15) as pool:  # each create() returns once the server has accepted the request
            streams += pool.map(lambda _: client.completions.create(model=NAME, prompt=prompt, stream=True, **SLOW),
                                range(15))
        # A non-streaming client that gives up: its request must leave the engine.
        with pytest.raises(openai.APITimeoutError):
            client_for(server, timeout=3).completions.create(model=NAME, prompt=prompt, **SLOW)
        assert "42" in admitted_within(15)
        streams.append(client.completions.create(model=NAME, prompt=prompt, stream=True, **SLOW))
        with pytest.raises(openai.RateLimitError) as caught:  # every row busy, nothing may wait
            client.completions.create(**quick)
        assert caught.value.response.headers["Retry-After"] == "1"
        assert "all 16 batch rows are taken" in caught.value.body["message"]
        first = next(iter(streams[0]))
        assert first.model_extra["dlm"]["nfe"] >= 1
    finally:
        for stream in streams:
            stream.close()
    began = time.monotonic()
    assert "42" in admitted_within(30)
    assert time.monotonic() - began < 30
    deadline = time.monotonic() + 15
    while client.models.list().data[0].model_extra["dlm"]["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.models.list().data[0].model_extra["dlm"]["running"] == 0


def test_killed_replica_fails_its_requests_and_is_restarted(server):
    """SIGKILL the replica (its pid is in /v1/models' `dlm`) while a request and a stream decode: both clients get
    an error or a closed stream within a minute instead of hanging, and Serve restarts the replica, which answers."""
    client = client_for(server)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": completion_prompt(QUESTIONS[4]), "max_tokens": 512,
            "steps": 512, "block_length": 8, "threshold": None, "cache_implementation": None,
            "suffix_window": None, "eos_early_stop": False}  # one token per forward, for minutes
    pid = client.models.list().data[0].model_extra["dlm"]["pid"]
    assert isinstance(pid, int) and pid != server.process.pid
    results: dict = {}

    def full():
        began = time.monotonic()
        try:
            response = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)
            results["full"] = (response.status_code, response.text)
        except httpx.HTTPError as error:  # a dropped connection
            results["full"] = (None, repr(error))
        results["full_s"] = time.monotonic() - began

    def streamed():
        began, lines = time.monotonic(), []
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, headers=headers,
                              timeout=60) as response:
                results["stream_status"] = response.status_code
                lines += [line for line in response.iter_lines() if line.startswith("data: ")]
            results["stream"] = lines
        except httpx.HTTPError as error:
            results["stream"] = lines + [repr(error)]
        results["stream_s"] = time.monotonic() - began

    threads = [threading.Thread(target=full), threading.Thread(target=streamed)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while client.models.list().data[0].model_extra["dlm"]["running"] < 2:  # both are decoding
        assert time.monotonic() < deadline, "the two requests did not start"
        time.sleep(0.05)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(90)
    assert not any(thread.is_alive() for thread in threads), "a client hung after its replica died"
    status, text = results["full"]
    assert status is None or status >= 500, (status, text)  # an error, never a (partial) answer
    assert results["full_s"] < 60 and results["stream_s"] < 60, results
    assert "data: [DONE]" not in results["stream"], results["stream"][-3:]  # cut short, not completed
    print(f"\nin-flight request: {status} {text[:300]!r} after {results['full_s']:.1f} s; stream: status "
          f"{results.get('stream_status')}, {len(results['stream'])} events, last {results['stream'][-1:]!r} after "
          f"{results['stream_s']:.1f} s")

    deadline = killed + 120
    while True:  # Serve notices the dead actor and starts a new replica (a fresh model load)
        try:
            models = client_for(server, timeout=10).models.list()
            answer = client_for(server, timeout=30).completions.create(
                model=NAME, prompt=completion_prompt(QUESTIONS[0]), max_tokens=32)
            break
        except openai.APIError:
            assert time.monotonic() < deadline, f"no replica answered within 120 s:\n{server.log()}"
            time.sleep(1)
    print(f"a restarted replica answered {time.monotonic() - killed:.1f} s after the kill")
    assert models.data[0].model_extra["dlm"]["pid"] != pid
    assert "42" in answer.choices[0].text
    assert server.process.poll() is None  # dlm-serve itself kept running


def test_sigterm_lets_running_requests_finish(server):
    """The last test: SIGTERM while two requests decode; both complete, then the server exits 0."""
    client = client_for(server, timeout=120)
    kwargs = {"model": NAME, "prompt": completion_prompt(QUESTIONS[3]), "max_tokens": 64,
              "extra_body": {"steps": 64, "block_length": 64, "threshold": None, "cache_implementation": None,
                             "eos_early_stop": False}}
    results = {}

    def full():
        results["full"] = client.completions.create(**kwargs).choices[0]

    thread = threading.Thread(target=full)
    thread.start()
    stream = client.completions.create(stream=True, **kwargs)
    deadline = time.monotonic() + 20
    while client.models.list().data[0].model_extra["dlm"]["running"] < 2:  # both are decoding
        assert time.monotonic() < deadline, "the two requests did not start"
        time.sleep(0.05)
    server.process.send_signal(signal.SIGTERM)
    chunks = list(stream)
    thread.join(120)
    assert results["full"].finish_reason == chunks[-1].choices[0].finish_reason
    assert "".join(c.choices[0].text for c in chunks) == results["full"].text
    assert server.process.wait(timeout=90) == 0, server.log()


# ---------------------------------------------------------------------------------------------------- in process
class _ErrorEngine(DiffusionEngine):
    """Every request fails after its first step, as a non-finite logit would fail it (`RequestOutput.error`)."""

    def step(self):
        outputs = []
        for output in super().step():
            if not output.finished:
                self.abort_request(output.request_id)
                output = dataclasses.replace(output, finished=True, finish_reason="error",
                                             error="RuntimeError: non-finite logits")
            outputs.append(output)
        return outputs


class _CrashEngine(DiffusionEngine):
    """`step()` itself raises once requests are running."""

    def step(self):
        self._admit()
        raise RuntimeError("the forward crashed")


@pytest.fixture(params=[_ErrorEngine, _CrashEngine], ids=["request-error", "step-raises"])
def failing_app(request, llada_chain_arith):
    from starlette.testclient import TestClient

    tokenizer = shared_tokenizer(LLADA_CHAIN_ARITH)
    runner = EngineRunner(request.param(llada_chain_arith, tokenizer, max_batch_size=4)).start()
    with TestClient(create_app(runner, copy.deepcopy(tokenizer), NAME)) as client:
        yield client, runner
    assert runner.stop(timeout=10)


def test_engine_failure_fails_the_request_not_the_server(failing_app):
    client, runner = failing_app
    body = {"model": NAME, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 32}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "generation_failed"
    assert "non-finite logits" in error["message"] or "the forward crashed" in error["message"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        assert stream.status_code == 200
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "generation_failed" in json.loads(events[-2])["error"]["code"]
    assert runner.alive and runner.stats()["running"] == runner.stats()["waiting"] == 0
    assert client.get("/v1/models").status_code == 200


def test_queue_limit_counts_requests_beyond_the_free_rows(llada_chain_arith):
    """max_queued_requests=0 takes as many requests as there are free rows, in one submission or several."""
    tokenizer = shared_tokenizer(LLADA_CHAIN_ARITH)
    engine = DiffusionEngine(llada_chain_arith, tokenizer, max_batch_size=3)
    runner = EngineRunner(engine, max_queued_requests=0).start()
    events: queue.Queue = queue.Queue()
    slow = {"max_new_tokens": 256, "steps": 256, "threshold": None, "eos_early_stop": False}
    ids = chat_ids(QUESTIONS[0])
    try:
        runner.submit([("a", ids, slow), ("b", ids, slow)], events.put)
        assert events.get(timeout=30)[0] == "accepted"
        runner.submit([("c", ids, slow), ("d", ids, slow)], events.put)  # one row left for two: neither is taken
        verdict = next(e for e in iter(lambda: events.get(timeout=30), None) if e[0] != "output")
        assert verdict[0] == "rejected" and isinstance(verdict[2], QueueFullError)
        runner.submit([("c", ids, slow)], events.put)
        assert next(e for e in iter(lambda: events.get(timeout=30), None) if e[0] != "output")[0] == "accepted"
        runner.abort(["a", "b", "c"])
        deadline = time.monotonic() + 30
        while engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.has_unfinished_requests()
    finally:
        assert runner.stop(timeout=10)


def test_stop_cutter_holds_back_a_possible_stop_string():
    cutter = StopCutter(["####", "Question"])
    texts = [" 12 + 30", " 12 + 30 = 42. #", " 12 + 30 = 42. ##", " 12 + 30 = 42. #### 42"]
    pieces = [cutter.feed(text, text == texts[-1]) for text in texts]
    assert pieces == [" 12 + 30", " = 42. ", "", ""]
    cutter = StopCutter(["##"])
    pieces = [cutter.feed(" a #", False), cutter.feed(" a # b", False), cutter.feed(" a # b.", True)]
    assert pieces == [" a ", "# b", "."]
    plain = StopCutter([])
    assert plain.feed("ab", False) + plain.feed("abc", True) == "abc"


def test_command_line_errors_come_before_ray(capsys):
    for argv, words in ((["model_cards/no-such-model"], "no model folder at"),
                        ([str(LLADA_CHAIN_ARITH), "--max-batch-size", "0"], "--max-batch-size must be at least 1"),
                        ([str(LLADA_CHAIN_ARITH), "--dtype", "float8"], "dtype 'float8' is not one of"),
                        ([str(LLADA_CHAIN_ARITH), "--api-key", " "], "--api-key is empty")):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
        assert f"dlm-serve: error: {words}" in capsys.readouterr().err
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit):
            main([str(LLADA_CHAIN_ARITH), "--port", str(busy.getsockname()[1])])
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
