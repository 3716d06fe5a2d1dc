"""`wings serve` as a command: starts on a free loopback port, answers the `openai` client, stops on Ctrl-C;
bad flags are one `wings serve: error:` line and exit code 2, before any model is loaded (SIGTERM stops it
the same way as Ctrl-C: `serving/background.py` turns both into one clean shutdown)."""
# ruff: noqa: F811  (pytest fixtures imported from test_serve_common are redefined as arguments)

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from test_serve_common import image_files, image_urls, user, wings_dir, wings_pair  # noqa: F401
from wings.cli import main

openai = pytest.importorskip("openai")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def wings(*args: str) -> list[str]:
    return [sys.executable, "-m", "wings.cli", *args]


def test_serve_command_answers_and_stops_on_ctrl_c(wings_dir, image_urls):
    proc = subprocess.Popen(wings("serve", str(wings_dir), "--port", "0", "--log-level", "warning",
                                  "--served-model-name", "tiny", "--max-batch-size", "4"),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith("wings serve: tiny at "):
                url = line.split(" at ", 1)[1].split("/v1", 1)[0]
                assert "web page: " + url + "/" in line
        assert url is not None and url.startswith("http://127.0.0.1:"), "the server did not announce its address"
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=2, timeout=120)
        got = client.chat.completions.create(model="tiny", messages=user("what shape?", image_urls[0]), max_tokens=5)
        assert got.usage.completion_tokens <= 5 and got.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args,message", [
    (["{dir}", "--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0"),
    (["{dir}", "--port", "70000"], "--port must be between 0 and 65535"),
    (["{dir}", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["{dir}", "--max-prefill-tokens", "0"], "--max-prefill-tokens must be at least 1, got 0"),
    (["{dir}", "--image-cache-size", "-1"], "--image-cache-size must be at least 0, got -1"),
    (["{dir}", "--drain-seconds", "-1"], "--drain-seconds must be at least 0"),
    (["{dir}/nope"], "is not a directory"),
    (["{dir}", "--compare", "{dir}/nope"], "--compare"),
    (["{dir}", "--allow-local-images", "{dir}/nope"], "--allow-local-images"),
    (["{dir}", "--port", "{busy}"], "cannot listen on 127.0.0.1"),
])
def test_bad_flags_are_one_line_and_exit_2(wings_dir, args, message, capsys, monkeypatch):
    from wings.serving.inputs import ServedModel

    monkeypatch.setattr(ServedModel, "load", lambda *a, **k: pytest.fail("a model was loaded despite a bad flag"))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        code = main(["serve", *[a.format(dir=wings_dir, busy=busy.getsockname()[1]) for a in args]])
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("wings serve: error: ") and message in err, err


def test_the_demo_prints_a_command_that_opens_its_models_in_compare_mode(tmp_path):
    import shlex

    from wings.cli import build_parser
    from wings.demo.pipeline import serve_command

    stages = {f"{f}_stage2": {"final_dir": str(tmp_path / "demo out" / f"{f}_stage2" / "final")}
              for f in ("llava", "wings")}
    command = serve_command({"stages": stages})
    argv = shlex.split(command)
    assert argv[:2] == ["wings", "serve"]
    args = build_parser().parse_args(argv[1:])
    assert args.model_dir == stages["wings_stage2"]["final_dir"] and args.compare == stages["llava_stage2"]["final_dir"]
    assert args.ui
