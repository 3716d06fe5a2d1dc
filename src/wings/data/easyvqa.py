"""The `easy-vqa` package (real 64x64 shape images, 13 answers) as LLaVA records and evaluation tasks.

easy-vqa ships 4,000 train / 1,000 test PNGs with 38,575 / 9,673 (question, answer, image id) triples. Each
image holds one shape (circle, rectangle, triangle) of one colour (8 colours). Records point at the package's own
PNGs (absolute paths by default, or relative to the split's image directory), so nothing is copied.
"""

from __future__ import annotations

import random
from pathlib import Path

ANSWERS = ("circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle", "brown",
           "blue", "no")
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
SPLITS = ("train", "test")
OPTION_SETS = ("all", "type")


def _package():
    try:
        import easy_vqa
    except ImportError as err:  # a core dependency, but say what to do if it is missing
        raise ImportError("the easy-vqa package is needed: pip install easy-vqa==1.0") from err
    return easy_vqa


def load_split(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """(questions, answers, image ids, {image id: absolute PNG path}) of one easy-vqa split."""
    if split not in SPLITS:
        raise ValueError(f"easy-vqa split must be one of {SPLITS}, got {split!r}")
    ev = _package()
    if split == "train":
        q, a, ids = ev.get_train_questions()
        paths = ev.get_train_image_paths()
    else:
        q, a, ids = ev.get_test_questions()
        paths = ev.get_test_image_paths()
    return list(q), list(a), [int(i) for i in ids], {int(k): str(v) for k, v in paths.items()}


def image_dir(split: str) -> Path:
    """The directory holding a split's PNGs (what relative image paths are relative to)."""
    _, _, _, paths = load_split(split)
    return Path(next(iter(paths.values()))).parent


def question_type(question: str, answer: str) -> str:
    """'yesno', 'colour' or 'shape': which option set a question's answer comes from."""
    if answer in ("yes", "no"):
        return "yesno"
    if answer in COLOURS:
        return "colour"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"easy-vqa question {question!r} has an unknown answer {answer!r}")


def type_options(qtype: str) -> list[str]:
    return {"yesno": ["yes", "no"], "colour": list(COLOURS), "shape": list(SHAPES)}[qtype]


def _subsample(n_total: int, size: int | None, seed: int) -> list[int]:
    if size is None or size >= n_total:
        return list(range(n_total))
    if size < 1:
        raise ValueError(f"subsample size must be >= 1, got {size}")
    return sorted(random.Random(seed).sample(range(n_total), size))


def _image_ref(path: str, relative: bool) -> str:
    return Path(path).name if relative else path


def llava_records(split: str = "train", size: int | None = None, seed: int = 0, relative: bool = False) -> list[dict]:
    """LLaVA-format records: `{"id", "image", "conversations": [human "<image>\\nQ", gpt "A"]}`.

    `size` draws a seeded subsample of questions (None = all); `relative=True` stores image file names relative to
    `image_dir(split)` instead of absolute paths.
    """
    questions, answers, ids, paths = load_split(split)
    records = []
    for k in _subsample(len(questions), size, seed):
        records.append({
            "id": f"easyvqa-{split}-{k}",
            "image": _image_ref(paths[ids[k]], relative),
            "conversations": [{"from": "human", "value": f"<image>\n{questions[k]}"},
                              {"from": "gpt", "value": answers[k]}],
        })
    return records


def eval_tasks(split: str = "test", size: int | None = None, seed: int = 0, options: str = "type",
               relative: bool = False) -> list[dict]:
    """Evaluation tasks `{"id", "image", "question", "options", "answer", "category"}`.

    options="type": the answer's own option set (yes/no, the 8 colours or the 3 shapes); "all": the 13 answers.
    """
    if options not in OPTION_SETS:
        raise ValueError(f"options must be one of {OPTION_SETS}, got {options!r}")
    questions, answers, ids, paths = load_split(split)
    tasks = []
    for k in _subsample(len(questions), size, seed):
        qtype = question_type(questions[k], answers[k])
        tasks.append({
            "id": f"easyvqa-{split}-{k}",
            "image": _image_ref(paths[ids[k]], relative),
            "question": questions[k],
            "options": type_options(qtype) if options == "type" else list(ANSWERS),
            "answer": answers[k],
            "category": qtype,
        })
    return tasks


def image_labels(split: str = "train") -> dict[int, dict[str, str | None]]:
    """Shape and colour of each image, read off its questions and answers (None where no question tells).

    'what shape ...' / 'what is the X shape' give the shape; 'what color ...' gives the colour; a 'yes' to
    'is there a <shape|colour>' (or a 'no' to the negated form) gives the named one.
    """
    questions, answers, ids, paths = load_split(split)
    labels: dict[int, dict[str, str | None]] = {i: {"shape": None, "colour": None} for i in paths}
    for q, a, i in zip(questions, answers, ids, strict=True):
        words = q.rstrip("?").split()
        if a in SHAPES:
            labels[i]["shape"] = a
            colours = [w for w in words if w in COLOURS]  # "what is the blue shape?"
            if colours:
                labels[i]["colour"] = colours[0]
        elif a in COLOURS:
            labels[i]["colour"] = a
            shapes = [w for w in words if w in SHAPES]  # "what color is the triangle?"
            if shapes:
                labels[i]["shape"] = shapes[0]
        else:
            negated = "not" in words or "no" in words
            if (a == "yes") != negated:  # the named thing is present
                for w in words:
                    if w in SHAPES:
                        labels[i]["shape"] = w
                    elif w in COLOURS:
                        labels[i]["colour"] = w
    return labels


CAPTION_PROMPTS = ("Describe the image.", "What is in the image?", "What do you see?")


def caption_records(split: str = "train", size: int | None = None, seed: int = 0, relative: bool = False) -> list[dict]:
    """Alignment (stage-1) records: `<image>` + a short prompt -> "<colour> <shape>", one per image whose shape and
    colour are both known from its questions (LLaVA's stage 1 pairs images with captions; these are the captions
    easy-vqa allows). `size` draws a seeded subsample of images."""
    _, _, _, paths = load_split(split)
    labels = image_labels(split)
    ids = [i for i in sorted(paths) if labels[i]["shape"] and labels[i]["colour"]]
    rng = random.Random(seed)
    records = []
    for k in _subsample(len(ids), size, seed):
        i = ids[k]
        records.append({
            "id": f"easyvqa-caption-{split}-{i}",
            "image": _image_ref(paths[i], relative),
            "conversations": [{"from": "human", "value": f"<image>\n{rng.choice(CAPTION_PROMPTS)}"},
                              {"from": "gpt", "value": f"{labels[i]['colour']} {labels[i]['shape']}"}],
        })
    return records
