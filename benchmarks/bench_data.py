"""Can the data pipeline keep up with training? Samples/s of `dataset[i]` + collate vs one training step.

Writes real easy-vqa images and questions as LLaVA records (a third of them two-image, two-turn), builds the
dataset with the tiny processor, then measures in the same run, at the same batch size:
  data:  samples/s of `dataset.__getitem__` + `WingsDataCollator` in the main process (no DataLoader workers);
  model: samples/s of forward + backward + AdamW step of the tiny Wings model on those batches.
Prints medians over repeats and data/model: above 1 means one loader process already outpaces the model.

    python benchmarks/bench_data.py [--records 256] [--batch-size 8] [--repeats 5] [--image-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import easy_vqa  # noqa: E402
import torch  # noqa: E402

from wings.builder import TinySpec, build_tiny  # noqa: E402
from wings.data import WingsDataCollator, build_dataset  # noqa: E402


def write_records(folder: Path, n: int) -> Path:
    paths = easy_vqa.get_train_image_paths()
    questions, answers, image_ids = easy_vqa.get_train_questions()
    (folder / "images").mkdir()
    records = []
    for k in range(n):
        ids = [image_ids[k], image_ids[k + 1]] if k % 3 == 0 else [image_ids[k]]
        for i in ids:
            shutil.copy(paths[i], folder / "images" / f"{i}.png")
        turns = [{"from": "human", "value": f"<image>\n{questions[k]}"}, {"from": "gpt", "value": answers[k]}]
        if len(ids) == 2:
            turns += [{"from": "human", "value": f"<image>\n{questions[k + 1]}"},
                      {"from": "gpt", "value": answers[k + 1]}]
        records.append({"id": f"evqa-{k}", "images": [f"images/{i}.png" for i in ids], "conversations": turns})
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def time_data(dataset, collate, batch_size: int) -> float:
    start = time.perf_counter()
    for b in range(0, len(dataset) - batch_size + 1, batch_size):
        collate([dataset[i] for i in range(b, b + batch_size)])
    done = (len(dataset) // batch_size) * batch_size
    return done / (time.perf_counter() - start)


def time_model(model, batches: list[dict], batch_size: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return len(batches) * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="training steps per model repeat")
    parser.add_argument("--image-size", type=int, default=32, help="tiny vision encoder input (patch 8)")
    args = parser.parse_args()

    model, processor = build_tiny(TinySpec(image_size=args.image_size), seed=0)
    model.train()
    collate = WingsDataCollator.from_processor(processor)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = write_records(Path(tmp), args.records)
        start = time.perf_counter()
        dataset = build_dataset(data_path, processor, max_length=1024, progress=False)
        scan_rate = len(dataset) / (time.perf_counter() - start)
        time_data(dataset, collate, args.batch_size)  # warm the file cache
        data_rates = [time_data(dataset, collate, args.batch_size) for _ in range(args.repeats)]
        batches = [collate([dataset[(s * args.batch_size + i) % len(dataset)] for i in range(args.batch_size)])
                   for s in range(args.steps)]
    time_model(model, batches[:2], args.batch_size)  # warm-up (allocator, first-call overheads)
    model_rates = [time_model(model, batches, args.batch_size) for _ in range(args.repeats)]

    data, train = statistics.median(data_rates), statistics.median(model_rates)
    tokens = statistics.mean(dataset.lengths)
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch_size}, {len(dataset)} records "
          f"(mean {tokens:.0f} tokens, {processor.image_seq_length} tokens/image, {args.image_size}px)")
    print(f"scan (construction, incl. image verify): {scan_rate:,.0f} records/s")
    print(f"data  (__getitem__ + collate):   {data:,.0f} samples/s  (median of {args.repeats})")
    print(f"model (fwd + bwd + AdamW step):  {train:,.0f} samples/s  (median of {args.repeats})")
    print(f"ratio data/model: {data / train:.1f}x")


if __name__ == "__main__":
    main()
