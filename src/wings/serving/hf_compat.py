"""The one place that reaches into transformers' non-public serving code (`transformers.cli.serving`).

We reuse its conversion of OpenAI chat messages into processor messages (`image_url` parts become
`{"type": "image", "url": ...}`, string content becomes one text part), the same code `transformers serve`
runs, so both servers read a request the same way. It is not a public API: `check_serving_internals` probes
it and fails loudly, naming this file, when the pinned transformers version changes it
(tests/test_serve_hf_compat.py runs that probe).
"""

from __future__ import annotations

import transformers

PINNED_TRANSFORMERS = "5.24.0"

_PROBE = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
    {"role": "assistant", "content": None},
]
_EXPECTED = [
    {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
    {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                 {"type": "image", "url": "data:image/png;base64,AAAA"}]},
    {"role": "assistant", "content": []},
]


def to_processor_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages (already validated) -> processor chat messages with text/image parts, in order."""
    from transformers.cli.serving.utils import BaseHandler, Modality

    return BaseHandler.get_processor_inputs_from_messages(messages, Modality.VLM)


def check_serving_internals() -> None:
    """Raise RuntimeError if transformers' serving internals no longer behave as this module expects."""
    where = "src/wings/serving/hf_compat.py"
    try:
        got = to_processor_messages(_PROBE)
    except (ImportError, AttributeError, TypeError, KeyError) as err:
        raise RuntimeError(f"transformers {transformers.__version__} changed its serving internals "
                           f"({type(err).__name__}: {err}); update {where}") from err
    if got != _EXPECTED:
        raise RuntimeError(f"transformers {transformers.__version__} converts chat messages differently: "
                           f"got {got}, expected {_EXPECTED}; update {where}")
