"""Label masking token by token, image expansion, and truncation that never splits an image."""

from __future__ import annotations

from pathlib import Path

import easy_vqa
import pytest

from wings.data import IGNORE_INDEX, encode_conversation
from wings.data.formatting import build_sample
from wings.data.records import Record
from wings.data.report import BadRecord

MESSAGES = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "<image>\nwhat is the blue shape?"},
    {"role": "assistant", "content": "circle"},
    {"role": "user", "content": "and here <image> what color is the shape?"},
    {"role": "assistant", "content": "the shape is red"},
)


@pytest.fixture(scope="module")
def processor(make_tiny):
    return make_tiny(mode="llava")[1]


def expected_labels(ids: list[int], processor) -> list[int]:
    """The rule, derived from the token stream alone: inside an assistant turn, everything after its
    `<|im_start|>assistant\\n` header up to and including `<|im_end|>` is learned; nothing else is."""
    tok = processor.tokenizer
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    newline = tok.encode("\n", add_special_tokens=False)
    labels, role, in_header, header = [], None, False, []
    for token in ids:
        if token == start:
            in_header, header, role = True, [], None
            labels.append(IGNORE_INDEX)
        elif in_header:
            labels.append(IGNORE_INDEX)
            header.append(token)
            if header[-len(newline):] == newline:
                in_header, role = False, tok.decode(header[: -len(newline)])
        else:
            learn = role == "assistant" and token != processor.image_token_id
            labels.append(token if learn else IGNORE_INDEX)
            if token == end:
                role = None  # the "\n" after <|im_end|> belongs to no turn
    return labels


def test_labels_token_by_token_on_a_multi_turn_multi_image_sample(processor):
    enc = encode_conversation(MESSAGES, processor, max_length=4096)
    assert enc.labels == expected_labels(enc.input_ids, processor)
    learned = [t for t in enc.labels if t != IGNORE_INDEX]
    assert processor.tokenizer.decode(learned) == "circle<|im_end|>the shape is red<|im_end|>"
    # the whole sequence is the chat template's text with each <image> expanded
    text = processor.apply_chat_template(list(MESSAGES), tokenize=False)
    assert processor.tokenizer.decode(enc.input_ids) == processor.expand_placeholders(text)
    span = processor.image_seq_length
    image_positions = [i for i, t in enumerate(enc.input_ids) if t == processor.image_token_id]
    assert len(image_positions) == 2 * span and enc.n_images == 2 and not enc.truncated
    assert all(enc.labels[i] == IGNORE_INDEX for i in image_positions)
    # two contiguous runs of `span` image tokens
    runs = [p for k, p in enumerate(image_positions) if k == 0 or image_positions[k - 1] != p - 1]
    assert len(runs) == 2 and image_positions == [r + j for r in runs for j in range(span)]


def test_labels_match_the_processor_output_for_text_only(processor):
    messages = (MESSAGES[0], {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"})
    enc = encode_conversation(messages, processor, max_length=4096)
    direct = processor(text=processor.apply_chat_template(list(messages), tokenize=False))["input_ids"][0]
    assert enc.input_ids == direct.tolist()
    assert enc.labels == expected_labels(enc.input_ids, processor)


def test_truncation_never_splits_or_drops_an_image(processor):
    full = encode_conversation(MESSAGES, processor, max_length=4096)
    span = processor.image_seq_length
    last_image_end = max(i for i, t in enumerate(full.input_ids) if t == processor.image_token_id) + 1
    outcomes = set()
    for max_length in range(1, len(full.input_ids) + 2):
        try:
            enc = encode_conversation(MESSAGES, processor, max_length=max_length)
        except BadRecord as e:
            assert e.reason == ("truncated_image" if max_length < last_image_end else "over_long"), max_length
            outcomes.add(e.reason)
            continue
        assert enc.input_ids.count(processor.image_token_id) == 2 * span and enc.n_images == 2, max_length
        assert len(enc.input_ids) == min(max_length, len(full.input_ids))
        assert enc.input_ids == full.input_ids[: len(enc.input_ids)]  # a prefix: cut, never rearranged
        assert enc.labels == full.labels[: len(enc.labels)]
        assert enc.truncated == (max_length < len(full.input_ids)) and enc.full_length == len(full.input_ids)
        outcomes.add("kept")
    assert outcomes == {"truncated_image", "kept"}  # the sweep crossed both


def test_a_cut_inside_an_image_is_a_bad_record_naming_it(processor):
    paths = easy_vqa.get_train_image_paths()
    record = Record("mem[0]", "r", MESSAGES, (Path(paths[0]), Path(paths[1])))
    full = encode_conversation(MESSAGES, processor, max_length=4096)
    second = [i for i, t in enumerate(full.input_ids) if t == processor.image_token_id][processor.image_seq_length]
    with pytest.raises(BadRecord, match="would drop 1 of its 2 images") as err:
        build_sample(record, processor, max_length=second + 3)  # cut inside the second image
    assert err.value.reason == "truncated_image"
    text_only = Record("mem[1]", "t", (MESSAGES[1] | {"content": "no image"}, MESSAGES[2]), ())
    assert "pixel_values" not in build_sample(text_only, processor, max_length=64)


def test_template_without_generation_block_is_a_clear_error(processor):
    import copy

    plain = copy.copy(processor)
    plain.chat_template = processor.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    with pytest.raises(ValueError, match="generation"):
        encode_conversation(MESSAGES, plain, max_length=4096)
