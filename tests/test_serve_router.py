"""The router strip's data: per-token router weights that the model recorded while generating, sent alongside
the tokens (`wings_router`), equal to a from-scratch forward at the same positions; models without a router say
why instead of sending numbers."""
# ruff: noqa: F811  (pytest fixtures imported from test_serve_common are redefined as arguments)

from __future__ import annotations

import json
import threading

import pytest
import requests
import torch
from PIL import Image

from test_serve_common import image_files, image_urls, llava_pair, running, user, wings_pair  # noqa: F401

WEIGHT_TOLERANCE = 1e-3  # cells are rounded to 4 decimals; cached decoding matches a full forward to ~1e-5


def post(url: str, body: dict) -> dict:
    reply = requests.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def streamed(url: str, body: dict) -> tuple[list[dict], list[dict], dict]:
    """(router status chunks, token cells, prompt cells) from a streamed request."""
    statuses, cells, prompt = [], [], []
    with requests.post(url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            ext = json.loads(line[6:]).get("wings", {})
            statuses += [ext["router"]] if "router" in ext else []
            cells += ext.get("tokens", [])
            prompt += ext.get("prompt_tokens", [])
    return statuses, cells, prompt


def recorded_at_every_position(pair, text: str, image_path, generated: list[int]):
    """Router weights of one uncached forward over prompt + generated tokens: {layer: [T] w_v}, prompt ids."""
    model, processor = pair
    parts = [{"type": "image"}, {"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                           tokenize=False)
    batch = processor(text=prompt, images=[Image.open(image_path).convert("RGB")])
    ids = torch.cat([batch["input_ids"], torch.tensor([generated[:-1]])], dim=1)
    record: dict = {}
    with torch.no_grad():
        model(input_ids=ids, pixel_values=batch["pixel_values"], use_cache=False, wings_record=record)
    return {k: v[0, :, 0] for k, v in record.items()}, batch["input_ids"][0].tolist()


def test_cells_are_the_weights_of_the_forward_that_chose_each_token(wings_pair, image_files, image_urls):
    model, processor = wings_pair
    body = {"model": "tiny", "messages": user("what shape is it?", image_urls[0]), "max_tokens": 8,
            "wings_router": True, "wings_prompt_router": True}
    with running([("tiny", wings_pair)]) as (url, _):
        whole = post(url, body)
        statuses, cells, prompt_cells = streamed(url, body)
    ext = whole["wings"]
    assert ext["router"] == {"available": True, "reason": None} and statuses == [ext["router"]]
    assert len(ext["tokens"]) == whole["usage"]["completion_tokens"] == 8
    assert cells == ext["tokens"] and prompt_cells == ext["prompt_tokens"]
    generated = [cell["id"] for cell in ext["tokens"]]
    assert processor.decode(generated, skip_special_tokens=True) == whole["choices"][0]["message"]["content"]
    per_layer, prompt_ids = recorded_at_every_position(wings_pair, "what shape is it?", image_files[0], generated)
    layers = sorted(per_layer)
    assert len(layers) == len(ext["tokens"][0]["layers"]) == model.config.text_config.num_hidden_layers
    P = len(prompt_ids)
    for k, cell in enumerate(ext["tokens"]):  # token k was chosen by the forward at position P - 1 + k
        expected = [float(per_layer[layer][P - 1 + k]) for layer in layers]
        assert cell["layers"] == pytest.approx(expected, abs=WEIGHT_TOLERANCE)
        assert cell["w_v"] == pytest.approx(sum(expected) / len(expected), abs=WEIGHT_TOLERANCE)
    text_positions = [p for p, t in enumerate(prompt_ids) if t != model.config.image_token_id]
    assert len(ext["prompt_tokens"]) == len(text_positions)
    for cell, p in zip(ext["prompt_tokens"], text_positions, strict=True):
        assert cell["layers"] == pytest.approx([float(per_layer[layer][p]) for layer in layers], abs=WEIGHT_TOLERANCE)
    spread = [c["w_v"] for c in ext["tokens"] + ext["prompt_tokens"]]
    assert max(spread) - min(spread) > 0.01  # real, token-dependent weights, not a constant


def test_cells_in_a_batch_equal_cells_alone(wings_pair, image_urls):
    bodies = [{"model": "tiny", "messages": user(q, image_urls[i]), "max_tokens": 6, "wings_router": True}
              for i, q in enumerate(["what shape?", "which colour?", "is it round?"])]
    with running([("tiny", wings_pair)]) as (url, server):
        server.schedulers["tiny"].pause()
        together: dict = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, post(url, bodies[i])))
                   for i in range(3)]
        for t in threads:
            t.start()
        while server.schedulers["tiny"].pending_count() < 3:
            threading.Event().wait(0.01)
        server.schedulers["tiny"].resume()
        for t in threads:
            t.join(120)
        alone = [post(url, b) for b in bodies]
    for i in range(3):
        a, b = together[i]["wings"]["tokens"], alone[i]["wings"]["tokens"]
        assert [c["text"] for c in a] == [c["text"] for c in b]
        for ca, cb in zip(a, b, strict=True):
            assert ca["layers"] == pytest.approx(cb["layers"], abs=WEIGHT_TOLERANCE)


def test_models_without_a_router_say_so(llava_pair, make_tiny, image_urls):
    stage1 = make_tiny(seed=3, use_textual_learner=False, use_router=False)
    with running([("llava", llava_pair), ("stage1", stage1)]) as (url, _):
        for name, words in (("llava", "LLaVA-mode"), ("stage1", "stage-1")):
            got = post(url, {"model": name, "messages": user("what?", image_urls[0]), "max_tokens": 3,
                             "wings_router": True, "wings_prompt_router": True})
            assert got["wings"]["router"]["available"] is False
            assert words in got["wings"]["router"]["reason"]
            assert got["wings"]["tokens"] == [] and "prompt_tokens" not in got["wings"]
            info = requests.get(url + "/wings/info", timeout=30).json()
            assert any(m["id"] == name and m["router"]["available"] is False for m in info["models"])


def test_a_compat_official_model_is_served_one_request_at_a_time(make_tiny, image_urls):
    model, processor = make_tiny(seed=4, compat="official", system_prompt_length=5)
    with running([("official", (model.eval(), processor))]) as (url, server):
        assert server.schedulers["official"].max_batch_size == 1  # no KV cache, the released padding behaviour
        got = post(url, {"model": "official", "messages": user("what?", image_urls[0]), "max_tokens": 4,
                         "wings_router": True})
        assert got["usage"]["completion_tokens"] == len(got["wings"]["tokens"]) <= 4
        two = requests.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "official", "messages": user("what?", image_urls[0], image_urls[1]), "max_tokens": 2})
        assert two.status_code == 400 and "one image per conversation" in two.json()["error"]["message"]
