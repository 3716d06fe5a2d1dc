"""`wings serve` through real clients: the official `openai` client (streamed and not, with an image), OpenAI
error shapes for every bad input (the server keeps answering), API keys, a full queue, image source policy."""
# ruff: noqa: F811  (pytest fixtures imported from test_serve_common are redefined as arguments)

from __future__ import annotations

import json
import shutil
import threading

import pytest
import requests
import torch
from PIL import Image

from test_serve_common import (  # noqa: F401  (fixtures)
    bomb_png,
    data_url,
    image_files,
    image_urls,
    llava_pair,
    png_bytes,
    running,
    user,
    wings_pair,
)

openai = pytest.importorskip("openai")

from wings.serving import ServingPolicy  # noqa: E402


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory, image_files):
    root = tmp_path_factory.mktemp("allowed_images")
    shutil.copy(image_files[0], root / "shape.png")
    return root


@pytest.fixture(scope="module")
def server(wings_pair, llava_pair, local_dir):
    policy = ServingPolicy(max_images=2, local_images_root=local_dir.resolve())
    with running([("tiny-wings", wings_pair), ("tiny-llava", llava_pair)], policy=policy) as (url, srv):
        yield url, srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference_answer(pair, text: str, image_paths: list, max_new_tokens: int) -> str:
    """The same request straight through `model.generate` (greedy), without the server."""
    model, processor = pair
    parts = [{"type": "image"} for _ in image_paths] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                           tokenize=False)
    images = [Image.open(p).convert("RGB") for p in image_paths] or None
    batch = processor(text=prompt, images=images)
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_openai_client_with_an_image_streamed_and_not(client, wings_pair, image_files, image_urls):
    messages = user("what shape is in the image?", image_urls[0])
    whole = client.chat.completions.create(model="tiny-wings", messages=messages, max_tokens=12)
    stream = client.chat.completions.create(model="tiny-wings", messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, use = [], None, None
    for event in stream:
        if event.choices:
            pieces.append(event.choices[0].delta.content or "")
            finish = event.choices[0].finish_reason or finish
        use = event.usage or use
    text = whole.choices[0].message.content
    assert text == "".join(pieces) == reference_answer(wings_pair, "what shape is in the image?", image_files[:1], 12)
    assert text.strip()  # the varied test model says something
    assert finish == whole.choices[0].finish_reason
    assert use.model_dump() == whole.usage.model_dump()
    prompt_tokens = wings_pair[0].config.image_seq_length  # the image's tokens count as prompt tokens
    assert whole.usage.prompt_tokens > prompt_tokens and whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.model == "tiny-wings" and whole.object == "chat.completion"


def test_models_health_and_string_content(client, server, wings_pair):
    assert sorted(m.id for m in client.models.list().data) == ["tiny-llava", "tiny-wings"]
    assert requests.get(server[0] + "/health", timeout=10).json() == {"status": "ok"}
    got = client.chat.completions.create(model="tiny-wings", max_tokens=8,
                                         messages=[{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "what is 2 + 3?"}])
    assert got.choices[0].message.content == reference_answer_system(wings_pair, "be brief", "what is 2 + 3?", 8)


def reference_answer_system(pair, system: str, text: str, n: int) -> str:
    model, processor = pair
    prompt = processor.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": text}],
                                           add_generation_prompt=True, tokenize=False)
    batch = processor(text=prompt)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, eos_token_id=processor.tokenizer.eos_token_id,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_stop_sequences_cut_before_the_stop(client, image_urls):
    messages = user("describe it", image_urls[1])
    full = client.chat.completions.create(model="tiny-wings", messages=messages, max_tokens=16)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert len(stop) == 2
    cut = client.chat.completions.create(model="tiny-wings", messages=messages, max_tokens=16, stop=[stop, "never"])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny-wings", messages=messages, max_tokens=16, stop=stop,
                                              stream=True)
    pieces = [e.choices[0].delta.content or "" for e in streamed if e.choices]
    assert "".join(pieces) == text[:text.index(stop)]


def test_seeded_sampling_repeats(client):
    messages = user("tell me a story")
    answers = [client.chat.completions.create(model="tiny-wings", messages=messages, max_tokens=10, temperature=1.0,
                                              top_p=0.95, seed=seed).choices[0].message.content
               for seed in (7, 7, 8, 9)]
    assert answers[0] == answers[1]
    assert len(set(answers)) > 1  # different seeds really sample


HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ERROR_CASES = [
    # (name, raw body or dict, status, words the message must hold)
    ("malformed JSON", b'{"model": "tiny-wings", "messages": [', 400, "not valid JSON"),
    ("body not an object", b"[1, 2]", 400, "JSON object"),
    ("no messages", {"model": "tiny-wings"}, 400, "messages"),
    ("empty messages", {"model": "tiny-wings", "messages": []}, 400, "messages"),
    ("unknown role", {"model": "tiny-wings", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role"),
    ("unknown part type", {"model": "tiny-wings", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, 400, "messages[0].content"),
    ("image that does not decode", {"model": "tiny-wings", "messages": "GARBAGE_IMAGE"}, 400, "cannot be decoded"),
    ("decompression bomb", {"model": "tiny-wings", "messages": "BOMB"}, 400, "pixels"),
    ("too many images", {"model": "tiny-wings", "messages": "THREE_IMAGES"}, 400, "at most 2 images"),
    ("placeholder in text", {"model": "tiny-wings", "messages": [{"role": "user", "content": "a <image> b"}]}, 400,
     "<image>"),
    ("image in an assistant turn", {"model": "tiny-wings", "messages": "ASSISTANT_IMAGE"}, 400, "user messages"),
    ("path outside the allowed folder", {"model": "tiny-wings", "messages": "OUTSIDE_PATH"}, 400,
     "outside the allowed image folder"),
    ("remote URL", {"model": "tiny-wings", "messages": "REMOTE"}, 400, "--allow-remote-images"),
    ("prompt longer than the context", {"model": "tiny-wings", "messages": "LONG"}, 400, "context"),
    ("max_tokens 0", {"model": "tiny-wings", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "max_tokens must be at least 1"),
    ("max_completion_tokens -3", {"model": "tiny-wings", "messages": [{"role": "user", "content": "hi"}],
                                  "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("max_tokens past the context", {"model": "tiny-wings", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 100000}, 400, "context"),
    ("n=2", {"model": "tiny-wings", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n=2"),
    ("temperature 5", {"model": "tiny-wings", "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
     400, "temperature"),
    ("unknown field", {"model": "tiny-wings", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1},
     400, "frobnicate"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-9"),
    # Valid JSON that used to reach the generator unchecked (issue 21): every field range- and type-checked.
    ("seed beyond 64 bits", {**HI, "seed": 2**64, "temperature": 1.0}, 400, "seed: Input should be less than"),
    ("seed below -2**63", {**HI, "seed": -(2**63) - 1}, 400, "seed: Input should be greater than"),
    ("seed a string", {**HI, "seed": "7"}, 400, "seed: Input should be a valid integer"),
    ("seed a boolean", {**HI, "seed": True}, 400, "seed: Input should be a valid integer"),
    ("max_tokens a string", {**HI, "max_tokens": "3"}, 400, "max_tokens: Input should be a valid integer"),
    ("max_tokens a fraction", {**HI, "max_tokens": 2.5}, 400, "max_tokens: Input should be a valid integer"),
    ("max_completion_tokens huge", {**HI, "max_completion_tokens": 2**70}, 400, "max_completion_tokens: the prompt"),
    ("n=true", {**HI, "n": True}, 400, "n=true"),
    ("n huge", {**HI, "n": 10**30}, 400, "n=1000000000000000000000000000000"),
    ("temperature a string", {**HI, "temperature": "1"}, 400, "temperature: Input should be a valid number"),
    ("temperature negative", {**HI, "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", {**HI, "temperature": 1.0, "top_p": 0}, 400, "top_p"),
    ("stream a string", {**HI, "stream": "yes"}, 400, "stream: Input should be a valid boolean"),
    ("wings_router a number", {**HI, "wings_router": 1}, 400, "wings_router"),
    ("include_usage a string", {**HI, "stream_options": {"include_usage": "yes"}}, 400, "include_usage"),
    ("stop of numbers", {**HI, "stop": [1, 2]}, 400, "stop"),
    ("stop of 17 strings", {**HI, "stop": [f"s{i}" for i in range(17)]}, 400, "at most 16 stop sequences"),
    ("stop empty", {**HI, "stop": ["x", ""]}, 400, "must not be empty"),
    ("logit_bias", {**HI, "logit_bias": {"42": 100}}, 400, "logit_bias"),
    ("content part nested in a part", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": [{"type": "text", "text": "x"}]}]}]}, 400, "messages[0].content"),
    ("image_url a string", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}]}, 400, "image_url"),
    ("image url a number", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": 5}}]}]}, 400, "url"),
    ("image path with a NUL byte", {"messages": "NUL_PATH"}, 400, "not a usable file path"),
    ("image path too long", {"messages": "LONG_PATH"}, 400, "not a usable file path"),
    ("NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "NaN is not a JSON"),
    ("Infinity", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, "Infinity"),
    ("JSON nested too deeply", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
    ("an integer of 5000 digits", b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
     400, "more than 4300 digits"),
    # Text that is not Unicode (a lone surrogate, valid JSON as \ud800): refused naming the field, never a 500.
    ("lone surrogate in content", {"messages": [{"role": "user", "content": "bad \ud800 text"}]}, 400,
     "messages[0].content holds a lone surrogate (U+D800 at character 4)"),
    ("lone surrogate in a text part", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "bad \udfff"}]}]}, 400, "messages[0].content[0].text holds a lone surrogate"),
    ("lone surrogate in a system message", {"messages": [{"role": "system", "content": "\udcff"}, *HI["messages"]]},
     400, "messages[0].content holds"),
    ("lone surrogate in stop", {**HI, "stop": ["ok", "\ud800"]}, 400, "stop[1] holds"),
    ("lone surrogate in an image url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/x/\ud800.png"}}]}]}, 400, "image_url.url holds"),
    ("lone surrogate in model", {**HI, "model": "tiny-\ud800"}, 400, "model holds"),
    ("lone surrogate in a name", {"messages": [{**HI["messages"][0], "name": "\ud800"}]}, 400,
     "messages[0].name holds"),
    ("lone surrogate in an ignored field", {**HI, "user": "\ud800"}, 400, "user holds"),
    ("lone surrogate in a key", {**HI, "\ud800": 1}, 400, "a key of the object holds"),
]


def _materialise(messages, image_urls, local_dir):
    if not isinstance(messages, str):
        return messages
    tmp_outside = str(local_dir.parent / "elsewhere.png")
    return {
        "GARBAGE_IMAGE": user("what?", data_url(b"\x89PNG this is not an image")),
        "BOMB": user("what?", data_url(bomb_png())),
        "THREE_IMAGES": user("what?", *image_urls[:3]),
        "ASSISTANT_IMAGE": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": image_urls[0]}}]}, {"role": "user", "content": "and?"}],
        "OUTSIDE_PATH": user("what?", tmp_outside),
        "REMOTE": user("what?", "http://127.0.0.1:9/picture.png"),
        "LONG": user(" ".join(["what shape is it"] * 800)),
        "NUL_PATH": user("what?", str(local_dir / "a\x00b.png")),  # inside the allowed folder
        "LONG_PATH": user("what?", str(local_dir / ("a" * 5000))),
    }[messages]


@pytest.mark.parametrize("name,body,status,words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_gets_a_4xx_naming_the_problem(server, image_urls, local_dir, name, body, status, words):
    url = server[0] + "/v1/chat/completions"
    payloads = [body]
    if isinstance(body, dict):
        if "messages" in body:
            body = {**body, "messages": _materialise(body["messages"], image_urls, local_dir)}
        payloads = [json.dumps(body).encode()]
        if "stream" not in body:
            payloads.append(json.dumps({**body, "stream": True}).encode())
    for payload in payloads:  # a streaming request fails the same way, before any event
        reply = requests.post(url, data=payload, headers={"Content-Type": "application/json"}, timeout=60)
        assert reply.status_code == status, (name, reply.text[:300])
        error = reply.json()["error"]
        assert words in error["message"], (name, error["message"])
        assert set(error) == {"message", "type", "param", "code"}
    ok = requests.post(url, json={"model": "tiny-wings", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text  # still answering


def test_local_paths_only_under_the_allowed_folder(client, local_dir, wings_pair, image_files):
    for source in (str(local_dir / "shape.png"), (local_dir / "shape.png").as_uri()):
        got = client.chat.completions.create(model="tiny-wings", messages=user("what shape?", source), max_tokens=6)
        assert got.choices[0].message.content == reference_answer(wings_pair, "what shape?", image_files[:1], 6)


def test_api_key(wings_pair):
    with running([("tiny-wings", wings_pair)], api_key="s3cret") as (url, _):
        body = {"model": "tiny-wings", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert reply.status_code == 401 and "API key" in reply.json()["error"]["message"]
        assert requests.get(url + "/v1/models", timeout=30).status_code == 401
        assert requests.get(url + "/health", timeout=30).status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(**body).choices[0].message.content is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).chat.completions.create(**body)


def test_full_queue_answers_429_with_retry_after(wings_pair):
    with running([("tiny-wings", wings_pair)], max_queue=2, max_batch_size=4) as (url, srv):
        scheduler = srv.schedulers["tiny-wings"]
        scheduler.pause()
        body = {"model": "tiny-wings", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        replies = []
        waiting = [threading.Thread(target=lambda: replies.append(
            requests.post(url + "/v1/chat/completions", json=body, timeout=120))) for _ in range(2)]
        for t in waiting:
            t.start()
        while scheduler.pending_count() < 2:
            threading.Event().wait(0.01)
        full = requests.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert full.status_code == 429
        assert int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["code"] == "queue_full"
        scheduler.resume()
        for t in waiting:
            t.join(120)
        assert [r.status_code for r in replies] == [200, 200]
        assert scheduler.stats()["max_batch_size_seen"] == 2  # the two waiting requests ran as one batch


def test_a_body_over_the_limit_is_refused_with_413(wings_pair, image_urls):
    with running([("tiny-wings", wings_pair)], max_body_bytes=4096) as (url, _):
        body = {"model": "tiny-wings", "messages": user("what?", image_urls[0] + "A" * 8192), "max_tokens": 2}
        reply = requests.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == 413 and "over the limit" in reply.json()["error"]["message"]
        small = {"model": "tiny-wings", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert requests.post(url + "/v1/chat/completions", json=small, timeout=30).status_code == 200


def test_edge_values_in_range_are_answered(client):
    """The ends of each accepted range decode (issue 21: a near-zero temperature used to divide the logits into
    inf and NaN, a 500). Below 1e-5 a temperature decodes greedily, its limit."""
    def ask(**kw):
        return client.chat.completions.create(model="tiny-wings", messages=user("tell me a story"), max_tokens=6, **kw)

    greedy = ask(temperature=0).choices[0].message.content
    for tiny in (1e-300, 5e-324, 9e-6):
        assert ask(temperature=tiny, seed=3).choices[0].message.content == greedy
    for seed in (-(2**63), 2**63 - 1, 0):
        assert ask(temperature=1.0, seed=seed).choices[0].finish_reason in ("stop", "length")
    assert ask(temperature=1.0, top_p=5e-324, seed=1).choices[0].message.content is not None
    assert ask(temperature=2.0, top_p=1.0, seed=1).choices[0].message.content is not None


@pytest.mark.parametrize(("body", "param", "words"), [
    (b'{"url": "\\ud800"}', "url", "url holds a lone surrogate"),
    (b'{"url": 5}', "url", "`url` must be a string"),
    (b'{"url": "data:image/png;base64,AAAA", "model": []}', "model", "`model` must be a string"),
    (b"[" * 50_000, None, "nested too deeply"),
], ids=["surrogate", "url_number", "model_list", "deep"])
def test_the_pages_image_check_answers_4xx(server, body, param, words):
    reply = requests.post(server[0] + "/wings/check-image", data=body, timeout=30)
    assert reply.status_code == 400, reply.text[:300]
    error = reply.json()["error"]
    assert words in error["message"] and error["param"] == param


def test_remote_image_urls_that_cannot_be_fetched_are_400s(wings_pair):
    """With --allow-remote-images, a malformed URL (a ValueError inside urllib) or a peer that does not speak HTTP
    (http.client.BadStatusLine, no OSError) used to be a 500."""
    import socket

    peer = socket.socket()
    peer.bind(("127.0.0.1", 0))
    peer.listen(4)
    peer.settimeout(30)

    def talk_nonsense():
        for _ in range(2):  # the plain request and the streamed one
            try:
                conn, _ = peer.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HELLO THERE\r\n\r\n")

    talker = threading.Thread(target=talk_nonsense, daemon=True)
    talker.start()
    policy = ServingPolicy(allow_remote_images=True)
    try:
        with running([("tiny-wings", wings_pair)], policy=policy) as (url, _):
            for source, words in ((f"http://127.0.0.1:{peer.getsockname()[1]}/x.png", "BadStatusLine"),
                                  ("http://[::1/x.png", "Invalid IPv6 URL")):
                for stream in (False, True):
                    body = {"messages": user("what?", source), "max_tokens": 2, "stream": stream}
                    reply = requests.post(url + "/v1/chat/completions", json=body, timeout=60)
                    assert reply.status_code == 400, reply.text[:300]
                    assert "cannot be fetched" in reply.json()["error"]["message"] and words in reply.text
    finally:
        peer.close()
        talker.join(30)
