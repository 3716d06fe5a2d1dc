"""The web page in a real browser (Playwright driving Debian's Chromium): upload + ask + streamed answer, the
router strip (one cell per generated token, coloured by the model's recorded weights), compare mode, multi-turn
and reset, and bad input (unreadable image, decompression bomb, server gone) shown on the page without losing
the conversation. Waits are on elements, never on network idle (answers stream over open connections).

Screenshot for the docs: WINGS_WEB_SCREENSHOT=docs/web/compare.png WINGS_WEB_MODELS=WINGS_DIR,BASELINE_DIR
pytest tests/test_web_page.py -k screenshot  (without them the same test writes to a temporary folder).
"""
# ruff: noqa: F811  (pytest fixtures imported from test_serve_common are redefined as arguments)

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests

from test_serve_common import (  # noqa: F401
    bomb_png,
    image_files,
    image_urls,
    llava_pair,
    running,
    user,
    wings_pair,
)

CHROMIUM = os.environ.get("WINGS_CHROMIUM", "/usr/bin/chromium")
# As root Chromium needs --no-sandbox; the rest keep it from reaching for Google's hosts on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="BROWSER TESTS SKIPPED: the `playwright` package is "
                                   "missing; install the serve-test extra (make test does)")
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        pytest.skip(f"BROWSER TESTS SKIPPED: no Chromium at {CHROMIUM}; install Debian's `chromium` (make test does "
                    "this as root) or point WINGS_CHROMIUM at one")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=shutil.which(CHROMIUM) or CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def compare_server(wings_pair, llava_pair):
    with running([("tiny-wings", wings_pair), ("tiny-llava", llava_pair)], compare=True) as (url, server):
        yield url, server


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def column(name: str) -> str:
    return f'.column[data-model="{name}"]'


def ask(page, text: str, images: list = (), max_tokens: int = 8, prompt_router: bool = False) -> None:
    for image in images:
        before = page.locator("#attachments img").count()
        page.set_input_files("#file", str(image))
        page.wait_for_function(f"document.querySelectorAll('#attachments img').length > {before}")
    page.fill("#max-tokens", str(max_tokens))
    if prompt_router:
        page.check("#prompt-router")
    page.fill("#prompt", text)
    page.click("#send")


def wait_answers(page, names: list[str], n: int = 1) -> None:
    for name in names:
        page.wait_for_function(
            f"document.querySelectorAll('{column(name)} .turn.assistant[data-state=\"done\"]').length >= {n}")


