"""A multi-turn chat with a Wings model (composed or attached to a stock VLM): history, attached images, context
checks, streamed or whole replies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..images import open_image
from ..paths import lone_surrogate
from ..processing import IMAGE_TOKEN
from .streaming import StreamResult, stream_generate

# The released model was trained with this system prompt, and its `system_prompt_length` counts its tokens.
OFFICIAL_SYSTEM_PROMPT = "You are a helpful assistant."


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully (RGB) within the default size limits, or raise `ImageError` naming the file."""
    return open_image(Path(path))


def pick_device(requested: str = "auto") -> torch.device:
    """`auto`: CUDA, then Apple MPS, then CPU."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA when supported, fp16 on MPS, fp32 on CPU."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested in names:
        return names[requested]
    if requested != "auto":
        raise ValueError(f"unknown dtype {requested!r}; choose auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def load_chat_model(model_dir: str | Path, device: str = "auto", dtype: str = "auto", quantize: str | None = None):
    """(model, processor) from a saved Wings directory (composed, or a stock VLM with Wings attached) or a stock
    VLM directory, in eval mode on the chosen device and dtype.

    `quantize` ("int8" | "nf4"): the LLM's linear layers in 8-bit or 4-bit NF4 (bitsandbytes), the Wings parts,
    projector, vision tower and LM head in `dtype` (wings.quantization); a `QuantizationError` (a ValueError) where
    that cannot run here."""
    from ..model_kinds import load_model, load_processor

    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory (no config.json)")
    target = pick_device(device)
    if quantize is not None:  # placed on the device while loading; bitsandbytes weights are not moved after
        model = load_model(path, dtype=pick_dtype(dtype, target), quantize=quantize, device_map={"": target})
        return model.eval(), load_processor(path)
    model = load_model(path, dtype=pick_dtype(dtype, target))
    processor = load_processor(path)
    return model.to(target).eval(), processor


@dataclass
class ChatSession:
    """Conversation state: messages so far, images (in placeholder order), and generation settings.

    Each new user turn takes the images attached since the previous turn; their `<image>` placeholders go
    first in that turn (as the released model's training data put them), unless the text already holds them.
    """

    model: object
    processor: object
    system_prompt: str | None = None
    generation: dict = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    pending: list[Image.Image] = field(default_factory=list)

    @property
    def context_length(self) -> int:
        """The LLM's context, or the position router's width when that is shorter (it has no column beyond)."""
        from ..model_kinds import model_facts

        return model_facts(self.model).context_length

    @property
    def codec(self):
        """Messages + images -> model inputs, the model's way (wings.prompting)."""
        if "_codec" not in self.__dict__:
            from ..prompting import codec_for

            self.__dict__["_codec"] = codec_for(self.model, self.processor)
        return self.__dict__["_codec"]

    def attach(self, path: str | Path) -> None:
        """Attach an image to the next user turn (checked now, so a bad file fails before any generation)."""
        image = load_image(path)
        official = getattr(self.model.config, "compat", "none") == "official"
        if official and len(self.images) + len(self.pending) >= 1:
            raise ValueError("compat='official' models read one image per conversation; /reset to start over")
        self.pending.append(image)

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()
        self.pending.clear()

    def _turn(self, text: str) -> tuple[list[dict], list[Image.Image]]:
        # Text that is not Unicode (a terminal byte its encoding does not allow reaches Python as a lone surrogate)
        # would make the tokenizer raise a TypeError; refused as a bad turn instead.
        for what, value in (("the message", text), ("the system prompt", self.system_prompt or "")):
            found = lone_surrogate(value)
            if found:
                raise ValueError(f"{what} holds {found[1]}, which is not text (a byte that is not valid in the "
                                 "terminal's encoding, or half of a UTF-16 pair); type it again")
        placeholders = text.count(IMAGE_TOKEN)
        if placeholders and placeholders != len(self.pending):
            raise ValueError(f"the prompt has {placeholders} `<image>` placeholders but {len(self.pending)} images "
                             "are attached")
        content = text if placeholders else f"{IMAGE_TOKEN}\n" * len(self.pending) + text
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages = system + self.messages + [{"role": "user", "content": content}]
        return messages, self.images + self.pending

    def prepare(self, text: str) -> tuple[dict, list[dict]]:
        """Model inputs for the history plus a new user turn; ValueError if they exceed the model's context."""
        messages, images = self._turn(text)
        prompt = self.codec.encode(messages, images)
        n = len(prompt.ids)
        if n >= self.context_length:
            raise ValueError(f"the prompt is {n} tokens (images included) but the model's context is "
                             f"{self.context_length} tokens; shorten it or /reset the history")
        inputs = self.codec.batch([prompt], self.model.device)
        inputs.pop("position_ids", None)  # generate derives them from the mask
        return inputs, messages

    def _generate_kwargs(self, prompt_len: int) -> dict:
        kwargs = dict(self.generation)
        room = self.context_length - prompt_len
        kwargs["max_new_tokens"] = min(int(kwargs.get("max_new_tokens", 256)), room)
        if kwargs.get("stop_strings"):
            kwargs["tokenizer"] = self.processor.tokenizer
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = self.processor.tokenizer.pad_token_id
        return kwargs

    def _finish(self, messages: list[dict], sequences: torch.Tensor, prompt_len: int) -> str:
        reply = self.processor.tokenizer.decode(sequences[0, prompt_len:], skip_special_tokens=True)
        for stop in self.generation.get("stop_strings") or []:
            reply = reply.split(stop)[0]  # generation stops *after* the stop string; the history ends before it
        turns = messages[1:] if self.system_prompt else messages
        self.messages = turns + [{"role": "assistant", "content": reply}]
        self.images, self.pending = self.images + self.pending, []
        return reply

    def ask(self, text: str) -> str:
        """Answer one user turn (whole reply) and record both turns in the history."""
        inputs, messages = self.prepare(text)
        prompt_len = inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model.generate(**inputs, **self._generate_kwargs(prompt_len))
        return self._finish(messages, out, prompt_len)

    def ask_stream(self, text: str) -> Iterator[str]:
        """Like `ask`, but yield text pieces as they are generated; the history is updated at the end."""
        inputs, messages = self.prepare(text)
        prompt_len = inputs["input_ids"].shape[1]
        result = StreamResult()
        yield from stream_generate(self.model, self.processor.tokenizer, inputs, result,
                                   **self._generate_kwargs(prompt_len))
        self._finish(messages, result.sequences, prompt_len)
