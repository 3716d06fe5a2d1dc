"""Batching: concurrent requests run together and each gets exactly its sequential answer; a client that
disconnects leaves its batch; a request that makes `generate` fail does not take the others down."""
# ruff: noqa: F811  (pytest fixtures imported from test_serve_common are redefined as arguments)

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from test_serve_common import (  # noqa: F401  (fixtures)
    image_files,
    image_urls,
    running,
    start_clients,
    user,
    wait_until,
    wings_pair,
)

openai = pytest.importorskip("openai")


def mixed_requests(urls: list[str]) -> list[dict]:
    """Ten different requests: 0, 1 and 2 images, multi-turn, a stop sequence, seeded sampling, lengths 5-16."""
    return [
        {"messages": user("what shape is this?", urls[0]), "max_tokens": 12},
        {"messages": user("and this one?", urls[1]), "max_tokens": 7},
        {"messages": user("compare the two", urls[2], urls[3]), "max_tokens": 10},
        {"messages": user("what is 4 + 4?"), "max_tokens": 9},
        {"messages": [{"role": "system", "content": "answer briefly"}, *user("which colour?", urls[4]),
                      {"role": "assistant", "content": "blue"}, *user("are you sure?")], "max_tokens": 12},
        {"messages": user("is it a circle?", urls[5]), "max_tokens": 16, "stop": ["e"]},
        {"messages": user("tell me a story"), "max_tokens": 10, "temperature": 0.9, "seed": 3},
        {"messages": user("what is shown?", urls[6]), "max_tokens": 5},
        {"messages": user("a rectangle or a triangle?", urls[7]), "max_tokens": 14, "temperature": 0},
        {"messages": user("count to five"), "max_tokens": 11, "temperature": 1.2, "top_p": 0.9, "seed": 11},
    ]


def ask(client, spec: dict, stream: bool) -> tuple:
    """(text, finish_reason, usage) through the official client, streamed or not."""
    if not stream:
        got = client.chat.completions.create(model="tiny", **spec)
        return got.choices[0].message.content, got.choices[0].finish_reason, got.usage.model_dump()
    pieces, finish, use = [], None, None
    for event in client.chat.completions.create(model="tiny", stream=True, stream_options={"include_usage": True},
                                                **spec):
        if event.choices:
            pieces.append(event.choices[0].delta.content or "")
            finish = event.choices[0].finish_reason or finish
        use = event.usage.model_dump() if event.usage else use
    return "".join(pieces), finish, use


def test_concurrent_answers_equal_sequential_answers(wings_pair, image_urls):
    specs = mixed_requests(image_urls)
    with running([("tiny", wings_pair)], max_batch_size=8) as (url, server):
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
        scheduler = server.schedulers["tiny"]
        scheduler.pause()  # let all ten queue up, so the first wave holds eight of them
        threads, results = start_clients(lambda i: ask(client, specs[i], i % 2 == 1), len(specs))
        wait_until(lambda: scheduler.pending_count() >= len(specs), 60)
        scheduler.resume()
        for t in threads:
            t.join(300)
        assert scheduler.stats()["max_batch_size_seen"] == 8
        batched_waves = scheduler.stats()["waves"]
        alone = [ask(client, spec, stream=False) for spec in specs]  # one at a time: each its own wave
        assert scheduler.stats()["waves"] == batched_waves + len(specs)
    for i, spec in enumerate(specs):
        assert results[i] == alone[i], f"request {i} ({spec['messages'][-1]['content']!r}) differs when batched"
        assert results[i][2]["completion_tokens"] <= spec["max_tokens"]
    assert len({r[0] for r in alone}) >= 8  # the answers really differ from request to request
    assert results[5][1] == "stop" and "e" not in results[5][0]


def test_a_disconnected_client_leaves_its_batch(wings_pair, image_urls):
    with running([("tiny", wings_pair)], max_batch_size=4) as (url, server):
        scheduler = server.schedulers["tiny"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
        stay = {"messages": user("and this?", image_urls[1]), "max_tokens": 60}
        # alone, this one runs all 200 steps (no end-of-sequence), so its client hangs up while its row runs
        leave = {"model": "tiny", "messages": user("what shape is this?", image_urls[0]), "max_tokens": 200,
                 "stream": True}
        assert ask(client, {k: v for k, v in leave.items() if k not in ("model", "stream")}, False)[1] == "length"
        scheduler.pause()
        kept: dict = {}
        stayer = threading.Thread(target=lambda: kept.setdefault("answer", ask(client, stay, stream=True)))
        stayer.start()
        leaver = requests.post(url + "/v1/chat/completions", json=leave, stream=True, timeout=300)
        while scheduler.pending_count() < 2:
            time.sleep(0.01)
        scheduler.resume()
        for line in leaver.iter_lines():
            choices = json.loads(line[6:])["choices"] if line.startswith(b"data: {") else []
            if choices and choices[0]["delta"].get("content"):
                break  # the first piece of the answer arrived, so its row is running: now hang up
        leaver.close()
        stayer.join(300)
        deadline = time.monotonic() + 60  # the wave ends once the scheduler has seen the hang-up (counted then)
        while scheduler.stats()["cancelled_rows"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.stats()["cancelled_rows"] == 1, scheduler.stats()
        assert kept["answer"] == ask(client, stay, stream=False)  # the other row never noticed
        assert ask(client, {"messages": user("hi"), "max_tokens": 2}, stream=False)[1] in ("length", "stop")


def test_a_failing_request_does_not_take_its_batch_down(wings_pair, image_urls, monkeypatch):
    model = wings_pair[0]
    real_forward = model.forward
    poison_width = 200  # only the poisoned prompt is this long; the model refuses any prefill that holds it

    def fragile_forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] >= poison_width:
            raise RuntimeError("simulated failure on a long prompt")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fragile_forward)
    specs = [{"messages": user("what shape?", image_urls[i]), "max_tokens": 6} for i in range(3)]
    poisoned = {"messages": user(" ".join(["tell me more"] * 80)), "max_tokens": 6}
    with running([("tiny", wings_pair)], max_batch_size=8) as (url, server):
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
        scheduler = server.schedulers["tiny"]
        scheduler.pause()
        results: dict = {}

        def run(i, spec):
            try:
                results[i] = ask(client, spec, stream=i == 1)
            except openai.APIError as err:
                results[i] = err

        threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate([*specs, poisoned])]
        for t in threads:
            t.start()
        while scheduler.pending_count() < 4:
            time.sleep(0.01)
        scheduler.resume()
        for t in threads:
            t.join(300)
        assert isinstance(results[3], openai.InternalServerError)
        assert "simulated failure" in str(results[3])
        for i, spec in enumerate(specs):
            assert results[i] == ask(client, spec, stream=False)
        assert requests.get(url + "/health", timeout=10).status_code == 200
