"""Generation helpers: learner-aware KV caches, streaming, and multi-turn chat sessions."""

from ..modeling.cache import WingsDynamicCache, expand_pixel_values
from .chat import OFFICIAL_SYSTEM_PROMPT, ChatSession, load_chat_model, load_image, pick_device, pick_dtype
from .streaming import StreamResult, stream_generate

__all__ = [
    "OFFICIAL_SYSTEM_PROMPT",
    "ChatSession",
    "StreamResult",
    "WingsDynamicCache",
    "expand_pixel_values",
    "load_chat_model",
    "load_image",
    "pick_device",
    "pick_dtype",
    "stream_generate",
]
