"""Text-only knowledge the demo's base LLM must remember, generated from a seed.

A small random knowledge base (made-up countries and their capitals, people's favourite colours and shapes),
fixed general facts (sides of shapes, colour mixing, colours of things) and single-digit addition. Training
records use one set of question phrasings; held-out evaluation asks about the *same* facts with *other*
phrasings (and addition on operand pairs never trained), so held-out accuracy measures remembered knowledge
rather than memorised strings. Answers are one or two words, so exact match and multiple choice work on a
tiny model.

Outputs: LLaVA text-only records `{"id", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}` and
evaluation tasks `{"id", "question", "options", "answer", "category", "split"}`.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

COLOURS = ["red", "green", "blue", "yellow", "black", "gray", "teal", "brown"]  # easy-vqa's colours
SHAPES = ["circle", "rectangle", "triangle"]  # easy-vqa's shapes
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

# Fixed general knowledge: (category, subject, answer). Same in every seed.
GENERAL_FACTS = [
    *[("sides", s, NUMBER_WORDS[n]) for s, n in [("triangle", 3), ("rectangle", 4), ("square", 4), ("pentagon", 5),
                                                  ("hexagon", 6), ("octagon", 8), ("circle", 0)]],
    *[("mix", f"{a} and {b}", c) for a, b, c in [("blue", "yellow", "green"), ("red", "white", "pink"),
                                                  ("red", "yellow", "orange"), ("red", "blue", "purple"),
                                                  ("black", "white", "gray"), ("blue", "green", "teal")]],
    *[("thing", t, c) for t, c in [("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
                                    ("the sky", "blue"), ("a tomato", "red"), ("chocolate", "brown"),
                                    ("an orange", "orange")]],
]

# Question phrasings per category: the first list is trained on, the second only evaluated. American "color",
# as in easy-vqa's questions, so the MLLM later reads words the LLM already knows.
TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "capital": (
        ["What is the capital of {s}?", "Name the capital city of {s}.", "Which city is the capital of {s}?",
         "{s} has which capital?", "Tell me {s}'s capital city.", "The capital of {s} is which city?"],
        ["What city is {s}'s capital?", "Tell me the capital of {s}."],
    ),
    "colour": (
        ["What is {s}'s favourite color?", "Which color does {s} like best?", "What color does {s} love?",
         "Name the favourite color of {s}.", "{s}'s favourite color is which one?", "Tell me {s}'s color."],
        ["Tell me the favourite color of {s}.", "{s} likes which color most?"],
    ),
    "shape": (
        ["What is {s}'s favourite shape?", "Which shape does {s} like best?", "What shape does {s} love?",
         "Name the favourite shape of {s}.", "{s}'s favourite shape is which one?", "Tell me {s}'s shape."],
        ["Tell me the favourite shape of {s}.", "{s} likes which shape most?"],
    ),
    "sides": (
        ["How many sides does a {s} have?", "A {s} has how many sides?", "Count the sides of a {s}.",
         "Number of sides of a {s}?", "Tell me how many sides a {s} has."],
        ["Tell me the number of sides of a {s}.", "What is the number of sides a {s} has?"],
    ),
    "mix": (
        ["What color do you get by mixing {s}?", "Mixing {s} gives which color?", "Which color comes from {s}?",
         "Tell me the color you get from {s}.", "What do you get if you mix {s}?"],
        ["Tell me the color made by mixing {s}.", "If you mix {s}, what color do you get?"],
    ),
    "thing": (
        ["What color is {s}?", "Which color is {s}?", "{s} is what color?", "Tell me what color {s} is.",
         "Name the color of {s}."],
        ["Tell me the color of {s}.", "What is the usual color of {s}?"],
    ),
    "add": (
        ["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}."],
        ["What is {a} + {b}?", "What is {a} plus {b}?"],  # held-out addition = unseen operand pairs
    ),
}
# Yes/no checks of every trained fact, plain and negated ({o} = the answer or a distractor). Training only: they
# teach the LLM to answer yes/no and to handle "not", as a real LLM would before it meets easy-vqa's
# "is there not a red shape?". Evaluation stays multiple choice over each fact's own options.
VERIFY_TEMPLATES: dict[str, tuple[str, str]] = {
    "capital": ("Is {o} the capital of {s}?", "Is {o} not the capital of {s}?"),
    "colour": ("Is {s}'s favourite color {o}?", "Is {s}'s favourite color not {o}?"),
    "shape": ("Is {s}'s favourite shape a {o}?", "Is {s}'s favourite shape not a {o}?"),
    "sides": ("Does a {s} have {o} sides?", "Does a {s} not have {o} sides?"),
    "mix": ("Does mixing {s} give {o}?", "Does mixing {s} not give {o}?"),
    "thing": ("Is {s} {o}?", "Is {s} not {o}?"),
    "add": ("Is {a} + {b} equal to {o}?", "Is {a} + {b} not equal to {o}?"),
}
PEOPLE = ["Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kemal", "Lena",
          "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sven", "Tomas", "Uma", "Viktor", "Wanda", "Xavi",
          "Yara", "Zane", "Amara", "Boris", "Clara", "Dmitri", "Esme", "Felix", "Gia", "Hana", "Ivo", "Jana",
          "Kai", "Lior", "Mira", "Nico"]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd"]


@dataclass
class Fact:
    """One thing to remember: `category` relation of `subject` is `answer` (`options` hold the MC distractors)."""

    category: str
    subject: str
    answer: str
    options: list[str] = field(default_factory=list)


@dataclass
class KnowledgeBase:
    facts: list[Fact]
    heldout_add: list[Fact]  # addition on operand pairs never trained on (neither order)
    seed: int

    def by_category(self, category: str) -> list[Fact]:
        return [f for f in self.facts if f.category == category]


def _made_up_word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def _unique_words(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _made_up_word(rng, syllables)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def _options(rng: random.Random, answer: str, pool: list[str], n: int) -> list[str]:
    """`n` options holding the answer and n-1 distinct distractors from `pool`, in a seeded random order."""
    distractors = rng.sample([p for p in dict.fromkeys(pool) if p != answer], n - 1)
    opts = [answer, *distractors]
    rng.shuffle(opts)
    return opts


def build_knowledge(seed: int = 0, n_countries: int = 24, n_people: int = 16, max_operand: int = 9,
                    heldout_fraction: float = 0.2, n_options: int = 4) -> KnowledgeBase:
    """A seeded random knowledge base; the same arguments always give the same facts and options."""
    if n_people > len(PEOPLE):
        raise ValueError(f"n_people={n_people} exceeds the {len(PEOPLE)} names available")
    if n_countries < n_options or not 0 <= heldout_fraction < 1:
        raise ValueError(f"need n_countries >= n_options ({n_options}) and 0 <= heldout_fraction < 1")
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = _unique_words(rng, n_countries, 2, taken)
    cities = _unique_words(rng, n_countries, 2, taken)
    facts = [Fact("capital", c, city) for c, city in zip(countries, cities, strict=True)]
    for name in rng.sample(PEOPLE, n_people):
        facts.append(Fact("colour", name, rng.choice(COLOURS)))
        facts.append(Fact("shape", name, rng.choice(SHAPES)))
    facts += [Fact(c, s, a) for c, s, a in GENERAL_FACTS]
    pools = {"capital": cities, "colour": COLOURS, "shape": SHAPES + ["square", "star", "oval"],
             "sides": NUMBER_WORDS, "mix": COLOURS + ["pink", "orange", "purple", "white"],
             "thing": COLOURS + ["white", "orange", "pink"]}
    for f in facts:
        f.options = _options(rng, f.answer, pools[f.category], n_options)

    # Addition: hold out unordered pairs {a, b} with a != b entirely, so neither order is ever trained.
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(a + 1, max_operand + 1)]
    rng.shuffle(pairs)
    held = pairs[: int(len(pairs) * heldout_fraction)]
    heldout_pairs = sorted(p for a, b in held for p in ((a, b), (b, a)))
    held_set = set(heldout_pairs)
    sums = [str(n) for n in range(2 * max_operand + 1)]
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            if (a, b) not in held_set:
                facts.append(Fact("add", f"{a} {b}", str(a + b), _options(rng, str(a + b), sums, n_options)))
    heldout_add = [Fact("add", f"{a} {b}", str(a + b), _options(rng, str(a + b), sums, n_options))
                   for a, b in heldout_pairs]
    return KnowledgeBase(facts, heldout_add, seed)


def _phrase(template: str, fact: Fact, option: str = "") -> str:
    if fact.category == "add":
        a, b = fact.subject.split()
        return template.format(a=a, b=b, o=option)
    text = template.format(s=fact.subject, o=option)
    return text[0].upper() + text[1:]


def text_records(kb: KnowledgeBase, verify: bool = True) -> list[dict]:
    """LLaVA-format training records: every fact in every *training* phrasing (addition: trained pairs only),
    plus (`verify=True`) four yes/no checks per fact: plain/negated x its answer/its first distractor."""
    records = []
    for i, fact in enumerate(kb.facts):
        qas = [(_phrase(t, fact), fact.answer) for t in TEMPLATES[fact.category][0]]
        if verify:
            plain, negated = VERIFY_TEMPLATES[fact.category]
            wrong = next(o for o in fact.options if o != fact.answer)
            qas += [(_phrase(plain, fact, fact.answer), "yes"), (_phrase(plain, fact, wrong), "no"),
                    (_phrase(negated, fact, fact.answer), "no"), (_phrase(negated, fact, wrong), "yes")]
        for j, (question, answer) in enumerate(qas):
            records.append({"id": f"text-{fact.category}-{i}-{j}",
                            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    return records


def text_tasks(kb: KnowledgeBase, split: str = "heldout") -> list[dict]:
    """Evaluation tasks. `heldout`: unseen phrasings of every fact plus unseen addition pairs;
    `seen`: the first training phrasing of every non-addition fact (a memorisation check)."""
    if split not in ("heldout", "seen"):
        raise ValueError(f"split must be 'heldout' or 'seen', got {split!r}")
    tasks = []
    for i, fact in enumerate(kb.facts):
        if fact.category == "add":
            continue
        templates = TEMPLATES[fact.category][1] if split == "heldout" else TEMPLATES[fact.category][0][:1]
        for j, template in enumerate(templates):
            tasks.append(_task(f"{split}-{fact.category}-{i}-{j}", _phrase(template, fact), fact, split))
    if split == "heldout":
        for i, fact in enumerate(kb.heldout_add):
            tasks.append(_task(f"heldout-add-{i}", _phrase(TEMPLATES["add"][1][i % 2], fact), fact, split))
    return tasks


def _task(task_id: str, question: str, fact: Fact, split: str) -> dict:
    return {"id": task_id, "question": question, "options": list(fact.options), "answer": fact.answer,
            "category": fact.category, "split": split}


def tokenizer_corpus(kb: KnowledgeBase) -> list[str]:
    """Every question and answer the text data can produce (both splits), for training the tokenizer."""
    texts = [r["conversations"][0]["value"] for r in text_records(kb)] + [t["question"] for t in text_tasks(kb)]
    return texts + [f.answer for f in kb.facts] + [o for f in kb.facts for o in f.options]


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """Write records as JSON lines through a temp file + rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
