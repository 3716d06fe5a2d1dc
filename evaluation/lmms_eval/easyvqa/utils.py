"""lmms-eval hooks of the wings_easyvqa task. Runs inside lmms-eval's own environment, where wings is not installed,
so the answer normalisation is written out here; it is the one `wings eval` scores open answers with
(wings.evaluation.answers: lowercase, no punctuation, no articles, whitespace collapsed)."""

from __future__ import annotations

import base64
import io
import re
import string

from PIL import Image

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(doc["image"]))).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    # The bare question, as the demo's models were trained on it (no "answer in one word" suffix).
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}
