"""Under load and faults, with the running batch: 64 concurrent streaming clients with mixed lengths all complete
(the queue bound holds, 429 past it), a client that disconnects mid-stream frees its row at once, and a malformed
image or a failing prefill in a request that arrives while others decode fails that request only."""
# ruff: noqa: F811  (pytest fixtures imported from test_serve_common are redefined as arguments)

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from test_serve_common import (  # noqa: F401  (fixtures)
    data_url,
    image_files,
    image_urls,
    running,
    start_clients,
    user,
    wait_until,
    wings_pair,
)

openai = pytest.importorskip("openai")


def stream(url: str, body: dict, timeout: float = 300) -> tuple[int, str, str | None, dict | None]:
    """(status, text, finish_reason, usage) of one streamed chat request."""
    reply = requests.post(url + "/v1/chat/completions", json={**body, "stream": True,
                                                               "stream_options": {"include_usage": True}},
                          stream=True, timeout=timeout)
    if reply.status_code != 200:
        return reply.status_code, reply.text, None, None
    text, finish, use = [], None, None
    for line in reply.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if "error" in event:
            return 500, event["error"]["message"], None, None
        if event["choices"]:
            text.append(event["choices"][0]["delta"].get("content") or "")
            finish = event["choices"][0].get("finish_reason") or finish
        use = event.get("usage") or use
    return 200, "".join(text), finish, use


def test_64_concurrent_streams_all_complete_and_the_queue_bound_holds(wings_pair, image_urls):
    kinds = [{"messages": user("what shape is this?", image_urls[k % 4]), "max_tokens": 2 + 5 * k}
             if k % 2 == 0 else {"messages": user(f"count to {k} please"), "max_tokens": 3 + 4 * k}
             for k in range(8)]
    specs = [kinds[i % 8] for i in range(64)]
    with running([("tiny", wings_pair)], max_batch_size=8, max_queue=64) as (url, server):
        scheduler = server.schedulers["tiny"]
        scheduler.pause()  # all 64 wait in the queue: it is full
        threads, results = start_clients(lambda i: stream(url, specs[i]), 64)
        wait_until(lambda: scheduler.pending_count() >= 64, 120, poll=0.02)
        assert scheduler.pending_count() == 64
        over = requests.post(url + "/v1/chat/completions", json={"messages": user("one more"), "max_tokens": 2},
                             timeout=30)
        assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
        assert over.json()["error"]["code"] == "queue_full"
        scheduler.resume()
        for t in threads:
            t.join(300)
        stats = scheduler.stats()
        alone = [stream(url, spec) for spec in kinds]
    assert len(results) == 64 and all(r[0] == 200 for r in results.values()), results
    for i, spec in enumerate(specs):
        assert results[i] == alone[i % 8], f"stream {i} differs from the same request alone"
        assert results[i][3]["completion_tokens"] <= spec["max_tokens"]
    assert stats["max_running_seen"] == 8 and stats["waiting"] == 0 and stats["running"] == 0
    assert stats["prefills"] > 8  # rows joined as others left, not 8 waves of 8


def test_a_disconnected_stream_frees_its_row_at_the_next_step(wings_pair, image_urls):
    stay = {"messages": user("and this?", image_urls[1]), "max_tokens": 300}
    leave = {"messages": user("what shape is this?", image_urls[0]), "max_tokens": 300, "stream": True}
    with running([("tiny", wings_pair)], max_batch_size=4) as (url, server):
        scheduler = server.schedulers["tiny"]
        kept: dict = {}
        stayer = threading.Thread(target=lambda: kept.setdefault("answer", stream(url, stay)))
        stayer.start()
        leaver = requests.post(url + "/v1/chat/completions", json=leave, stream=True, timeout=300)
        for line in leaver.iter_lines():
            choices = json.loads(line[6:])["choices"] if line.startswith(b"data: {") else []
            if choices and choices[0]["delta"].get("content"):
                break
        deadline = time.monotonic() + 30
        while scheduler.running_count() < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler.running_count() == 2
        steps_at_close = scheduler.stats()["decode_steps"]
        leaver.close()
        while scheduler.running_count() == 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        freed_after = scheduler.stats()["decode_steps"] - steps_at_close
        still_running = stayer.is_alive()
        stayer.join(300)
        assert scheduler.stats()["cancelled_rows"] == 1
        alone = stream(url, stay)
    assert still_running, "the other stream ended before the row was freed: nothing was measured"
    # Measured 0-1 steps (three runs): the stream's task sees the hang-up at once; the margin is for a loaded CPU.
    assert freed_after <= 10, freed_after
    assert kept["answer"] == alone


def test_a_bad_request_joining_a_running_batch_fails_alone(wings_pair, image_urls, monkeypatch):
    """While two streams decode: a request with a malformed image gets a 400 naming its field, and a request whose
    prefill raises (a long prompt the model is made to refuse) gets a 500; the two streams answer as alone."""
    model = wings_pair[0]
    real_forward = model.forward

    def fragile_forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] >= 200:
            raise RuntimeError("simulated failure on a long prompt")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fragile_forward)
    specs = [{"messages": user("what shape is this?", image_urls[0]), "max_tokens": 120},
             {"messages": user("what colour?", image_urls[2]), "max_tokens": 100}]
    broken = data_url(b"\x89PNG\r\n\x1a\n this is not an image")
    with running([("tiny", wings_pair)], max_batch_size=8) as (url, server):
        scheduler = server.schedulers["tiny"]
        threads, results = start_clients(lambda i: stream(url, specs[i]), 2)
        wait_until(lambda: scheduler.running_count() >= 2, 60, poll=0.005)
        bad_image = requests.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": user("and this one?", image_urls[3], broken), "max_tokens": 5})
        poisoned = stream(url, {"messages": user(" ".join(["tell me more"] * 80)), "max_tokens": 5})
        running_then = scheduler.running_count()
        for t in threads:
            t.join(300)
        alone = [stream(url, spec) for spec in specs]
        healthy = requests.get(url + "/health", timeout=10).status_code
    assert bad_image.status_code == 400, bad_image.text
    assert "messages[0].content[1]" in bad_image.json()["error"]["message"]
    assert poisoned[0] == 500 and "simulated failure" in poisoned[1]
    assert running_then >= 1  # the streams were still decoding when the bad requests came and went
    assert [results[0], results[1]] == alone and healthy == 200
