"""Load what `wings eval` scores: a Wings/LLaVA-mode MLLM, a stock VLM with Wings attached (or plain), or a plain
HF causal LM, behind one interface.

All render prompts with the same chat template mechanics (the processor's template for MLLMs; the tokenizer's own
for LLMs, or ChatML when it has none), so a base LLM and the MLLMs built on it see identical text-only prompts.
MLLM prompts are encoded and batched by the model's codec (wings.prompting).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..processing import CHATML_TEMPLATE
from ..prompting import Codec, Prompt, codec_for
from .tasks import TaskError, TaskItem, messages, open_images

_SENTINEL = "\u2063WINGS_REPLY\u2063"  # invisible separator: never part of a template's own text


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: object
    processor: object | None  # WingsProcessor for MLLMs, None for a plain LLM
    chat_template: str
    name: str
    path: Path
    end_of_turn: str = field(init=False, default="")
    codec: Codec | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.end_of_turn = self._find_end_of_turn()
        self.codec = codec_for(self.model, self.processor) if self.processor is not None else None

    @property
    def multimodal(self) -> bool:
        return self.processor is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return 0 if pad is None else int(pad)

    def render(self, chat: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def _find_end_of_turn(self) -> str:
        """What the template writes after an assistant reply (ChatML: `<|im_end|>`), found by rendering one."""
        chat = [{"role": "user", "content": "hi"}]
        prompt = self.render(chat)
        full = self.render(chat + [{"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False)
        if full.startswith(prompt) and _SENTINEL in full:
            tail = full.split(_SENTINEL, 1)[1].rstrip()
            if tail:
                return tail
        return self.tokenizer.eos_token or ""

    def reply_text(self, chat: list[dict], option: str) -> str:
        """The assistant reply `option` as the template writes it after the generation prompt, end-of-turn included."""
        prompt = self.render(chat)
        full = self.render(chat + [{"role": "assistant", "content": option}], add_generation_prompt=False)
        if full.startswith(prompt):
            reply = full[len(prompt):].rstrip()
            if reply.startswith(option):
                return reply
        return option + self.end_of_turn

    def stop_token_ids(self) -> list[int]:
        ids = set()
        eot = self.tokenizer.convert_tokens_to_ids(self.end_of_turn) if self.end_of_turn else None
        if isinstance(eot, int) and eot != self.tokenizer.unk_token_id:
            ids.add(eot)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if i is not None:
                ids.add(int(i))
        return sorted(ids)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_item(self, item: TaskItem) -> tuple[Prompt, list[dict]]:
        """The chat of `item` (context + question) encoded with its images; returns it and the chat."""
        chat = messages(item)
        return self.encode_chat(chat, open_images(item) if item.all_images else [], item.id), chat

    def encode_chat(self, chat: list[dict], images: list, what: str = "prompt") -> Prompt:
        text = self.render(chat)
        if images and not self.multimodal:
            raise TaskError(f"record {what!r} has images but {self.name} is a text-only LLM")
        if not self.multimodal:
            return Prompt(self.encode_text(text))
        return self.codec.encode(chat, images)

    def batch(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs of `prompts` on the model's device (true positions; the pixels joined)."""
        if self.codec is not None:
            return self.codec.batch(prompts, self.device)
        width = max(len(p.ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p.ids):] = torch.tensor(p.ids, dtype=torch.long)
            mask[row, width - len(p.ids):] = 1
        # True positions (padding does not shift them): plain HF LLMs would otherwise count from the buffer start.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "position_ids": positions.to(self.device)}


def model_type_of(path: str | Path, what: str = "model directory", kind: str = "any") -> str:
    """The model_type of a model directory, after checking it (config.json, kind, weights) without loading it."""
    from ..model_dir import check_model_dir

    return str(check_model_dir(path, what, kind=kind).get("model_type", ""))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_eval_model(path: str | Path, device: str | None = None, dtype: str = "float32",
                    label: str | None = None, what: str = "model directory", kind: str = "any") -> EvalModel:
    """A Wings model (composed, or a stock VLM with Wings attached) or a stock VLM -> the model and its processor;
    anything else -> a causal LM. `what` names the directory in messages; `kind="wings"` refuses anything but a
    Wings model before loading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model_kinds import is_vlm_type, load_model, load_processor

    path = Path(path)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    model_type = model_type_of(path, what, kind)
    if model_type == "wings" or is_vlm_type(model_type):
        model = load_model(path, dtype=torch_dtype)
        processor = load_processor(path)
        tokenizer, template = processor.tokenizer, processor.chat_template or CHATML_TEMPLATE
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        processor = None
        tokenizer = AutoTokenizer.from_pretrained(path)
        template = tokenizer.chat_template or CHATML_TEMPLATE
    model.to(device or default_device()).eval()
    return EvalModel(model, tokenizer, processor, template, label or path.name, path)
