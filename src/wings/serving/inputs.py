"""A served model and the turn of one chat request into its token ids and pixels, every problem a 4xx.

Images are opened with `wings.images.open_image` under the server's own policy: data URLs always, local paths
only under `--allow-local-images DIR`, http(s) only with `--allow-remote-images`, and the size limits checked
on the header before decoding (a decompression bomb is refused without allocating its pixels).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..generation.chat import OFFICIAL_SYSTEM_PROMPT, ChatSession, load_chat_model
from ..images import DEFAULT_LIMITS, ImageError, ImageLimits, SourcePolicy, open_image
from ..model_kinds import model_facts
from ..paths import escaped
from ..processing import IMAGE_TOKEN
from ..prompting import Prompt, codec_for
from .errors import bad_request
from .features import image_hash
from .hf_compat import to_processor_messages
from .protocol import GREEDY_BELOW_TEMPERATURE, ChatRequest


@dataclass(frozen=True)
class ServingPolicy:
    """What requests may ask for: image sources and sizes, images per request, default answer length."""

    image_limits: ImageLimits = DEFAULT_LIMITS
    local_images_root: Path | None = None
    allow_remote_images: bool = False
    max_images: int = 8
    default_max_tokens: int = 256

    @property
    def sources(self) -> SourcePolicy:
        return SourcePolicy(allow_paths=self.local_images_root is not None, path_root=self.local_images_root,
                            allow_remote=self.allow_remote_images)


@dataclass(frozen=True)
class Sampling:
    """Per-request decoding: greedy when `temperature` is None, else sampling with this row's own generator."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


@dataclass
class Prepared:
    """One request, ready for the scheduler: the encoded prompt (ids with images expanded, pixel tensors), and how
    to decode."""

    prompt: Prompt
    n_images: int
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    router: bool = False
    prompt_router: bool = False
    image_hashes: list[str] = field(default_factory=list)  # sha256 of each image's pixels (the feature cache's key)
    logprobs: int | None = None  # completions: log-probabilities of generated tokens, with this many top tokens
    echo_logprobs: int | None = None  # completions with echo: the prompt tokens' log-probabilities too

    @property
    def input_ids(self) -> list[int]:
        return self.prompt.ids

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return self.prompt.pixel_values

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.ids)


@dataclass(frozen=True)
class RouterStatus:
    available: bool
    reason: str | None = None

    def as_dict(self) -> dict:
        return {"available": self.available, "reason": self.reason}


def router_status(model) -> RouterStatus:
    """Whether this model's forward records router weights, and if not, why (for the page to say so)."""
    from ..model_kinds import model_facts
    from ..modeling import wings_modules

    facts = model_facts(model)
    if facts.mode == "llava":
        what = "a stock VLM without Wings parts" if facts.attached else "LLaVA-mode model"
        return RouterStatus(False, f"{what}: no learners and no router")
    if not facts.use_router or not any(hasattr(m, "router") for m in wings_modules(model)):
        return RouterStatus(False, "stage-1 Wings model: a visual learner but no router yet (stage 2 adds it)")
    return RouterStatus(True)


