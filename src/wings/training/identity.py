"""What makes a training run *this* run: the settings that change what is computed, and fingerprints of the data
and the start model. Written to `output_dir/run_identity.json` when a run starts; a resume compares against it,
so a rerun with other data, another model or another learning rate never continues an old run by mistake.

Not part of the identity (changing them between a run and its resume is fine): output_dir, train.resume,
overwrite, logging and checkpointing cadence (report_to, logging_steps, save_steps, save_total_limit),
data.num_workers, gradient_checkpointing and learner_recompute (same math), ddp_backend.

Fingerprints: data files are hashed whole (sha256), and a data file or start model that moved but kept its content
is the same run; images are named by the records, not hashed (so data.image_root is compared as a path). Model weights
are fingerprinted by size plus sha256 of their first, middle and last MiB (a retrained model changes every
tensor; hashing tens of GB at every start would not be worth it); config.json is hashed whole.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..paths import read_json
from .config import TrainConfig

IDENTITY_FILE = "run_identity.json"
IGNORED = {
    "output_dir", "overwrite", "train.resume", "train.report_to", "train.logging_steps", "train.save_steps",
    "train.save_total_limit", "data.num_workers", "train.gradient_checkpointing", "train.ddp_backend",
    "train.learner_recompute",
}
PATH_KEYS = ("model.path", "data.path", "data.text_mix_path", "data.image_root")
CHUNK = 1 << 20


def flat_settings(config: TrainConfig) -> dict[str, object]:
    """Dotted key -> value for every identity field (paths made absolute, so a changed cwd is not a change)."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and not prefix.endswith(("overrides", "extra_args")):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            flat[prefix] = value

    walk("", config.to_dict())
    for key in PATH_KEYS:
        if flat.get(key):
            flat[key] = str(Path(str(flat[key])).expanduser().resolve())
    return {k: v for k, v in sorted(flat.items()) if k not in IGNORED}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK * 8):
            digest.update(block)
    return digest.hexdigest()


def sampled_sha256(path: Path) -> str:
    """sha256 over the size and the first, middle and last MiB of a (possibly huge) weight file."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for offset in sorted({0, max(0, size // 2 - CHUNK // 2), max(0, size - CHUNK)}):
            f.seek(offset)
            digest.update(f.read(CHUNK))
    return digest.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    root = Path(model_dir).expanduser()
    digest = hashlib.sha256()
    files = [root / "config.json"] + sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin"))
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update((file_sha256(path) if path.name == "config.json" else sampled_sha256(path)).encode())
    return digest.hexdigest()


def run_identity(config: TrainConfig, custom_data: str | None = None) -> dict:
    """The identity of the run `config` describes. `custom_data` stands for a dataset given in code."""
    data: dict[str, str] = {}
    if custom_data is not None:
        data["custom"] = custom_data
    else:
        for key in ("path", "text_mix_path"):
            value = getattr(config.data, key)
            if value:
                data[f"data.{key}"] = file_sha256(Path(value).expanduser())
    return {"settings": flat_settings(config), "data_sha256": data,
            "model_fingerprint": model_fingerprint(config.model.path)}


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable changes from `old` to `new` (empty when they are the same run). The data files and the start
    model are compared by content: moved or renamed but identical, they are the same run."""
    changes = []
    old_s, new_s = old.get("settings", {}), new.get("settings", {})
    old_d, new_d = old.get("data_sha256", {}), new.get("data_sha256", {})
    same_content = {key for key in old_d if old_d.get(key) and old_d.get(key) == new_d.get(key)}
    if old.get("model_fingerprint") and old.get("model_fingerprint") == new.get("model_fingerprint"):
        same_content.add("model.path")
    for key in sorted(set(old_s) | set(new_s)):
        if old_s.get(key) != new_s.get(key) and key not in same_content:
            changes.append(f"{key} {_short(old_s.get(key))} -> {_short(new_s.get(key))}")
    for key in sorted(set(old_d) | set(new_d)):
        if old_d.get(key) != new_d.get(key) and old_s.get(key) == new_s.get(key):
            changes.append(f"the contents of {key} changed (sha256 {_short(old_d.get(key))} -> "
                           f"{_short(new_d.get(key))})")
    if old.get("model_fingerprint") != new.get("model_fingerprint") and \
            old_s.get("model.path") == new_s.get("model.path"):
        changes.append("the start model's weights or config.json changed")
    return changes


def _short(value) -> str:
    text = repr(value) if not isinstance(value, str) else value
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    return text if len(text) <= 80 else text[:77] + "..."


def read_identity(run_dir: Path) -> dict | None:
    path = run_dir / IDENTITY_FILE
    if not path.exists():
        return None
    data = read_json(path, "run identity")
    return data if isinstance(data, dict) else None
