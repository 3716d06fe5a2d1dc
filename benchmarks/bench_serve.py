"""Throughput and latency of `wings serve` under concurrent streaming clients, against the same requests one at
a time.

N clients each send M streaming chat requests (an easy-vqa image and a question, or a text-only question;
greedy, `max_tokens` fixed) as fast as answers come back; then every request is sent again alone, one after
another, on the same server. Printed per run: requests/s, generated tokens/s, time to first token and latency
(p50/p95), errors, answers lost or truncated (no final chunk, or a token count short of what `usage` reports)
and answers that differ from their one-at-a-time answer; then the medians over repeats and the speed-up
(concurrent tokens/s / one-at-a-time tokens/s).

    python benchmarks/bench_serve.py                         # tiny preset, `wings serve` child process, free port
    python benchmarks/bench_serve.py --model-dir DIR         # a saved model, `wings serve` child process
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --model NAME   # a running `wings serve`
    options: --clients 8 --requests-per-client 4 --max-tokens 32 --repeats 3 --max-batch-size 8 --server-threads 1
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import easy_vqa
import requests


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def build_requests(n: int, max_tokens: int) -> list[dict]:
    """n different requests: two of every three with an image."""
    paths = easy_vqa.get_test_image_paths()
    questions = ["what shape is in the image?", "what colour is the shape?", "is there a circle?",
                 "describe the picture", "is the shape blue?", "how many shapes are there?"]
    out = []
    for i in range(n):
        content = [{"type": "text", "text": f"{questions[i % len(questions)]} ({i})"}]
        if i % 3 != 2:
            data = base64.b64encode(open(paths[i % len(paths)], "rb").read()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
    return out


def stream_one(url: str, model: str, body: dict, headers: dict) -> dict:
    """One streaming request: timings, text, usage, and whether it ended properly."""
    started = time.perf_counter()
    first, pieces, use, finish, done = None, [], None, None, False
    payload = {**body, "model": model, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with requests.post(url + "/v1/chat/completions", json=payload, headers=headers, stream=True,
                           timeout=600) as reply:
            if reply.status_code != 200:
                return {"error": f"HTTP {reply.status_code}: {reply.text[:200]}"}
            for line in reply.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"].get("message", "stream error")}
                for choice in event.get("choices", []):
                    text = choice["delta"].get("content")
                    if text and first is None:
                        first = time.perf_counter()
                    pieces.append(text or "")
                    finish = choice.get("finish_reason") or finish
                use = event.get("usage") or use
    except requests.RequestException as err:
        return {"error": f"{type(err).__name__}: {err}"}
    ended = time.perf_counter()
    complete = done and finish is not None and use is not None
    return {"text": "".join(pieces), "tokens": use["completion_tokens"] if use else 0, "complete": complete,
            "ttft": (first or ended) - started, "latency": ended - started, "finish": finish}


def run_concurrent(url, model, bodies, clients, headers) -> tuple[list[dict], float]:
    results: list[dict | None] = [None] * len(bodies)
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))

    def client():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            results[i] = stream_one(url, model, bodies[i], headers)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - started


def run_sequential(url, model, bodies, headers) -> tuple[list[dict], float]:
    started = time.perf_counter()
    results = [stream_one(url, model, body, headers) for body in bodies]
    return results, time.perf_counter() - started


def cpu_seconds(pid: int | None) -> float:
    """CPU time the server process has used (user + system), from /proc; NaN where that is unavailable. On a shared
    machine, tokens per server CPU second is the figure other processes disturb least."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError, ValueError, IndexError):
        return float("nan")


def summarize(name: str, results: list[dict], seconds: float, cpu: float, reference: list[dict] | None = None) -> dict:
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    row = {"mode": name, "requests": len(results), "seconds": seconds, "req_per_s": len(ok) / seconds,
           "tok_per_s": tokens / seconds, "tok_per_cpu_s": tokens / cpu if cpu > 0 else float("nan"),
           "ttft_p50": percentile([r["ttft"] for r in ok], 0.5),
           "ttft_p95": percentile([r["ttft"] for r in ok], 0.95),
           "lat_p50": percentile([r["latency"] for r in ok], 0.5),
           "lat_p95": percentile([r["latency"] for r in ok], 0.95),
           "errors": len(results) - len(ok), "lost_or_truncated": sum(not r["complete"] for r in ok),
           "differ": None}
    if reference is not None:
        row["differ"] = sum(a.get("text") != b.get("text") for a, b in zip(results, reference, strict=True))
    return row


def print_errors(results: list[dict]) -> None:
    for message in sorted({r["error"] for r in results if "error" in r})[:3]:
        print(f"  error: {message}", flush=True)


