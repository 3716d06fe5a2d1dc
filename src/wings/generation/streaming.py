"""Stream generated text as it is produced (HF `TextIteratorStreamer` + a worker thread)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import TextIteratorStreamer


@dataclass
class StreamResult:
    """Filled in once the stream is exhausted: the token ids `generate` returned (prompt included)."""

    sequences: torch.Tensor | None = None
    error: BaseException | None = field(default=None, repr=False)


def stream_generate(model, tokenizer, inputs: dict, result: StreamResult | None = None, /,
                    **generate_kwargs) -> Iterator[str]:
    """Yield decoded text pieces while `model.generate(**inputs, **generate_kwargs)` runs in a thread.

    The text pieces concatenate to the decoded new tokens (special tokens skipped), exactly as a non-streaming
    `decode(out[0, prompt_len:], skip_special_tokens=True)`. An exception in `generate` ends the stream and
    is re-raised here, so the caller never waits on a dead worker. Batch size must be 1 (a streamer's rule).
    The first four parameters are positional-only, so `generate_kwargs` may carry generate's own `tokenizer`
    (which `stop_strings` needs) without clashing with the streamer's.
    """
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"streaming needs a batch of one prompt, got {inputs['input_ids'].shape[0]}")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = result if result is not None else StreamResult()

    def work() -> None:
        try:
            result.sequences = model.generate(**inputs, **generate_kwargs, streamer=streamer)
        except BaseException as err:  # noqa: BLE001  (handed to the consumer thread below)
            result.error = err
            streamer.end()

    worker = threading.Thread(target=work, name="wings-generate", daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        worker.join()
    if result.error is not None:
        raise result.error
