"""Wings on stock transformers VLMs (Llava family, Qwen-VL family, Idefics3/SmolVLM, InternVL): attach, save, load.

Importing this package (as `import wings` does) registers the Wings classes of every supported family
(classes.py), so a saved directory loads with `AutoModelForImageTextToText.from_pretrained`.
"""

from .adapter import from_adapter, load_adapter, read_adapter_config, save_adapter, wings_state_dict
from .attach import add_stage2_parts, attach, attach_settings, detach
from .classes import is_attached, register_classes
from .processor import load_processor, save_processor
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
    "attach_settings",
    "detach",
    "from_adapter",
    "is_attached",
    "load_adapter",
    "load_processor",
    "read_adapter_config",
    "register_classes",
    "save_adapter",
    "save_processor",
    "supported_types",
    "wings_state_dict",
]
