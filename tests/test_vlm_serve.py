"""`wings serve` with stock VLMs with Wings attached (Qwen2-VL, Llava): image requests through the openai client
answer what `generate` answers for the same prompt, batched requests too; the router strip comes along."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="wings serve needs the serve extra: pip install -e '.[serve]'")

import openai  # noqa: E402
import torch  # noqa: E402

import wings.vlm as vlm  # noqa: E402
from test_serve_common import (  # noqa: E402
    data_url,
    image_files,  # noqa: E402,F401  (a fixture)
    running,
    user,
)
from vlm_support import randomize_wings_, render  # noqa: E402
from wings.vlm.tiny import build_tiny_vlm  # noqa: E402


def served_pair(kind: str):
    model, processor = build_tiny_vlm(kind, seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # varied answers: a default-init tiny model repeats one token whatever it is asked
        for name, param in model.named_parameters():
            if "lm_head" in name or ("layers" in name and param.dim() == 2):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    randomize_wings_(vlm.attach(model, rank=4), seed=3)
    return model.eval(), processor


def reference(pair, text: str, images: list, max_new_tokens: int) -> str:
    from PIL import Image

    model, processor = pair
    prompt = render(processor, [{"type": "image"} for _ in images] + [{"type": "text", "text": text}])
    pil = [Image.open(p).convert("RGB") for p in images]
    batch = dict(processor(text=[prompt], images=[pil] if pil else None, return_tensors="pt"))
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=processor.tokenizer.eos_token_id,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def pairs():
    return {"qwen2_vl": served_pair("qwen2_vl"), "llava": served_pair("llava")}


def test_openai_client_image_requests(pairs, image_files):  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    with running([(kind, pair) for kind, pair in pairs.items()]) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        models = sorted(m.id for m in client.models.list().data)
        assert models == ["llava", "qwen2_vl"]
        for kind, pair in pairs.items():
            jobs = [("what shape is in the image?", image_files[k]) for k in range(3)]
            with ThreadPoolExecutor(3) as pool:  # concurrent: served as one batch
                answers = list(pool.map(lambda job, kind=kind: client.chat.completions.create(
                    model=kind, messages=user(job[0], data_url(job[1])), max_tokens=6), jobs))
            for (text, path), answer in zip(jobs, answers, strict=True):
                assert answer.choices[0].message.content == reference(pair, text, [path], 6)
                assert answer.usage.prompt_tokens > 10


def test_router_strip_for_an_attached_model(pairs, image_files):  # noqa: F811
    """The cells of each generated token are the router weights of the forward that chose it, per learner layer;
    the prompt's image tokens get no cell of their own."""
    import requests

    model, processor = pairs["qwen2_vl"]
    with running([("qwen2_vl", pairs["qwen2_vl"])]) as (url, _):
        body = {"model": "qwen2_vl", "messages": user("what color is it?", data_url(image_files[0])),
                "max_tokens": 3, "wings_router": True, "wings_prompt_router": True}
        reply = requests.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    ext = reply.json()["wings"]
    assert ext["router"] == {"available": True, "reason": None}
    assert len(ext["tokens"]) == reply.json()["usage"]["completion_tokens"]
    assert all(len(cell["layers"]) == 2 and 0.0 <= cell["w_v"] <= 1.0 for cell in ext["tokens"])
    prompt_tokens = reply.json()["usage"]["prompt_tokens"]
    image_tokens = 16  # a 64x64 image at 16x16 pixels: an 8x8 grid merged 2x2
    assert len(ext["prompt_tokens"]) == prompt_tokens - image_tokens