def api_answer(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "wings_router": True}
    reply = requests.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def page_message(text: str, image_url: str | None) -> list[dict]:
    """The user message the page sends: images first, then a line break and the text."""
    if image_url is None:
        return [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": "\n" + text}]}]


def rgb(w: float) -> str:
    """The page's colour ramp (app.js routerColour): textual blue at w_v 0 to visual orange at 1."""
    t = min(1.0, max(0.0, w))
    channels = [round(a + (b - a) * t) for a, b in zip((37, 99, 235), (249, 115, 22), strict=True)]
    return f"rgb({channels[0]}, {channels[1]}, {channels[2]})"


def test_upload_ask_streamed_answer_and_router_strip(page, compare_server, image_files, image_urls):
    url, _ = compare_server
    page.goto(url + "/")
    page.wait_for_selector(column("tiny-wings"))
    ask(page, "what shape is in the image?", [image_files[0]], max_tokens=10)
    wait_answers(page, ["tiny-wings", "tiny-llava"])
    turn = page.locator(f"{column('tiny-wings')} .turn.assistant").first
    expected = api_answer(url, "tiny-wings", page_message("what shape is in the image?", image_urls[0]), 10)
    assert turn.locator(".text").text_content() == expected["choices"][0]["message"]["content"]
    assert int(turn.get_attribute("data-chunks")) > 1  # the answer arrived in pieces
    cells = turn.locator(".answer-strip .cell")
    assert cells.count() == expected["usage"]["completion_tokens"] == len(expected["wings"]["tokens"])
    for i, want in enumerate(expected["wings"]["tokens"]):
        cell = cells.nth(i)
        assert float(cell.get_attribute("data-wv")) == pytest.approx(want["w_v"], abs=2e-4)
        assert cell.evaluate("c => getComputedStyle(c).backgroundColor") == rgb(float(cell.get_attribute("data-wv")))
        assert "learner layer 1" in cell.get_attribute("title")  # the hover lists every layer
    colours = {cells.nth(i).evaluate("c => getComputedStyle(c).backgroundColor") for i in range(cells.count())}
    assert len(colours) > 1  # the colours follow per-token weights


def test_compare_shows_both_answers_and_says_when_there_is_no_router(page, compare_server, image_urls,
                                                                     image_files):
    url, _ = compare_server
    page.goto(url + "/")
    page.wait_for_selector(column("tiny-llava"))
    ask(page, "which colour is it?", [image_files[1]], max_tokens=6, prompt_router=True)
    wait_answers(page, ["tiny-wings", "tiny-llava"])
    for name in ("tiny-wings", "tiny-llava"):
        expected = api_answer(url, name, page_message("which colour is it?", image_urls[1]), 6)
        shown = page.locator(f"{column(name)} .turn.assistant .text").first.text_content()
        assert shown == expected["choices"][0]["message"]["content"]
    llava = page.locator(column("tiny-llava"))
    assert "no router" in llava.locator(".router-status").inner_text()
    assert "LLaVA-mode" in llava.locator(".turn.assistant .no-router").inner_text()
    assert llava.locator(".cell").count() == 0  # no zeros drawn
    wings = page.locator(column("tiny-wings"))
    assert wings.locator(".prompt-strip .cell").count() > 5  # the prompt's text tokens, on request
    box_w, box_l = wings.bounding_box(), llava.bounding_box()
    assert abs(box_w["y"] - box_l["y"]) < 5 and box_w["x"] < box_l["x"]  # side by side


def test_multi_turn_then_reset(page, compare_server, image_urls, image_files):
    url, _ = compare_server
    page.goto(url + "/")
    page.wait_for_selector(column("tiny-wings"))
    ask(page, "what shape?", [image_files[2]], max_tokens=5)
    wait_answers(page, ["tiny-wings", "tiny-llava"])
    first = page.locator(f"{column('tiny-wings')} .turn.assistant .text").first.text_content()
    ask(page, "are you sure?", max_tokens=5)
    wait_answers(page, ["tiny-wings", "tiny-llava"], n=2)
    history = page_message("what shape?", image_urls[2]) + [{"role": "assistant", "content": first}] + \
        page_message("are you sure?", None)
    expected = api_answer(url, "tiny-wings", history, 5)["choices"][0]["message"]["content"]
    assert page.locator(f"{column('tiny-wings')} .turn.assistant .text").nth(1).text_content() == expected
    page.click("#reset")
    assert page.locator(".turn").count() == 0


def test_bad_images_show_a_message_and_keep_the_conversation(page, compare_server, image_files, tmp_path):
    url, _ = compare_server
    page.goto(url + "/")
    page.wait_for_selector(column("tiny-wings"))
    ask(page, "what shape?", [image_files[3]], max_tokens=4)
    wait_answers(page, ["tiny-wings", "tiny-llava"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    for path, words in ((broken, "cannot be decoded"), (bomb, "pixels")):
        page.set_input_files("#file", str(path))
        banner = page.locator("#banner")
        banner.wait_for(state="visible")
        page.wait_for_function(f"document.querySelector('#banner').textContent.includes({words!r})")
        assert path.name in banner.inner_text()
        assert page.locator("#attachments img").count() == 0  # refused on attach, nothing queued
    assert page.locator(f"{column('tiny-wings')} .turn.assistant[data-state='done']").count() == 1  # still there


def test_server_gone_shows_a_message_and_gives_the_message_back(browser, wings_pair, image_files):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        with running([("tiny-wings", wings_pair)]) as (url, _):
            page.goto(url + "/")
            page.wait_for_selector(column("tiny-wings"))
            ask(page, "what shape?", [image_files[4]], max_tokens=4)
            wait_answers(page, ["tiny-wings"])
        # the server is gone now
        ask(page, "anyone there?", max_tokens=4)
        error = page.locator(f"{column('tiny-wings')} .turn.assistant .error")
        error.wait_for()
        assert "cannot reach the server" in error.inner_text()
        assert page.locator("#prompt").input_value() == "anyone there?"  # the draft is back in the box
        assert page.locator(f"{column('tiny-wings')} .turn.assistant[data-state='done']").count() == 1
        assert page.locator(f"{column('tiny-wings')} .turn.user").count() == 2
    finally:
        context.close()


def test_screenshot_of_the_compare_page(browser, wings_pair, llava_pair, image_files, tmp_path):
    """The README's picture. With WINGS_WEB_MODELS=WINGS_DIR,BASELINE_DIR (the demo's two trained models) and
    WINGS_WEB_SCREENSHOT=PATH it is taken on those; otherwise on the tiny test models, into a temporary folder."""
    from wings.serving import ServedModel

    models_env, out = os.environ.get("WINGS_WEB_MODELS"), os.environ.get("WINGS_WEB_SCREENSHOT")
    if models_env:
        wings_dir, baseline_dir = models_env.split(",")
        pairs = [("wings", ServedModel.load(wings_dir, device="cpu", dtype="float32")),
                 ("llava", ServedModel.load(baseline_dir, device="cpu", dtype="float32"))]
        pairs = [(name, (m.model, m.processor)) for name, m in pairs]
        question, image = "what is the red shape?", image_files[0]  # easy-vqa test image 0: a red triangle
    else:
        pairs, question, image = [("tiny-wings", wings_pair), ("tiny-llava", llava_pair)], "what shape?", image_files[0]
    target = Path(out) if out else tmp_path / "compare.png"
    context = browser.new_context(viewport={"width": 1280, "height": 760})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        with running(pairs, compare=True) as (url, _):
            page.goto(url + "/")
            page.wait_for_selector(column(pairs[1][0]))
            ask(page, question, [image], max_tokens=12, prompt_router=True)
            wait_answers(page, [name for name, _ in pairs])
            target.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(target))
    finally:
        context.close()
    assert target.stat().st_size > 10_000
