"""Everything `train()` checks before it allocates a model or writes a file, and the run plan that results.

- Inputs: model.path is a complete Wings model (decided from its config.json, so a plain LLM is refused before
  a default-sized model is built), model.overrides are WingsConfig fields, data files exist and are files.
- Hardware: train.precision is possible here (bf16/fp16 without a GPU name train.precision / train.use_cpu).
- Outputs: output_dir is never an input, inside one, or holding one where the run writes (final/, checkpoints).
- Identity: a resume continues the *same* run (settings, data and model fingerprints; see identity.py), else it
  is refused with the list of changes; a fresh start never replaces another run's checkpoints or final/
  without `overwrite`; a finished run is not trained again and its final/ is left alone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_json_atomic
from ..model_dir import check_checkpoint, check_model_dir
from ..paths import Output, OutputError, guard_outputs, require_dir, require_file
from .config import TrainConfig
from .identity import IDENTITY_FILE, differences, read_identity, run_identity
from .trainer import checkpoints, is_complete_checkpoint

RUN_ARTIFACTS = ("final", "train_config.yaml", "data_report.json", IDENTITY_FILE, "load_failures.jsonl", "runs")


@dataclass
class RunPlan:
    """What `train()` will do: resume from `resume` (None: fresh), or nothing when `finished`."""

    output_dir: Path
    identity: dict
    resume: Path | None = None
    resume_step: int = 0
    finished: bool = False
    notes: list[str] = field(default_factory=list)
    remove: list[Path] = field(default_factory=list)  # old or incomplete artifacts to delete before starting
    write_identity: bool = False  # record `identity` in output_dir (fresh runs, and runs continued from elsewhere)


class RunMismatch(ValueError):
    """A resume (or a fresh start over an old run) that would mix two different runs."""


def check_inputs(config: TrainConfig, custom_data: bool) -> None:
    check_model_dir(config.model.path, "model.path", kind="mllm")  # a Wings model, or a stock VLM (the baseline)
    check_overrides(config.model.overrides)
    if not custom_data:
        if not config.data.path:
            raise ValueError("data.path is empty: give a LLaVA JSON/JSONL file (--data FILE)")
        require_file(config.data.path, "data.path")
        if config.data.text_mix_path:
            require_file(config.data.text_mix_path, "data.text_mix_path")
        if config.data.image_root:
            require_dir(config.data.image_root, "data.image_root")
    check_precision(config)
    check_extra_args(config.train.extra_args)


def check_extra_args(extra_args: dict) -> None:
    """train.extra_args go to `TrainingArguments` verbatim: unknown keys would be a TypeError deep inside HF."""
    import dataclasses

    from transformers import TrainingArguments

    unknown = sorted(set(extra_args) - {f.name for f in dataclasses.fields(TrainingArguments)})
    if unknown:
        raise ValueError(f"train.extra_args has key(s) {unknown} that TrainingArguments does not know")


def check_overrides(overrides: dict) -> None:
    """model.overrides must name WingsConfig fields: a typo would otherwise be dropped without a word."""
    from ..configuration import WingsConfig

    known = {name for klass in WingsConfig.__mro__ for name in getattr(klass, "__annotations__", {})}
    unknown = sorted(set(overrides) - known)
    if unknown:
        fields = sorted(n for n in WingsConfig.__annotations__ if not n.startswith("_"))
        raise ValueError(f"model.overrides has unknown WingsConfig field(s) {unknown}; known fields: {fields}")


def check_precision(config: TrainConfig) -> None:
    import torch

    precision, use_cpu = config.train.precision, config.train.use_cpu
    cuda = torch.cuda.is_available()
    if precision == "bf16" and not use_cpu and not (cuda and torch.cuda.is_bf16_supported()):
        where = "this GPU does not support bf16" if cuda else "this machine has no CUDA GPU"
        raise ValueError(f"train.precision=bf16 needs a bf16-capable CUDA GPU and {where}: set train.use_cpu=true "
                         "(bf16 mixed precision on the CPU) or train.precision=fp32 "
                         "(--set train.use_cpu=true / --set train.precision=fp32)")
    if precision == "fp16" and (use_cpu or not cuda):
        where = "train.use_cpu is true" if use_cpu else "this machine has no CUDA GPU"
        raise ValueError(f"train.precision=fp16 needs a CUDA GPU and {where}: use train.precision=fp32, or bf16 "
                         "with train.use_cpu=true")


def check_outputs(config: TrainConfig) -> Path:
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} is a file, expected a directory")
    inputs = [("model.path", config.model.path), ("data.path", config.data.path),
              ("data.text_mix_path", config.data.text_mix_path), ("data.image_root", config.data.image_root),
              ("train.deepspeed", config.train.deepspeed)]
    written = [Output("output_dir", out, may_contain_inputs=True), Output("output_dir's final/", out / "final"),
               Output("output_dir's TensorBoard folder", out / "runs")]
    written += [Output("output_dir's checkpoint", p) for p in checkpoints(out)]
    written += [Output(f"output_dir's {name}", out / name) for name in RUN_ARTIFACTS[1:5]]
    guard_outputs(written, inputs)  # existing checkpoints included: rotation or --overwrite may delete them
    return out


def plan_run(config: TrainConfig, custom_data: str | None = None) -> RunPlan:
    """All checks, then what to do. Nothing is written here."""
    check_inputs(config, custom_data is not None)
    out = check_outputs(config)
    plan = RunPlan(output_dir=out, identity=run_identity(config, custom_data))
    complete = [p for p in checkpoints(out) if is_complete_checkpoint(p)]
    plan.remove = [p for p in checkpoints(out) if p not in complete]
    if plan.remove:
        plan.notes.append(f"removing {len(plan.remove)} incomplete checkpoint(s) of an interrupted save: "
                          + ", ".join(p.name for p in plan.remove))
    final_done = _final_complete(out / "final")
    old_run = bool(complete) or (out / "final").exists()
    resume = config.train.resume
    if resume in (None, "", "none"):
        if old_run:
            if not config.overwrite:
                raise RunMismatch(f"output_dir {out} already holds a run ({_describe_run(complete, final_done)}); "
                                  "continue it with --resume auto, replace it with --overwrite (deletes its "
                                  "checkpoints and final/), or choose another --output-dir")
            plan.remove += complete + [out / name for name in RUN_ARTIFACTS if (out / name).exists()]
            plan.notes.append(f"--overwrite: replacing the earlier run in {out}")
        return plan
    if resume == "auto":
        if not complete:
            if (out / "final").exists() and not config.overwrite:
                raise RunMismatch(f"output_dir {out} holds a final/ but no checkpoint to resume from; replace it "
                                  "with --overwrite, or choose another --output-dir")
            if config.overwrite:
                plan.remove += [out / name for name in RUN_ARTIFACTS if (out / name).exists()]
            return plan
        if config.overwrite:
            plan.remove += complete + [out / name for name in RUN_ARTIFACTS if (out / name).exists()]
            plan.notes.append(f"--overwrite: replacing the earlier run in {out}")
            return plan
        checkpoint = complete[-1]
    else:
        checkpoint = Path(str(resume)).expanduser()
        if not checkpoint.exists():
            raise FileNotFoundError(f"train.resume {resume!r} is neither 'auto', 'none' nor an existing checkpoint "
                                    "directory")
    check_checkpoint(checkpoint, "train.resume")
    if verify_same_run(plan.identity, checkpoint, out) is None:
        plan.notes.append(f"{checkpoint.parent} has no {IDENTITY_FILE} (a run from an older wings?): cannot check "
                          "that it was started with these settings and data")
    if checkpoint.parent.resolve() != out.resolve():  # continuing another folder's run here
        if old_run and not config.overwrite:
            raise RunMismatch(f"output_dir {out} already holds a run ({_describe_run(complete, final_done)}); to "
                              f"continue {checkpoint} here pass --overwrite (replaces it), or choose another "
                              "--output-dir")
        plan.remove += complete + [out / name for name in RUN_ARTIFACTS if (out / name).exists()]
        plan.write_identity = True
    plan.resume, plan.resume_step, max_steps = checkpoint, *_progress(checkpoint)
    if max_steps and plan.resume_step >= max_steps:
        if final_done and checkpoint.parent.resolve() == out.resolve():
            plan.finished = True
            plan.notes.append(f"the run already finished at step {plan.resume_step} ({checkpoint.name}); final/ "
                              "is left as it is (use --overwrite or another --output-dir to train again)")
        else:
            plan.notes.append(f"the run finished training at step {plan.resume_step}; writing final/ from "
                              f"{checkpoint.name}")
    else:
        plan.notes.append(f"resuming from {checkpoint} (step {plan.resume_step}"
                          + (f" of {max_steps}" if max_steps else "") + "); settings, data and model match the run's")
    return plan


def verify_same_run(identity: dict, checkpoint: Path, out: Path) -> dict | None:
    """Refuse to resume `checkpoint` unless the run that wrote it had this identity; returns the recorded identity
    (None for a run from before identities were recorded, or a bare checkpoint: nothing to compare with)."""
    recorded = read_identity(checkpoint.parent)
    if recorded is None:
        return None
    changes = differences(recorded, identity)
    if changes:
        raise RunMismatch(
            f"train.resume would continue the run in {checkpoint.parent} from {checkpoint.name}, but that run was "
            f"started with other settings: {'; '.join(changes)}. To start a new run, choose another --output-dir "
            f"(or pass --overwrite to replace the old run in {out})")
    return recorded


def _progress(checkpoint: Path) -> tuple[int, int]:
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state.get("global_step") or 0), int(state.get("max_steps") or 0)


def _final_complete(final: Path) -> bool:
    try:
        check_model_dir(final, "final/", kind="mllm")
    except (ValueError, OSError):
        return False
    return True


def _describe_run(complete: list[Path], final_done: bool) -> str:
    parts = []
    if complete:
        parts.append(f"checkpoints up to {complete[-1].name}")
    parts.append("a complete final/" if final_done else "no complete final/")
    return ", ".join(parts)


def start_run(plan: RunPlan, main_process: bool) -> None:
    """Apply the plan's clean-up and record the run's identity (main process only)."""
    if not main_process:
        return
    for path in plan.remove:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if plan.resume is None:  # a fresh run: load failures logged by an earlier attempt are not this run's
        (plan.output_dir / "load_failures.jsonl").unlink(missing_ok=True)
    if plan.resume is None or plan.write_identity:
        write_json_atomic(plan.output_dir / IDENTITY_FILE, plan.identity)
