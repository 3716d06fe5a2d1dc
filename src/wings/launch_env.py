"""The process's launch environment: how many processes a launcher started for this job (read from the environment
alone, so the CLI can ask before it loads torch), and keeping DeepSpeed unloaded where nothing uses it."""

from __future__ import annotations

import os

# torchrun, `accelerate launch` and the DeepSpeed launcher set WORLD_SIZE; MPI launchers set their own (accelerate
# reads these for multi-CPU jobs).
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """The job's process count as the launcher set it (1 outside any launcher)."""
    sizes = []
    for name in WORLD_SIZE_VARS:
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        try:
            sizes.append(int(value))
        except ValueError:
            raise ValueError(f"the launcher's environment has {name}={value!r}, not a process count") from None
    return max(sizes, default=1)


def launcher_variables() -> str:
    """`WORLD_SIZE=2, ...`: the variables that say so, for messages."""
    return ", ".join(f"{name}={os.environ[name]}" for name in WORLD_SIZE_VARS if os.environ.get(name, "").strip())


def keep_deepspeed_unloaded() -> None:
    """Stop accelerate from importing DeepSpeed in runs that do not use it.

    accelerate's `extract_model_from_parallel` (behind every `save_pretrained` and the Trainer's start) imports
    deepspeed whenever it is installed, only to test `isinstance(model, DeepSpeedEngine)`: that costs about 0.3 s
    and prints DeepSpeed's `Setting accelerator to CPU` warning on machines without a GPU. A DeepSpeedEngine can
    only exist once deepspeed has been imported (a DeepSpeed run imports it when its TrainingArguments are made),
    so accelerate is asked that narrower question instead. Idempotent.
    """
    import sys

    try:
        from accelerate.utils import other
    except ImportError:  # no accelerate: nothing imports deepspeed behind our back
        return
    installed = other.is_deepspeed_available
    if getattr(installed, "wings_narrowed", False):
        return

    def deepspeed_in_use() -> bool:
        return "deepspeed" in sys.modules and installed()

    deepspeed_in_use.wings_narrowed = True
    other.is_deepspeed_available = deepspeed_in_use