class ServedModel:
    """A model, its processor and the request policy. Only the scheduler thread runs the model; `prepare`
    (tokenizing, image decoding) runs on request threads, with the processor behind a lock."""

    def __init__(self, name: str, model, processor, policy: ServingPolicy | None = None):
        self.name = name
        self.model = model
        self.processor = processor
        self.policy = policy or ServingPolicy()
        self.context_length = ChatSession(model, processor).context_length
        self.facts = model_facts(model)
        self.codec = codec_for(model, processor)
        self.router = router_status(model)
        self.official = getattr(model.config, "compat", "none") == "official"
        self._processor_lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, name: str | None = None, device: str = "auto", dtype: str = "auto",
             policy: ServingPolicy | None = None) -> ServedModel:
        model, processor = load_chat_model(model_dir, device=device, dtype=dtype)
        # A folder's name need not be UTF-8; the API and the page need text.
        return cls(name or escaped(Path(model_dir).resolve().name), model, processor, policy)

    def info(self) -> dict:
        config = self.model.config
        return {"id": self.name, "mode": self.facts.mode, "router": self.router.as_dict(),
                "context_length": self.context_length, "compat": getattr(config, "compat", "none"),
                "max_images": 1 if self.official else self.policy.max_images,
                "max_image_bytes": self.policy.image_limits.max_bytes,
                "max_image_pixels": self.policy.image_limits.max_pixels}

    def open_image(self, url: str, where: str):
        try:
            return open_image(url, self.policy.image_limits, self.policy.sources)
        except ImageError as err:
            hint = ""
            if err.reason == "not_allowed" and not url.startswith(("http://", "https://", "data:")):
                hint = " (start the server with --allow-local-images DIR to read files under DIR)"
            elif err.reason == "not_allowed":
                hint = " (send the image inline as a data URL, or start the server with --allow-remote-images)"
            raise bad_request(f"{where}: {err}{hint}", param=where, code=f"image_{err.reason}") from None

    def prepare(self, request: ChatRequest) -> Prepared:
        """Validate and tokenize a request (images decoded here); a 400 names the message and problem."""
        messages = to_processor_messages([m.model_dump(exclude_none=True) for m in request.messages])
        images = []
        for i, message in enumerate(messages):
            if message["role"] == "developer":
                message["role"] = "system"
            for j, part in enumerate(message["content"]):
                where = f"messages[{i}].content[{j}]" if isinstance(request.messages[i].content, list) \
                    else f"messages[{i}].content"
                if part["type"] == "image":
                    if message["role"] != "user":
                        raise bad_request(f"{where}: images are only accepted in user messages", param=where)
                    images.append((where, part["url"]))
                elif IMAGE_TOKEN in part.get("text", ""):
                    raise bad_request(f"{where}: the text holds the reserved {IMAGE_TOKEN!r} token; send images "
                                      "as image_url parts, one per image", param=where)
        limit = 1 if self.official else self.policy.max_images
        if len(images) > limit:
            why = "compat='official' models read one image per conversation" if self.official \
                else f"the server takes at most {limit} images per request (--max-images)"
            raise bad_request(f"the request has {len(images)} images but {why}", param="messages",
                              code="too_many_images")
        if self.official and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": OFFICIAL_SYSTEM_PROMPT}]})
        pil_images = [self.open_image(url, where) for where, url in images]
        with self._processor_lock:
            prompt = self.codec.encode(messages, pil_images)
        visual = sum(token in self.facts.visual_ids for token in prompt.ids)
        return Prepared(
            prompt=prompt, n_images=len(pil_images), image_hashes=[image_hash(im) for im in pil_images],
            max_new_tokens=self._max_new_tokens(request, len(prompt.ids), len(pil_images), visual),
            sampling=self._sampling(request), stop=request.stop_sequences,
            router=request.wings_router, prompt_router=request.wings_prompt_router,
        )

    def _max_new_tokens(self, request: ChatRequest, prompt_tokens: int, n_images: int, visual_tokens: int) -> int:
        room = self.context_length - prompt_tokens
        images = f", {n_images} images' {visual_tokens} tokens included" if n_images else ""
        if room < 1:
            raise bad_request(f"the prompt is {prompt_tokens} tokens{images}, but the model's context is "
                              f"{self.context_length} tokens; shorten the conversation", param="messages",
                              code="context_length_exceeded")
        requested = request.requested_max_tokens
        if requested is None:
            return min(room, self.policy.default_max_tokens)
        if requested > room:
            field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
            raise bad_request(f"{field}: the prompt is {prompt_tokens} tokens{images} and {requested} more were "
                              f"requested, but the model's context is {self.context_length} tokens; ask for at most "
                              f"{room}", param=field, code="context_length_exceeded")
        return requested

    def _sampling(self, request: ChatRequest) -> Sampling:
        config = self.model.generation_config
        temperature = request.temperature
        if temperature is None and getattr(config, "do_sample", False):
            temperature = config.temperature if config.temperature is not None else 1.0
        if temperature is None or temperature < GREEDY_BELOW_TEMPERATURE:  # None, 0 or nearly 0: greedy (its limit)
            return Sampling(seed=request.seed)
        top_p = request.top_p if request.top_p is not None else getattr(config, "top_p", None)
        return Sampling(temperature=float(temperature), top_p=top_p, top_k=getattr(config, "top_k", None) or None,
                        seed=request.seed)
