"""Operations: /metrics counts exactly the requests sent (vLLM's names under `wings:`), X-Request-Id is kept or
made and echoed, one JSON access line per request without prompt content, /health vs /ready, and SIGTERM drains a
real `wings serve` process (new requests 503 with Retry-After, the stream in flight finishes, exit 0)."""
# ruff: noqa: F811  (pytest fixtures imported from test_serve_common are redefined as arguments)

from __future__ import annotations

import json
import logging
import queue
import signal
import subprocess
import threading
import time

import pytest
import requests

from test_serve_common import image_files, image_urls, running, user, wings_dir, wings_pair  # noqa: F401

prometheus = pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels without model_name): value} of the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            out[(sample.name, labels)] = sample.value
    return out


def test_metrics_count_the_requests_sent(wings_pair, image_urls):
    specs = [{"messages": user("what shape is this?", image_urls[0]), "max_tokens": 7},
             {"messages": user("what is 4 + 4?"), "max_tokens": 5},
             {"messages": user("which colour?", image_urls[1]), "max_tokens": 9, "stop": ["e"]},
             {"messages": user("count to five"), "max_tokens": 4}]
    with running([("tiny", wings_pair)]) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
        before = scrape(url)
        assert ("wings:num_requests_running", ()) in before and ("wings:num_requests_waiting", ()) in before
        answers = [client.chat.completions.create(model="tiny", **spec) for spec in specs]
        streamed = list(client.chat.completions.create(model="tiny", stream=True, stream_options={
            "include_usage": True}, **specs[1]))
        bad = requests.post(url + "/v1/chat/completions", json={"messages": []}, timeout=30)
        missing = requests.post(url + "/v1/chat/completions", json={"model": "nope", **specs[1]}, timeout=30)
        completion = requests.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 3},
                                   timeout=30).json()
        after = scrape(url)
    assert bad.status_code == 400 and missing.status_code == 404
    prompt = sum(a.usage.prompt_tokens for a in answers) + streamed[-1].usage.prompt_tokens + \
        completion["usage"]["prompt_tokens"]
    generated = sum(a.usage.completion_tokens for a in answers) + streamed[-1].usage.completion_tokens + \
        completion["usage"]["completion_tokens"]
    finishes = [a.choices[0].finish_reason for a in answers] + \
        [next(e.choices[0].finish_reason for e in streamed if e.choices and e.choices[0].finish_reason),
         completion["choices"][0]["finish_reason"]]

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("wings:prompt_tokens_total") == prompt
    assert delta("wings:generation_tokens_total") == generated
    for reason in set(finishes):
        assert delta("wings:request_success_total", finished_reason=reason) == finishes.count(reason)
    assert delta("wings:request_failure_total", status="400") == 1
    assert delta("wings:request_failure_total", status="404") == 1
    n = len(finishes)
    assert delta("wings:time_to_first_token_seconds_count") == n
    assert delta("wings:e2e_request_latency_seconds_count") == n
    assert delta("wings:inter_token_latency_seconds_count") == generated - n
    assert after[("wings:num_requests_running", ())] == 0 and after[("wings:num_requests_waiting", ())] == 0


def test_request_ids_and_one_access_line_per_request(wings_pair, caplog):
    caplog.set_level(logging.INFO, logger="wings.access")
    secret = "the secret prompt text"
    with running([("tiny", wings_pair)]) as (url, _):
        given = requests.post(url + "/v1/chat/completions", headers={"X-Request-Id": "client-id-42"},
                              json={"messages": user(secret), "max_tokens": 3}, timeout=60)
        made = requests.post(url + "/v1/chat/completions", json={"messages": user(secret), "max_tokens": 3,
                                                                  "stream": True}, timeout=60)
        made.content  # noqa: B018  (read the whole stream)
        refused = requests.post(url + "/v1/chat/completions", headers={"X-Request-Id": "x" * 500},
                                json={"messages": user(secret), "max_tokens": 0}, timeout=60)
        time.sleep(0.2)  # the stream's line is written once its last event has gone out
    assert given.headers["x-request-id"] == "client-id-42"
    generated = made.headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert refused.status_code == 400 and refused.headers["x-request-id"] != "x" * 500  # too long: replaced
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "wings.access"]
    by_id = {line["request_id"]: line for line in lines}
    assert len(lines) == 3 and set(by_id) == {"client-id-42", generated, refused.headers["x-request-id"]}
    first = by_id["client-id-42"]
    assert first["status"] == 200 and first["model"] == "tiny" and first["path"] == "/v1/chat/completions"
    assert first["prompt_tokens"] == given.json()["usage"]["prompt_tokens"] and first["completion_tokens"] <= 3
    assert first["finish_reason"] in ("stop", "length") and first["ttft_s"] <= first["e2e_s"]
    assert by_id[generated]["stream"] is True and by_id[refused.headers["x-request-id"]]["status"] == 400
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_health_ready_and_drain_refusal(wings_pair):
    with running([("tiny", wings_pair)], drain_seconds=7) as (url, server):
        assert requests.get(url + "/health", timeout=10).status_code == 200
        ready = requests.get(url + "/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["models"] == ["tiny"]
        server.begin_drain()
        assert requests.get(url + "/ready", timeout=10).status_code == 503
        assert requests.get(url + "/health", timeout=10).status_code == 200  # alive, just not taking work
        refused = requests.post(url + "/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2},
                                timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
        assert refused.json()["error"]["code"] == "draining"


def test_sigterm_drains_a_real_server(wings_dir, image_urls):
    from test_serve_cli import ENV, wings

    proc = subprocess.Popen(wings("serve", str(wings_dir), "--port", "0", "--served-model-name", "tiny",
                                  "--threads", "1", "--drain-seconds", "60"),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    seen: list[str] = []
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            if line.startswith("wings serve: tiny at "):
                url = line.split(" at ", 1)[1].split("/v1", 1)[0]
        assert url is not None, "".join(seen)
        body = {"model": "tiny", "messages": user("what shape is this?", image_urls[0]), "max_tokens": 600,
                "stream": True, "stream_options": {"include_usage": True}}
        stream = requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=120,
                               headers={"X-Request-Id": "in-flight"})
        events = stream.iter_lines()
        for line in events:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"] and \
                    json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # streaming: now ask the server to stop
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        refused = requests.post(url + "/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2},
                                timeout=30)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert requests.get(url + "/ready", timeout=30).status_code == 503
        rest = [line for line in events if line]
        finished = time.monotonic()
        assert rest[-1] == b"data: [DONE]"
        use = json.loads(rest[-2][6:])["usage"]
        assert use["completion_tokens"] > 0 and finished > signalled + 0.3  # it went on after the signal
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while not lines.empty():
        seen.append(lines.get())
    access = [json.loads(line) for line in seen if line.startswith("{")]
    in_flight = [a for a in access if a["request_id"] == "in-flight"]
    assert len(in_flight) == 1 and in_flight[0]["status"] == 200 and in_flight[0]["completion_tokens"] == \
        use["completion_tokens"]
    assert any(a["status"] == 503 for a in access)
