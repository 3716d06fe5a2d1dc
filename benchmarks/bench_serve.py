"""`wings serve` under load: the running batch (continuous batching) against waves, and concurrency against one at a
time.

`--mode trace` (default): one trace of requests arriving over time (Poisson arrivals, `--rate` per second; mixed
prompts: short and long questions, with and without an easy-vqa image; mixed answer lengths: `max_tokens` drawn
from `--answer-lengths`), replayed against `wings serve --scheduler waves` and then `--scheduler continuous` (each
a child process on a free port, `--threads` torch threads), for the tiny preset and a model of the demo's width
(Qwen2 hidden 128, 4 layers, ffn 512, vocab 1000; SigLIP 32 px, 16 image tokens), both with random weights that
make answers depend on the prompt. Printed per model and scheduler: generated tokens/s (first arrival to last
answer), time to first token p50/p99 (from each request's arrival), inter-token latency p50 (gaps between streamed
chunks), errors, and how many answers differ from the other scheduler's (greedy: none may); then a Markdown table.

`--mode clients`: N clients each send M streaming requests as fast as answers come back, then every request again
alone; requests/s, tokens/s, time to first token and latency, answers that differ from one-at-a-time.

    python benchmarks/bench_serve.py                                   # trace: tiny and demo width, both schedulers
    python benchmarks/bench_serve.py --models tiny --requests 32 --rate 4
    python benchmarks/bench_serve.py --model-dir DIR                   # trace on a saved model
    python benchmarks/bench_serve.py --mode clients --repeats 3 --requests-per-client 4 --max-tokens 32
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

DEMO_WIDTH = dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=1000, max_positions=512,
                  image_size=32, patch_size=8, vision_hidden=64, vision_layers=2)


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
    first, pieces, use, finish, done, stamps = None, [], None, None, False, []
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
                    if text:
                        stamps.append(time.perf_counter())
                    if text and first is None:
                        first = stamps[-1]
                    pieces.append(text or "")
                    finish = choice.get("finish_reason") or finish
                use = event.get("usage") or use
    except requests.RequestException as err:
        return {"error": f"{type(err).__name__}: {err}"}
    ended = time.perf_counter()
    complete = done and finish is not None and use is not None
    return {"text": "".join(pieces), "tokens": use["completion_tokens"] if use else 0, "complete": complete,
            "ttft": (first or ended) - started, "latency": ended - started, "finish": finish, "started": started,
            "ended": ended, "gaps": [b - a for a, b in zip(stamps, stamps[1:], strict=False)]}


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


def save_model(preset: str, out: str) -> str:
    """A saved model: the tiny preset as `wings init-model --preset tiny` writes it, or the demo's width; "varied"
    weights (random LLM and Wings parts at std 0.3) so that greedy answers depend on the prompt and image."""
    import torch

    from wings.builder import TinySpec, build_tiny, save

    model, processor = build_tiny(TinySpec(**DEMO_WIDTH) if preset == "demo" else TinySpec(), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and (name.startswith("language_model.") or ".router." in name):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return str(save(model, processor, out))


@contextlib.contextmanager
def local_server(model_dir: str | None, max_batch_size: int, threads: int, scheduler: str = "continuous"):
    """`wings serve` on the tiny preset (or `model_dir`) in a child process on 127.0.0.1:<free port>: the clients
    then do not share this process's interpreter lock with the server."""
    from wings.builder import build_tiny, save

    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:  # what `wings init-model --preset tiny --out DIR` writes
            model_dir = str(save(*build_tiny(seed=0), tmp))
        cmd = [sys.executable, "-m", "wings.cli", "serve", model_dir, "--port", "0", "--served-model-name", "bench",
               "--max-batch-size", str(max_batch_size), "--max-queue", "1024", "--device", "cpu",
               "--dtype", "float32", "--log-level", "warning", "--no-ui", "--threads", str(threads),
               "--scheduler", scheduler]
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


def make_trace(n: int, rate: float, answer_lengths: list[int], seed: int) -> list[tuple[float, dict]]:
    """(arrival second, request) for n requests: Poisson arrivals; short or long questions, with an image two times
    in three; `max_tokens` drawn from `answer_lengths`; greedy."""
    import random

    rng = random.Random(seed)
    paths = easy_vqa.get_test_image_paths()
    questions = ["what shape is in the image?", "what colour is the shape?", "is there a circle?",
                 "describe the picture", "is the shape blue?", "how many shapes are there?"]
    trace, at = [], 0.0
    for i in range(n):
        at += rng.expovariate(rate)
        text = f"{questions[i % len(questions)]} ({i})"
        if rng.random() < 0.4:  # a long prompt: context before the question
            text = " ".join(rng.choice(questions) for _ in range(rng.randint(4, 10))) + " " + text
        content = [{"type": "text", "text": text}]
        if rng.random() < 2 / 3:
            data = base64.b64encode(open(paths[rng.randrange(len(paths))], "rb").read()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
        trace.append((at, {"messages": [{"role": "user", "content": content}],
                           "max_tokens": rng.choice(answer_lengths), "temperature": 0}))
    return trace


def replay(url: str, model: str, trace: list[tuple[float, dict]], headers: dict) -> tuple[list[dict], float]:
    """Send each request at its arrival time (one thread each); (results, first arrival to last answer)."""
    results: list[dict | None] = [None] * len(trace)
    start = time.perf_counter() + 0.2

    def send(i: int) -> None:
        delay = start + trace[i][0] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        results[i] = stream_one(url, model, trace[i][1], headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(trace))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if "error" not in r]
    span = max(r["ended"] for r in ok) - (start + trace[0][0]) if ok else float("nan")
    return results, span


