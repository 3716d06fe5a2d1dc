"""Continuous batching: the cache merge itself (a merged cache decodes each row as that row decodes alone, through
joins, departures and trimming), and requests that join a running batch through the server answer exactly as they
do alone, for a composed Wings model and for stock VLMs with Wings attached (Qwen2-VL's M-RoPE, Llava)."""
# ruff: noqa: F811  (pytest fixtures imported from test_serve_common are redefined as arguments)

from __future__ import annotations

import threading

import pytest
import torch

from test_serve_common import (  # noqa: F401  (fixtures)
    image_files,
    image_urls,
    running,
    start_clients,
    user,
    wait_until,
    wings_pair,
)
from wings.serving import ServedModel
from wings.serving.batch import ModelRunner

openai = pytest.importorskip("openai")


def encode(served: ServedModel, text: str, images: list):
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return served.codec.encode([{"role": "user", "content": parts}], images)


def greedy(runner: ModelRunner, logits: torch.Tensor) -> torch.Tensor:
    return runner.scores(logits).argmax(-1)


def decode_alone(runner: ModelRunner, prompt, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    done = runner.prefill([prompt])
    token, mask, lengths = greedy(runner, done.logits), done.mask, done.lengths
    tokens, logits_seen = [int(token)], [done.logits[0]]
    for _ in range(steps):
        logits, mask = runner.decode(token, done.cache, mask, lengths, done.deltas)
        lengths = lengths + 1
        token = greedy(runner, logits)
        tokens.append(int(token))
        logits_seen.append(logits[0])
    return tokens, logits_seen


def test_a_merged_cache_decodes_every_row_as_alone(wings_pair, image_files):
    """Group A (an image prompt, a long text prompt) decodes two steps; group B (two images, a short text) is
    prefilled and merged; after two more steps the long row of A leaves and the padding columns every remaining row
    shares are trimmed; every row's logits at every step equal its logits decoded alone."""
    from PIL import Image

    model, processor = wings_pair
    served = ServedModel("tiny", model, processor)
    runner = ModelRunner(served)
    images = [Image.open(p).convert("RGB") for p in image_files[:3]]
    prompts = [encode(served, "what shape is this?", images[:1]),
               encode(served, "a long question without any image, about the colour of the sky at night", []),
               encode(served, "compare the two", images[1:3]), encode(served, "hi", [])]
    steps = 6
    alone = [decode_alone(runner, p, steps) for p in prompts]

    a = runner.prefill(prompts[:2])
    tok, mask, lengths, deltas = greedy(runner, a.logits), a.mask, a.lengths, a.deltas
    seen = {0: [a.logits[0]], 1: [a.logits[1]]}
    rows = [0, 1]
    cache = a.cache

    def step():
        nonlocal tok, mask, lengths
        logits, mask = runner.decode(tok, cache, mask, lengths, deltas)
        lengths = lengths + 1
        tok = greedy(runner, logits)
        for j, i in enumerate(rows):
            seen[i].append(logits[j])

    for _ in range(2):
        step()
    b = runner.prefill(prompts[2:])
    seen[2], seen[3] = [b.logits[0]], [b.logits[1]]
    width_a, width_b = mask.shape[1], b.mask.shape[1]
    mask = cache.concat_batch(b.cache, mask, b.mask)
    assert mask.shape == (4, max(width_a, width_b))
    tok, lengths, deltas = torch.cat([tok, greedy(runner, b.logits)]), torch.cat([lengths, b.lengths]), \
        torch.cat([deltas, b.deltas])
    rows = [0, 1, 2, 3]
    for _ in range(2):
        step()
    before = mask.shape[1]
    keep = torch.tensor([0, 2, 3])  # the longest row leaves
    mask = cache.filter_batch(keep, mask)
    tok, lengths, deltas, rows = tok[keep], lengths[keep], deltas[keep], [0, 2, 3]
    assert mask.shape[1] < before and bool(mask[:, 0].any())  # columns padding in every kept row are gone
    assert cache.get_seq_length() == mask.shape[1] == cache.wings_cache.length
    for _ in range(2):
        step()
    for i in range(4):
        reference = alone[i][1][:len(seen[i])]
        assert len(seen[i]) >= 3
        for k, (got, want) in enumerate(zip(seen[i], reference, strict=False)):
            assert torch.allclose(got, want, atol=1e-4), f"row {i} step {k}: {(got - want).abs().max()}"
        assert [int(greedy(runner, x[None])) for x in seen[i]] == alone[i][0][:len(seen[i])]


def ask(client, spec: dict, model: str = "tiny", stream: bool = False) -> tuple[str, str]:
    if not stream:
        got = client.chat.completions.create(model=model, **spec)
        return got.choices[0].message.content, got.choices[0].finish_reason
    pieces, finish = [], None
    for event in client.chat.completions.create(model=model, stream=True, **spec):
        if event.choices:
            pieces.append(event.choices[0].delta.content or "")
            finish = event.choices[0].finish_reason or finish
    return "".join(pieces), finish


def staggered(url: str, model: str, specs: list[dict], first_tokens_before_next: int = 2) -> dict[int, tuple]:
    """Send `specs` one after another, each once the previous one has streamed a few pieces: every newcomer joins a
    batch that is decoding. Returns {index: (text, finish_reason)}."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
    results: dict[int, tuple] = {}
    started = [threading.Event() for _ in specs]

    def run(i):
        pieces, finish, n = [], None, 0
        for event in client.chat.completions.create(model=model, stream=True, **specs[i]):
            if event.choices:
                pieces.append(event.choices[0].delta.content or "")
                finish = event.choices[0].finish_reason or finish
                n += 1
                if n >= first_tokens_before_next:
                    started[i].set()
        started[i].set()
        results[i] = ("".join(pieces), finish)

    threads = []
    for i in range(len(specs)):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        started[i].wait(120)
    for t in threads:
        t.join(300)
    return results


def test_requests_that_join_a_running_batch_answer_as_alone(wings_pair, image_urls):
    specs = [
        {"messages": user("what shape is this?", image_urls[0]), "max_tokens": 40},
        {"messages": user("what is 4 + 4?"), "max_tokens": 12},
        {"messages": user("compare the two", image_urls[1], image_urls[2]), "max_tokens": 20},
        {"messages": user("tell me a story"), "max_tokens": 15, "temperature": 0.9, "seed": 3},
        {"messages": user("is it a circle?", image_urls[0]), "max_tokens": 10, "stop": ["e"]},  # a repeated image
    ]
    with running([("tiny", wings_pair)], max_batch_size=8) as (url, server):
        scheduler = server.schedulers["tiny"]
        joined = staggered(url, "tiny", specs)
        stats = scheduler.stats()
        assert stats["scheduler"] == "continuous" and stats["prefills"] == len(specs)
        assert stats["max_running_seen"] >= 3, stats  # newcomers ran beside requests already decoding
        assert stats["image_cache"]["hits"] >= 1, stats  # the repeated image was not encoded again
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
        alone = [ask(client, spec) for spec in specs]
    for i in range(len(specs)):
        assert joined[i] == alone[i], f"request {i} differs when it joined a running batch"
    assert len({a[0] for a in alone}) == len(specs)


def test_the_prefill_budget_splits_admission(wings_pair, image_urls):
    """With a budget smaller than two prompts, a burst is prefilled one request per iteration (the first waiting
    one is always admitted), and the answers do not change."""
    specs = [{"messages": user(f"question number {k}", image_urls[k]), "max_tokens": 6} for k in range(3)]
    with running([("tiny", wings_pair)], max_batch_size=8, max_prefill_tokens=8) as (url, server):
        scheduler = server.schedulers["tiny"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
        scheduler.pause()
        threads, results = start_clients(lambda i: ask(client, specs[i]), 3)
        wait_until(lambda: scheduler.pending_count() >= 3, 60)
        scheduler.resume()
        for t in threads:
            t.join(300)
        assert scheduler.stats()["prefills"] == 3 and scheduler.stats()["max_batch_size_seen"] == 1
        assert [results[i] for i in range(3)] == [ask(client, s) for s in specs]


def test_attached_vlms_join_a_running_batch_as_alone(image_files):
    """Qwen2-VL (M-RoPE: each row keeps its own rope delta) and Llava with Wings attached: a request that joins a
    running batch answers what it answers alone, and what `generate` answers for the same prompt."""
    from test_serve_common import data_url
    from test_vlm_serve import reference, served_pair

    pairs = {"qwen2_vl": served_pair("qwen2_vl"), "llava": served_pair("llava")}
    with running(list(pairs.items())) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
        for kind, pair in pairs.items():
            jobs = [("what shape is in the image?", [image_files[0]], 24), ("say something", [], 8),
                    ("and these two?", [image_files[1], image_files[2]], 8)]
            specs = [{"messages": user(text, *[data_url(p) for p in paths]), "max_tokens": n}
                     for text, paths, n in jobs]
            joined = staggered(url, kind, specs, first_tokens_before_next=3)
            for i, (text, paths, n) in enumerate(jobs):
                alone = ask(client, specs[i], model=kind)
                assert joined[i] == alone, f"{kind} request {i} differs when it joined a running batch"
                assert alone[0] == reference(pair, text, paths, n), f"{kind} request {i} differs from generate"