def print_row(row: dict) -> None:
    differ = "-" if row["differ"] is None else row["differ"]
    print(f"{row['mode']:<12} {row['requests']:>4} req {row['seconds']:7.2f} s  {row['req_per_s']:6.2f} req/s  "
          f"{row['tok_per_s']:7.1f} tok/s ({row['tok_per_cpu_s']:6.1f} per server CPU s)  "
          f"TTFT p50/p95 {row['ttft_p50']:.3f}/{row['ttft_p95']:.3f} s  "
          f"latency p50/p95 {row['lat_p50']:.2f}/{row['lat_p95']:.2f} s  errors {row['errors']}  "
          f"lost/truncated {row['lost_or_truncated']}  differ {differ}", flush=True)


@contextlib.contextmanager
def local_server(model_dir: str | None, max_batch_size: int, threads: int):
    """`wings serve` on the tiny preset (or `model_dir`) in a child process on 127.0.0.1:<free port>: the clients
    then do not share this process's interpreter lock with the server."""
    from wings.builder import build_tiny, save

    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:  # what `wings init-model --preset tiny --out DIR` writes
            model_dir = str(save(*build_tiny(seed=0), tmp))
        cmd = [sys.executable, "-m", "wings.cli", "serve", model_dir, "--port", "0", "--served-model-name", "bench",
               "--max-batch-size", str(max_batch_size), "--max-queue", "1024", "--device", "cpu",
               "--dtype", "float32", "--log-level", "warning", "--no-ui", "--threads", str(threads)]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        try:
            url = None
            for line in proc.stderr:
                if line.startswith("wings serve: bench at "):
                    url = line.split(" at ", 1)[1].split("/v1", 1)[0]
                    break
            if url is None:
                raise RuntimeError(f"wings serve did not start (exit code {proc.wait()})")
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe from filling up
            yield url, "bench", proc.pid
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one in this process)")
    p.add_argument("--model", default=None, help="model name on --url")
    p.add_argument("--model-dir", default=None, help="model for the local server (default: tiny preset)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8, help="local server only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--server-threads", type=int, default=1,
                   help="torch CPU threads of the local server (1: the tiny model gains nothing from more, and on a "
                        "shared machine two threads wait on each other at every operation)")
    args = p.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    bodies = build_requests(args.clients * args.requests_per_client, args.max_tokens)
    if args.url:
        server = contextlib.nullcontext((args.url, args.model, None))
    else:
        server = local_server(args.model_dir, args.max_batch_size, args.server_threads)
    with server as (url, model, pid):
        if model is None:
            model = requests.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        stream_one(url, model, bodies[0], headers)  # warm-up
        rows = {"one at a time": [], f"{args.clients} clients": []}
        for _ in range(args.repeats):
            cpu = cpu_seconds(pid)
            alone, alone_s = run_sequential(url, model, bodies, headers)
            rows["one at a time"].append(summarize("one at a time", alone, alone_s, cpu_seconds(pid) - cpu))
            print_row(rows["one at a time"][-1])
            print_errors(alone)
            cpu = cpu_seconds(pid)
            together, together_s = run_concurrent(url, model, bodies, args.clients, headers)
            rows[f"{args.clients} clients"].append(summarize(f"{args.clients} clients", together, together_s,
                                                             cpu_seconds(pid) - cpu, alone))
            print_row(rows[f"{args.clients} clients"][-1])
            print_errors(together)
        stats = requests.get(url + "/wings/stats", headers=headers, timeout=30)
    print(f"\nmedians of {args.repeats} repeats ({len(bodies)} requests, {args.max_tokens} max tokens each, greedy):")
    medians = {}
    for name, runs in rows.items():
        medians[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("mode", "differ")}
        medians[name]["mode"] = name
        medians[name]["differ"] = sum(r["differ"] or 0 for r in runs) if runs[0]["differ"] is not None else None
        print_row(medians[name])
    speedup = medians[f"{args.clients} clients"]["tok_per_s"] / max(medians["one at a time"]["tok_per_s"], 1e-9)
    print(f"speed-up (tokens/s, {args.clients} concurrent clients vs one at a time): {speedup:.2f}x")
    cpu_speedup = medians[f"{args.clients} clients"]["tok_per_cpu_s"] / medians["one at a time"]["tok_per_cpu_s"]
    print(f"speed-up (tokens per server CPU second): {cpu_speedup:.2f}x")
    if stats.status_code == 200:
        for s in stats.json()["schedulers"]:
            print(f"scheduler {s['model']}: {s['waves']} waves, {s['requests']} requests, mean batch "
                  f"{s['mean_batch_size']}, largest {s['max_batch_size_seen']}")


if __name__ == "__main__":
    main()
