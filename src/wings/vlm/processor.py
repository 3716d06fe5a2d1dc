"""A stock VLM's processor, loaded and saved even where its video half cannot be built.

Several stock processors (Qwen2/2.5/3-VL, LLaVA-OneVision, SmolVLM, InternVL) take a video processor beside the
image processor and tokenizer. transformers builds video processors on torchvision, which does not install beside
the CPU torch here, so `AutoProcessor.from_pretrained` fails on those directories. Wings trains and serves
images and text only, so `load_processor` then builds the *stock* processor class with the video slot left empty
(`images_only`): the image-token expansion, `mm_token_type_ids`, `image_grid_thw` and the chat template are the
stock code's, unchanged. Video inputs are refused by that processor. `save_processor` writes the stock file
layout, so the directory loads with `AutoProcessor` wherever torchvision is installed.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

VIDEO = "video_processor"


@functools.cache
def images_only(cls: type) -> type:
    """The stock processor class `cls`, constructible (and saveable) with `video_processor=None`."""
    if VIDEO not in cls.get_attributes():
        return cls

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == VIDEO and argument is None:
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    def __call__(self, *args, **kwargs):
        if kwargs.get("videos") is not None:
            raise ValueError(f"{cls.__name__} was loaded without its video processor (it needs torchvision); "
                             "Wings serves images and text")
        return cls.__call__(self, *args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """The stock layout (image processor, tokenizer, processor config naming the stock class, chat template),
        with nothing for the missing video processor. HF's Trainer calls this for every checkpoint."""
        _save_images_only(self, Path(save_directory))
        return []

    namespace = {"check_argument_for_proper_class": check_argument_for_proper_class, "__call__": __call__,
                 "save_pretrained": save_pretrained,
                 "__module__": cls.__module__, "__qualname__": cls.__qualname__, "wings_images_only": True,
                 "__doc__": f"{cls.__name__} without its video processor (wings.vlm.processor)."}
    return type(cls.__name__, (cls,), namespace)  # the stock name: saved configs name the stock class


def load_processor(path: str | Path):
    """The processor of a stock (or Wings-attached) VLM directory: `AutoProcessor`, or the stock class without
    its video processor where that cannot be built here."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    path = Path(path)
    cls_name = _processor_class_name(path)
    cls = getattr(transformers, cls_name, None) if cls_name else None
    if cls is None or is_torchvision_available() or VIDEO not in cls.get_attributes():
        return AutoProcessor.from_pretrained(path)
    settings = _processor_settings(path)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "image_processor", "tokenizer", VIDEO}
    kwargs = {k: v for k, v in settings.items() if k in accepted}
    template = _chat_template(path)
    if template is not None:
        kwargs["chat_template"] = template
    return images_only(cls)(AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path), None,
                            **kwargs)


def save_processor(processor, out_dir: str | Path) -> None:
    """`processor.save_pretrained`: the stock layout, also for a processor built by `images_only`."""
    processor.save_pretrained(Path(out_dir))


def _save_images_only(processor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    processor.image_processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    settings = processor.to_dict()
    for key in ("image_processor", "tokenizer", VIDEO, "chat_template"):
        settings.pop(key, None)
    settings["processor_class"] = type(processor).__name__
    (out / "processor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    if processor.chat_template:
        (out / "chat_template.jinja").write_text(processor.chat_template)


def _file(path: Path, name: str) -> Path | None:
    """A file of a model directory, or of a hub repository (through the local cache / a download)."""
    if path.is_dir():
        return path / name if (path / name).is_file() else None
    from transformers.utils import cached_file

    found = cached_file(str(path), name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def _processor_class_name(path: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = _file(path, name)
        if file is not None:
            data = json.loads(file.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("processor_class"):
                return str(data["processor_class"])
    return None


def _processor_settings(path: Path) -> dict:
    file = _file(path, "processor_config.json")
    if file is None:
        return {}
    data = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, expected an object")
    return data


def _chat_template(path: Path) -> str | None:
    jinja = _file(path, "chat_template.jinja")
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    legacy = _file(path, "chat_template.json")
    if legacy is not None:
        data = json.loads(legacy.read_text(encoding="utf-8"))
        return data.get("chat_template") if isinstance(data, dict) else None
    return None


def check_fits(processor, visual_ids: list[int], vocab_size: int, where: str = "the processor") -> None:
    """Refuse a processor whose image placeholder the model does not take as an image, or whose tokenizer has ids
    beyond the model's embedding table (the model would fail deep inside its forward instead)."""
    token = getattr(processor, "image_token", None)
    tokenizer = processor.tokenizer
    if token is not None:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id or token not in tokenizer.get_vocab():
            raise ValueError(f"{where}: its image token {token!r} is not in its tokenizer's vocabulary")
        if token_id not in visual_ids:
            raise ValueError(f"{where}: its image token {token!r} has id {token_id}, but the model fills image "
                             f"features at ids {visual_ids}; the processor belongs to another model")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{where}: its tokenizer has {len(tokenizer)} tokens but the model's embedding table "
                         f"only {vocab_size}; the processor belongs to another model")
