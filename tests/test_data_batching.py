"""Text mixing, the modality/length-grouped sampler, the collator, and a collated batch through a tiny model."""

from __future__ import annotations

import json
from collections import Counter

import easy_vqa
import pytest
import torch
from torch.utils.data import DataLoader

from wings.data import IGNORE_INDEX, ModalityLengthGroupedSampler, WingsDataCollator, build_dataset
from wings.data.dataset import mix_count, sample_pool
from wings.data.sampler import modality_length_grouped_indices


@pytest.fixture(scope="module")
def tiny(make_tiny):
    return make_tiny(seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """12 easy-vqa image records (1 or 2 images, 1 or 2 turns; absolute paths to the real PNGs) and 5 text ones."""
    folder = tmp_path_factory.mktemp("data")
    paths = easy_vqa.get_train_image_paths()
    questions, answers, image_ids = easy_vqa.get_train_questions()
    main = []
    for k in range(12):
        turns = [{"from": "human", "value": f"<image>\n{questions[k]}"}, {"from": "gpt", "value": answers[k]}]
        record = {"id": f"img{k}", "image": paths[image_ids[k]], "conversations": turns}
        if k % 3 == 0:  # some two-image, two-turn records
            record = {"id": f"img{k}", "images": [paths[image_ids[k]], paths[image_ids[k + 1]]],
                      "conversations": turns + [{"from": "human", "value": f"{questions[k + 1]} <image>"},
                                                {"from": "gpt", "value": answers[k + 1]}]}
        main.append(record)
    texts = [{"id": f"txt{k}", "conversations": [{"from": "human", "value": f"what is {k} + {k}?"},
                                                 {"from": "gpt", "value": f"{k} + {k} = {2 * k}" * (k + 1)}]}
             for k in range(5)]
    (folder / "main.json").write_text(json.dumps(main))
    (folder / "text.jsonl").write_text("\n".join(json.dumps(t) for t in texts) + "\n")
    return folder / "main.json", folder / "text.jsonl"


def text_ids(ds) -> list[str]:
    return [r.id for r in ds.records if not r.images]


def test_mix_ratio_replacement_and_determinism(files, tiny):
    main, text = files
    processor = tiny[1]
    ds = build_dataset(main, processor, text_mix_path=text, text_mix_ratio=0.6, seed=3, progress=False)
    assert mix_count(12, 0.6) == 18 and len(ds) == 12 + 18  # 18 / 30 = 0.6 of the final dataset
    assert ds.modality.count("text") == 18 and ds.report["text_mix"]["with_replacement"]
    counts = Counter(text_ids(ds))
    assert set(counts) == {f"txt{k}" for k in range(5)} and set(counts.values()) <= {3, 4}  # balanced repeats
    again = build_dataset(main, processor, text_mix_path=text, text_mix_ratio=0.6, seed=3, progress=False)
    assert text_ids(again) == text_ids(ds)
    other = build_dataset(main, processor, text_mix_path=text, text_mix_ratio=0.6, seed=4, progress=False)
    assert text_ids(other) != text_ids(ds)
    small = build_dataset(main, processor, text_mix_path=text, text_mix_ratio=0.2, seed=3, progress=False)
    assert len(text_ids(small)) == 3 and len(set(text_ids(small))) == 3  # without replacement when it fits


def test_sample_pool_edge_cases():
    assert sample_pool(10, 0, seed=0) == []
    picks = sample_pool(3, 7, seed=0)
    assert sorted(Counter(picks).values()) == [2, 2, 3] and picks == sample_pool(3, 7, seed=0)
    assert sorted(sample_pool(10, 10, seed=1)) == list(range(10))
    with pytest.raises(ValueError, match="no usable record"):
        sample_pool(0, 2, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        mix_count(10, 1.0)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_batches_are_single_modality_and_length_grouped(world_size):
    gen = torch.Generator().manual_seed(0)
    n = 203
    is_mm = (torch.rand(n, generator=gen) < 0.4).tolist()
    lengths = torch.randint(5, 500, (n,), generator=gen).tolist()
    batch_size = 4
    order = modality_length_grouped_indices(lengths, is_mm, batch_size, world_size, torch.Generator().manual_seed(1))
    step = batch_size * world_size
    assert len(order) % step == 0
    assert set(order) == set(range(n))  # every index at least once; repeats only pad a modality's last step
    assert len(order) - n < 2 * step
    for s in range(0, len(order), step):
        assert len({is_mm[i] for i in order[s: s + step]}) == 1  # a whole step (every rank's batch) is one modality
    # grouping: each batch spans a far narrower length range than random batches would
    spread = [max(lengths[i] for i in order[b: b + batch_size]) - min(lengths[i] for i in order[b: b + batch_size])
              for b in range(0, len(order), batch_size)]
    assert sum(spread) / len(spread) < 120  # random batches of 4 from U(5, 500) spread about 300
    same = modality_length_grouped_indices(lengths, is_mm, batch_size, world_size, torch.Generator().manual_seed(1))
    assert same == order


def test_sampler_class_epochs_and_dataloader(files, tiny):
    main, text = files
    processor = tiny[1]
    ds = build_dataset(main, processor, text_mix_path=text, text_mix_ratio=0.4, progress=False)
    sampler = ModalityLengthGroupedSampler.from_dataset(ds, batch_size=3, seed=0)
    first = list(sampler)
    assert len(first) == len(sampler) and first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    loader = DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=WingsDataCollator.from_processor(processor))
    for batch in loader:
        n_images = int((batch["input_ids"] == processor.image_token_id).sum()) // processor.image_seq_length
        if batch["pixel_values"] is None:
            assert n_images == 0
        else:
            assert n_images == batch["pixel_values"].shape[0] >= 3  # all-image batch: at least one image per row


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_and_concatenates_images_in_order(files, tiny, side):
    main, _ = files
    processor = tiny[1]
    ds = build_dataset(main, processor, progress=False)
    items = [ds[0], ds[1], ds[2]]  # 2 images, 1, 1
    batch = WingsDataCollator.from_processor(processor, padding_side=side, pad_to_multiple_of=8)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(it["input_ids"]) for it in items)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        real = slice(0, n) if side == "right" else slice(width - n, width)
        pad = slice(n, width) if side == "right" else slice(0, width - n)
        assert torch.equal(batch["input_ids"][row, real], item["input_ids"])
        assert torch.equal(batch["labels"][row, real], item["labels"])
        assert batch["attention_mask"][row, real].all() and not batch["attention_mask"][row, pad].any()
        assert (batch["input_ids"][row, pad] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, pad] == IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], torch.cat([it["pixel_values"] for it in items]))


def test_text_only_batch_has_no_pixels(files, tiny):
    _, text = files
    processor = tiny[1]
    ds = build_dataset(text, processor, progress=False)
    batch = WingsDataCollator.from_processor(processor)([ds[0], ds[4]])
    assert batch["pixel_values"] is None
    with pytest.raises(ValueError, match="padding_side"):
        WingsDataCollator(pad_token_id=0, padding_side="middle")


def test_collated_batches_train_a_tiny_model(files, tiny):
    """Image and text batches give a finite loss that equals the token-weighted mean of per-sample losses."""
    main, text = files
    model, processor = tiny
    collate = WingsDataCollator.from_processor(processor)
    image_ds, text_ds = build_dataset(main, processor, progress=False), build_dataset(text, processor, progress=False)
    for items in ([image_ds[0], image_ds[1], image_ds[3]], [text_ds[0], text_ds[3]]):
        batch = collate(items)
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        with torch.no_grad():
            per_sample = [(model(**collate([it])).loss, int((it["labels"][1:] != IGNORE_INDEX).sum())) for it in items]
        expected = sum(l * n for l, n in per_sample) / sum(n for _, n in per_sample)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
        model.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
