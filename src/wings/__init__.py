"""Wings: multimodal LLMs without text-only forgetting (NeurIPS 2024), as Hugging Face-native software.

`import wings` registers `WingsConfig`, `WingsForConditionalGeneration` and `WingsProcessor` with
`AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor` (no remote code needed), and the Wings classes of
every stock VLM family Wings attaches to (`wings.attach`; wings.vlm), so their saved directories load the same way.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .configuration import WingsConfig
from .modeling import WingsForConditionalGeneration, detach_learners, inject_learners
from .processing import WingsProcessor
from .quantization import quiet_backend

__version__ = "0.1.0"

AutoConfig.register("wings", WingsConfig, exist_ok=True)
AutoModelForImageTextToText.register(WingsConfig, WingsForConditionalGeneration, exist_ok=True)
AutoProcessor.register(WingsConfig, WingsProcessor, exist_ok=True)
# bitsandbytes (the `quantize` extra), once installed, is imported by peft too, and on CPUs with AVX512-BF16 it logs
# at import that an optional kernel from the hub is missing: silenced before anything imports it.
quiet_backend()

from .vlm import attach, detach, from_adapter, load_adapter, save_adapter  # noqa: E402  (registers the VLM classes)

__all__ = [
    "WingsConfig",
    "WingsForConditionalGeneration",
    "WingsProcessor",
    "attach",
    "detach",
    "detach_learners",
    "from_adapter",
    "inject_learners",
    "load_adapter",
    "save_adapter",
]
