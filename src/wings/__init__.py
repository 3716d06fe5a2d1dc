"""Wings: multimodal LLMs without text-only forgetting (NeurIPS 2024), as Hugging Face-native software.

`import wings` registers `WingsConfig`, `WingsForConditionalGeneration` and `WingsProcessor` with
`AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor` (no remote code needed).
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .configuration import WingsConfig
from .modeling import WingsForConditionalGeneration, detach_learners, inject_learners
from .processing import WingsProcessor

__version__ = "0.1.0"

AutoConfig.register("wings", WingsConfig, exist_ok=True)
AutoModelForImageTextToText.register(WingsConfig, WingsForConditionalGeneration, exist_ok=True)
AutoProcessor.register(WingsConfig, WingsProcessor, exist_ok=True)

__all__ = [
    "WingsConfig",
    "WingsForConditionalGeneration",
    "WingsProcessor",
    "detach_learners",
    "inject_learners",
]
