"""lmms-eval 0.7.3 (`--model openai`) against `wings serve`, with the repo's local easy-vqa task
(evaluation/lmms_eval/easyvqa), as docs/SERVING.md's recipe runs it.

lmms-eval lives in its own environment (it needs packages the project's venv does not hold; docs/SERVING.md,
`make lmms-eval-venv`): its Python is `$WINGS_LMMS_EVAL_PYTHON`, else `.venv-lmms-eval/bin/python` in the repository.
Where neither imports lmms-eval's `openai` model, the test skips and says why."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="wings serve needs the serve extra: pip install -e '.[serve]'")

from test_serve_common import running, varied_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "evaluation" / "lmms_eval" / "easyvqa"
LIMIT = 6


def lmms_eval_python() -> Path:
    """lmms-eval's interpreter, or a skip saying where it was looked for and how to make it."""
    python = Path(os.environ.get("WINGS_LMMS_EVAL_PYTHON") or ROOT / ".venv-lmms-eval" / "bin" / "python")
    how = "build it with `make lmms-eval-venv` or point WINGS_LMMS_EVAL_PYTHON at one (docs/SERVING.md)"
    if not python.exists():
        pytest.skip(f"no lmms-eval environment at {python}: {how}")
    probe = subprocess.run([str(python), "-c", "import lmms_eval.models.simple.openai"], capture_output=True,
                           text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
        pytest.skip(f"{python} cannot import lmms-eval's openai model ({last}): {how}")
    return python


def docs(limit: int) -> list[dict]:
    lines = (TASK_DIR / "easyvqa_test.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:limit]]


@pytest.mark.slow
def test_lmms_eval_scores_what_the_server_answers(make_tiny, tmp_path):
    import requests

    python = lmms_eval_python()
    pair = varied_model(make_tiny, seed=5)
    with running([("tiny", pair)], max_batch_size=4) as (url, _):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "-",
               "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
        run = subprocess.run(
            [str(python), "-m", "lmms_eval", "--model", "openai",
             "--model_args", f"model_version=tiny,base_url={url}/v1,timeout=600,num_concurrent=2,max_retries=1",
             "--tasks", "wings_easyvqa", "--include_path", str(TASK_DIR), "--limit", str(LIMIT),
             "--batch_size", "1", "--output_path", str(tmp_path / "out"), "--log_samples"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        # What the server answers to the payload lmms-eval sends (seen on the wire: its chat `openai` model puts the
        # image first, then the question; greedy; the task's 8 tokens).
        answers = []
        for doc in docs(LIMIT):
            content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{doc['image']}"}},
                       {"type": "text", "text": doc["question"]}]
            reply = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": "tiny", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": content}]})
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["message"]["content"])
    results = sorted((tmp_path / "out").rglob("*_results.json"))
    samples = sorted((tmp_path / "out").rglob("*_samples_wings_easyvqa.jsonl"))
    assert results and samples, f"lmms-eval wrote no results under {tmp_path / 'out'}"
    scored = json.loads(results[-1].read_text())["results"]["wings_easyvqa"]
    rows = sorted((json.loads(line) for line in samples[-1].read_text().splitlines()), key=lambda r: r["doc_id"])
    assert len(rows) == LIMIT
    got = [row["filtered_resps"][0] if isinstance(row["filtered_resps"], list) else row["filtered_resps"]
           for row in rows]
    assert not any("LMMS_EVAL_REQUEST_FAILED" in text for text in got)  # a timeout would be scored as this text
    assert got == [a.strip() for a in answers]  # lmms-eval strips the reply's outer whitespace
    # The harness's score is exact match over those answers, as wings eval normalises them.
    from wings.evaluation.answers import exact_match

    expected = sum(exact_match(a, [d["answer"]]) for a, d in zip(answers, docs(LIMIT), strict=True)) / LIMIT
    assert scored["exact_match,none"] == pytest.approx(expected)


def test_task_data_is_the_easy_vqa_package_s():
    """Every question of the shipped task file is an easy-vqa test question with its own image, byte for byte."""
    from wings.data.easyvqa import load_split

    questions, answers, ids, paths = load_split("test")
    for doc in docs(10_000):
        k = int(doc["id"].rsplit("-", 1)[1])
        assert (doc["question"], doc["answer"]) == (questions[k], answers[k])
        assert base64.b64decode(doc["image"]) == Path(paths[ids[k]]).read_bytes()
