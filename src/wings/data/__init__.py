"""Training data: LLaVA JSON/JSONL records -> checked, formatted, masked samples; collator; modality sampler.

Entry point: `build_dataset(path, processor, image_root=None, max_length=2048, policy="skip", report_path=None,
text_mix_path=None, text_mix_ratio=0.0, seed=0, system_prompt=None, image_check="verify")` returns an
`LlavaDataset` (a torch Dataset with exact `len`, `.lengths`, `.modality`, `.is_multimodal`, `.report`).
Batch it with `WingsDataCollator.from_processor(processor)` and sample it with `ModalityLengthGroupedSampler`.
Record format and the `<image>` convention: `wings.data.records`; labels and truncation: `wings.data.formatting`;
bad-record reasons and the report: `wings.data.report`; mixing: `wings.data.dataset`.
"""

from .collator import WingsDataCollator
from .dataset import LlavaDataset, build_dataset
from .formatting import IGNORE_INDEX, encode_conversation
from .records import Record
from .report import REASONS
from .sampler import ModalityLengthGroupedSampler, modality_length_grouped_indices

__all__ = [
    "IGNORE_INDEX",
    "REASONS",
    "LlavaDataset",
    "ModalityLengthGroupedSampler",
    "Record",
    "WingsDataCollator",
    "build_dataset",
    "encode_conversation",
    "modality_length_grouped_indices",
]
