"""`wings smoke`: build a tiny model, answer one question about a real easy-vqa image, print it."""

from __future__ import annotations

from .args import positive_int


def register(sub) -> None:
    p = sub.add_parser("smoke", help="tiny end-to-end check: build, then answer one image question")
    p.add_argument("--max-new-tokens", type=positive_int, default=8)
    p.set_defaults(func=run)


def run(args) -> int:
    import easy_vqa
    import torch

    from ..builder import build_tiny
    from ..images import open_image

    model, processor = build_tiny()
    questions, answers, image_ids = easy_vqa.get_test_questions()
    image = open_image(easy_vqa.get_test_image_paths()[image_ids[0]])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{questions[0]}"}], add_generation_prompt=True, tokenize=False
    )
    batch = processor(text=prompt, images=[image])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    reply = processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"question: {questions[0]}\ngold answer: {answers[0]}\nuntrained tiny model says: {reply!r}")
    return 0
