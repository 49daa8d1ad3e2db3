"""Load test of `dlm-serve`: one request at a time vs static batching vs continuous batching, in one run.

Starts `dlm-serve MODEL` three times on 127.0.0.1 (one replica each, one after the other), and sends every server
the same mixed workload of chain-arith dev problems (canvases drawn from --canvases, streamed, through the official
`openai` client):

* (a) `--max-batch-size 1`: one request decodes at a time;
* (b) `--max-batch-size B --scheduling static`: a batch starts when the previous one has finished entirely (it waits
  for its slowest row, as a `diffusion_generate` call on a batch does);
* (c) `--max-batch-size B`: continuous batching (requests join and leave at every denoising step).

At each concurrency C the workload is sent twice: as a burst (C clients, each sending its share back to back) and
at a fixed arrival rate (--rate requests/s, at most C in flight). Per run it prints requests/s, generated tokens/s,
p50 / p99 latency, p50 time to the first settled token, and accuracy; then the tokens/s ratios (c)/(a) and (c)/(b).

    python benchmarks/serve_load.py model_cards/tiny-llada-chain-arith --requests 48 --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from dlm_generation.tasks import dev_split, is_correct


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, extra: list[str], threads: int, log_path: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "dlm_generation.serve", model, "--host", "127.0.0.1", "--port", str(port),
               "--threads", str(threads), *extra]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=5, max_retries=0)
    deadline = time.time() + 240
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"dlm-serve exited with {process.returncode}; see {log_path}")
        try:
            client.models.list()
            return process
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    stop_server(process)
    raise SystemExit(f"dlm-serve did not answer within 240 s; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def one_request(client, model_name: str, problem, canvas: int, started_at: float) -> dict:
    """Send one streamed chat request; returns its latency, time to first settled token, tokens, correctness."""
    began = time.perf_counter()
    first = None
    text, usage = "", None
    stream = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": problem.question}], max_tokens=canvas,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                if first is None:
                    first = time.perf_counter() - began
                text += choice.delta.content
    ended = time.perf_counter()
    return {"latency": ended - began, "ttft": first if first is not None else ended - began,
            "tokens": usage.completion_tokens if usage is not None else 0, "correct": is_correct(text, problem),
            "end": ended - started_at}


def run_load(port: int, workload: list, concurrency: int, rate: float | None) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)
    model_name = client.models.list().data[0].id
    started = time.perf_counter()
    results = []
    lock = threading.Lock()

    def send(item):
        problem, canvas, at = item
        if rate is not None:  # open loop: wait for this request's arrival time
            delay = started + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        result = one_request(client, model_name, problem, canvas, started)
        with lock:
            results.append(result)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, workload))
    wall = time.perf_counter() - started
    latencies = sorted(r["latency"] for r in results)
    return {
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "p50_latency_s": statistics.median(latencies),
        "p99_latency_s": latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))],
        "p50_ttft_s": statistics.median(r["ttft"] for r in results),
        "accuracy": sum(r["correct"] for r in results) / len(results),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a diffusion model folder, e.g. model_cards/tiny-llada-chain-arith")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--canvases", type=int, nargs="+", default=[64, 128, 256], help="max_tokens drawn per request")
    parser.add_argument("--rate", type=float, default=8.0, help="arrivals per second of the fixed-rate runs")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    problems = dev_split()[: args.requests]
    workload = [(p, rng.choice(args.canvases), i / args.rate) for i, p in enumerate(problems)]
    servers = {
        "(a) one at a time": ["--max-batch-size", "1"],
        "(b) static batching": ["--max-batch-size", str(args.max_batch_size), "--scheduling", "static"],
        "(c) continuous batching": ["--max-batch-size", str(args.max_batch_size)],
    }
    print(f"{args.model}: {args.requests} chat requests, canvases {args.canvases}, streamed; server torch threads "
          f"{args.threads}; rate runs at {args.rate} requests/s")
    rows = []
    for name, extra in servers.items():
        port = free_port()
        process = start_server(args.model, port, extra, args.threads, f"/tmp/serve_load_{port}.log")
        try:
            run_load(port, workload[:4], 4, None)  # warm-up
            for concurrency in args.concurrency:
                for arrival, rate in (("burst", None), ("rate", args.rate)):
                    result = run_load(port, workload, concurrency, rate)
                    rows.append({"server": name, "concurrency": concurrency, "arrivals": arrival, **result})
                    print(f"{name:25s} C={concurrency:<3d} {arrival:5s} {result['requests_per_s']:6.2f} req/s "
                          f"{result['tokens_per_s']:8.1f} tok/s  p50 {result['p50_latency_s']:6.2f} s  p99 "
                          f"{result['p99_latency_s']:6.2f} s  TTFT p50 {result['p50_ttft_s']:6.2f} s  accuracy "
                          f"{100 * result['accuracy']:5.1f}%", flush=True)
        finally:
            stop_server(process)

    print("\ntokens/s ratios (same workload, same run):")
    for concurrency in args.concurrency:
        for arrival in ("burst", "rate"):
            pick = {r["server"][:3]: r for r in rows if r["concurrency"] == concurrency and r["arrivals"] == arrival}
            c, a, b = pick["(c)"], pick["(a)"], pick["(b)"]
            print(f"  C={concurrency:<3d} {arrival:5s} (c)/(a) {c['tokens_per_s'] / a['tokens_per_s']:5.2f}x  "
                  f"(c)/(b) {c['tokens_per_s'] / b['tokens_per_s']:5.2f}x  p99 (c) {c['p99_latency_s']:.2f} s vs "
                  f"(b) {b['p99_latency_s']:.2f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
