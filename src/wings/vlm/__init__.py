"""Wings on stock transformers VLMs (Llava family, Qwen-VL family, Idefics3/SmolVLM, InternVL): attach, save, load.

`import wings` registers the Wings classes of every supported family (classes.py), so a saved directory loads with
`AutoModelForImageTextToText.from_pretrained`.
"""

from .attach import add_stage2_parts, attach, detach
from .classes import is_attached, register_classes
from .registry import ARCHS, UnsupportedVLM, VLMArch, arch_for, supported_types
from .settings import WingsSettings

register_classes()

__all__ = [
    "ARCHS",
    "UnsupportedVLM",
    "VLMArch",
    "WingsSettings",
    "add_stage2_parts",
    "arch_for",
    "attach",
    "detach",
    "is_attached",
    "register_classes",
    "supported_types",
]