def trace_row(model: str, scheduler: str, results: list[dict], span: float, other: list[dict] | None) -> dict:
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    differ = None if other is None else sum(a.get("text") != b.get("text") for a, b in zip(results, other,
                                                                                             strict=True))
    return {"model": model, "scheduler": scheduler, "requests": len(results), "tokens": tokens,
            "tok_per_s": tokens / span, "ttft_p50": percentile([r["ttft"] for r in ok], 0.5),
            "ttft_p99": percentile([r["ttft"] for r in ok], 0.99), "itl_p50": percentile(gaps, 0.5),
            "errors": len(results) - len(ok), "incomplete": sum(not r["complete"] for r in ok), "differ": differ}


def trace_mode(args) -> None:
    trace = make_trace(args.requests, args.rate, args.answer_lengths, args.seed)
    print(f"trace: {len(trace)} requests over {trace[-1][0]:.1f} s (Poisson, {args.rate}/s), max_tokens from "
          f"{args.answer_lengths}, {sum('image_url' in json.dumps(b) for _, b in trace)} with an image; "
          f"server --threads {args.server_threads}, --max-batch-size {args.max_batch_size}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [(os.path.basename(args.model_dir), args.model_dir)] if args.model_dir else \
            [(m, save_model(m, os.path.join(tmp, m))) for m in args.models]
        for name, model_dir in models:
            runs = {}
            for scheduler in ("waves", "continuous"):
                with local_server(model_dir, args.max_batch_size, args.server_threads, scheduler) as (url, model, _):
                    stream_one(url, model, trace[0][1], {})  # warm-up
                    runs[scheduler] = replay(url, model, trace, {})
            for scheduler, (results, span) in runs.items():
                other = runs["waves" if scheduler == "continuous" else "continuous"][0]
                rows.append(trace_row(name, scheduler, results, span, other))
                r = rows[-1]
                print(f"{name:<6} {scheduler:<10} {r['tok_per_s']:7.1f} tok/s  TTFT p50/p99 {r['ttft_p50']:.3f}/"
                      f"{r['ttft_p99']:.3f} s  ITL p50 {1000 * r['itl_p50']:.1f} ms  errors {r['errors']}  "
                      f"incomplete {r['incomplete']}  differ {r['differ']}", flush=True)
                print_errors(results)
    print("\n| model | scheduler | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | errors | answers differing |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['scheduler']} | {r['tok_per_s']:.1f} | {r['ttft_p50']:.3f} s | "
              f"{r['ttft_p99']:.3f} s | {1000 * r['itl_p50']:.1f} ms | {r['errors']} | {r['differ']} of "
              f"{r['requests']} |")
    for name in dict.fromkeys(r["model"] for r in rows):
        waves, cont = (next(r for r in rows if r["model"] == name and r["scheduler"] == s)
                       for s in ("waves", "continuous"))
        print(f"{name}: running batch / waves: tokens/s {cont['tok_per_s'] / waves['tok_per_s']:.2f}x, "
              f"TTFT p99 {cont['ttft_p99'] / waves['ttft_p99']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="trace", choices=["trace", "clients"])
    p.add_argument("--models", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo"], help="trace mode")
    p.add_argument("--requests", type=int, default=48, help="trace mode: requests in the trace")
    p.add_argument("--rate", type=float, default=6.0, help="trace mode: mean arrivals per second")
    p.add_argument("--answer-lengths", type=int, nargs="+", default=[8, 16, 32, 64, 128],
                   help="trace mode: max_tokens values drawn uniformly")
    p.add_argument("--seed", type=int, default=0, help="trace mode: the trace's random seed")
    p.add_argument("--url", default=None, help="clients mode: a running server (default: start one)")
    p.add_argument("--model", default=None, help="model name on --url")
    p.add_argument("--model-dir", default=None, help="model for the local server (default: the presets)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8, help="local server only")
    p.add_argument("--repeats", type=int, default=3, help="clients mode")
    p.add_argument("--server-threads", "--threads", type=int, default=1,
                   help="torch CPU threads of the local server (1: the tiny model gains nothing from more, and on a "
                        "shared machine two threads wait on each other at every operation)")
    args = p.parse_args()
    if args.mode == "trace":
        trace_mode(args)
    else:
        clients_mode(args)


def clients_mode(args) -> None:
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
