"""`train(config) -> TrainResult`: one stage, end to end (model, data, Trainer, final HF-format directory).

Output layout under `config.output_dir`:
    train_config.yaml     the resolved config
    data_report.json      what the data pipeline kept and skipped
    checkpoint-N/         HF checkpoints (resume with train.resume=auto)
    runs/                 TensorBoard logs (when report_to has tensorboard)
    final/                model + processor; `AutoModelForImageTextToText.from_pretrained` loads it after `import wings`
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from ..launch_env import keep_deepspeed_unloaded
from ..model_kinds import describe_groups, load_processor
from .config import TrainConfig, dump_config
from .engines import (
    check_world_size,
    engine_arguments,
    init_restarted_process_group,
    prepare_engine,
    resolve_launch,
)
from .preflight import plan_run, start_run
from .router_diagnostics import router_callbacks
from .stages import merge_lora, prepare_model, stage_learning_rates
from .trainer import LossRecorder, WingsTrainer, checkpoints, save_final_atomic

LOAD_FAILURES = "load_failures.jsonl"  # records that failed to load mid-run (appended by every worker and rank)


@dataclass
class TrainResult:
    """What a stage produced.

    Attributes:
        final_dir: the HF-format model + processor directory.  output_dir: the run folder.
        steps / losses: every logged training loss and its optimizer step (one per step with logging_steps=1).
        global_step: optimizer steps done.  train_loss: mean training loss of this run.
        trainable: trainable parameter count per group.
        checkpoints: checkpoint dirs left in output_dir.  log_dir: TensorBoard folder (None without tensorboard).
        resumed_from: the checkpoint the run resumed from, if any.
    """

    final_dir: Path
    output_dir: Path
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    global_step: int = 0
    train_loss: float = float("nan")
    trainable: dict[str, int] = field(default_factory=dict)
    checkpoints: list[Path] = field(default_factory=list)
    log_dir: Path | None = None
    resumed_from: Path | None = None
    start_step: int = 0  # the step this run started from (the resumed checkpoint's, else 0)
    already_finished: bool = False  # the run had finished before: nothing was trained and final/ was left alone


def training_arguments(config: TrainConfig) -> TrainingArguments:
    t = config.train
    kwargs = dict(
        output_dir=config.output_dir,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        # (HF's new names for gradient_checkpointing[_kwargs]); non-reentrant works with frozen inputs and kwargs
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        report_to=list(t.report_to) or "none",
        run_name=config.stage,
        deepspeed=t.deepspeed,
        use_cpu=t.use_cpu,
        ddp_backend=t.ddp_backend,
        # Learners skipped in a batch still get zero gradients (anchor), so DDP needs no unused-parameter search.
        ddp_find_unused_parameters=False,
        dataloader_num_workers=config.data.num_workers,
        remove_unused_columns=False,  # the collator emits exactly the model's inputs
    )
    kwargs.update(engine_arguments(config))
    kwargs.update(config.train.extra_args)
    return TrainingArguments(**kwargs)


def build_data(config: TrainConfig, processor, context_length: int | None = None, model=None):
    """The data pipeline's dataset + collator for `config.data`. `context_length`: the model's hard limit (the
    position router's width); longer records are skipped at scan time, counted as `over_context`. `model`: whose
    pipeline (a stock VLM's goes through its own processor: wings.vlm.data); None = a composed Wings model's."""
    from ..data import WingsDataCollator, build_dataset
    from ..model_kinds import data_pipeline

    if not config.data.path:
        raise ValueError("data.path is empty: give a LLaVA JSON/JSONL file (--set data.path=FILE)")
    output_dir = Path(config.output_dir).expanduser()
    formatter, collator = (None, WingsDataCollator.from_processor(processor)) if model is None else \
        data_pipeline(model, processor, config.data.max_length)
    dataset = build_dataset(
        Path(config.data.path).expanduser(), processor, image_root=config.data.image_root,
        max_length=config.data.max_length, policy=config.data.policy,
        text_mix_path=config.data.text_mix_path, text_mix_ratio=config.data.text_mix_ratio, seed=config.train.seed,
        progress=is_main_process(), context_length=context_length, failure_log=output_dir / LOAD_FAILURES,
        formatter=formatter,
    )
    return dataset, collator


def train(config: TrainConfig, train_dataset=None, data_collator=None, callbacks: list | None = None) -> TrainResult:
    """Run one stage. `train_dataset`/`data_collator` replace the `config.data` pipeline when given; `callbacks`
    are extra HF `TrainerCallback`s. Everything is checked before a model is built or a file is written (see
    `training.preflight`): a resume continues the same run or is refused, a finished run is not trained again."""
    keep_deepspeed_unloaded()  # a run without train.deepspeed never imports it (wings.launch_env)
    launch_note = resolve_launch(config)  # N launched processes: one job (CPU chosen if need be) or refused
    init_restarted_process_group(config)  # before anything joins a process group (torchrun --max-restarts)
    plan = plan_run(config, custom_data_name(train_dataset))
    if launch_note:
        plan.notes.insert(0, launch_note)
    announce(plan)
    if plan.finished:
        return finished_result(config, plan)
    set_seed(config.train.seed)  # fresh learners / router added on load draw from this
    model, trainable = prepare_model(config)
    processor = load_processor(config.model.path)
    output_dir = plan.output_dir
    if train_dataset is None:  # scanned before anything is written: bad data leaves an old run untouched
        train_dataset, built_collator = build_data(config, processor, hard_context_length(model), model)
        data_collator = data_collator or built_collator
    args = training_arguments(config)  # after the model, as before (live ZeRO-3 arguments change how it loads)
    check_world_size(args.world_size)  # before anything is written
    start_run(plan, is_main_process())
    if is_main_process():
        dump_config(config, output_dir / "train_config.yaml")
        write_data_report(output_dir, train_dataset)
    if data_collator is None:
        from ..model_kinds import data_pipeline

        data_collator = data_pipeline(model, processor, config.data.max_length)[1]
    lrs, wds = stage_learning_rates(config)
    recorder = LossRecorder()
    trainer = WingsTrainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
        processing_class=processor, callbacks=[recorder, *router_callbacks(model), *(callbacks or [])], group_lrs=lrs,
        group_weight_decays=wds,
        group_by_modality=config.data.group_by_modality,
    )
    engine = prepare_engine(config, trainer, train_dataset)
    if config.lora.enabled and engine == "deepspeed-zero3":
        raise ValueError("lora.enabled with DeepSpeed ZeRO-3 is not supported (the adapters are merged into "
                         "partitioned weights before the final save); use configs/deepspeed/zero2.json")
    if is_main_process():
        summary = ", ".join(f"{g} {n / 1e6:.3f}M @ lr {lrs[g]:g}" for g, n in sorted(trainable.items()))
        print(f"[wings train] stage {config.stage} ({engine}, {trainer.args.world_size} process(es)): "
              f"training {summary}", flush=True)
        groups_note = describe_groups(model)
        if groups_note:
            print(f"[wings train] parameter groups of {groups_note}", flush=True)
    resume = plan.resume
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if is_main_process():
        record_load_failures(output_dir)
    if config.lora.enabled:
        merge_lora(trainer.model)  # the saved model is a plain Wings model again
    final_dir = save_final_atomic(trainer, processor, output_dir / "final")
    log_dir = None
    if "tensorboard" in config.train.report_to:
        log_dir = output_dir / "runs"
    return TrainResult(
        final_dir=final_dir, output_dir=output_dir, steps=recorder.steps, losses=recorder.losses,
        global_step=trainer.state.global_step, train_loss=float(output.training_loss), trainable=trainable,
        checkpoints=checkpoints(output_dir),
        log_dir=log_dir, resumed_from=resume, start_step=plan.resume_step,
    )


def custom_data_name(dataset) -> str | None:
    """How a dataset given in code enters the run identity (None: the config's data files are fingerprinted)."""
    if dataset is None:
        return None
    size = len(dataset) if hasattr(dataset, "__len__") else "?"
    return f"{type(dataset).__name__} of {size} items"


def announce(plan) -> None:
    if is_main_process():
        for note in plan.notes:
            print(f"[wings train] {note}", flush=True)


def finished_result(config: TrainConfig, plan) -> TrainResult:
    out = plan.output_dir
    log_dir = out / "runs" if "tensorboard" in config.train.report_to else None
    return TrainResult(final_dir=out / "final", output_dir=out, global_step=plan.resume_step,
                       checkpoints=checkpoints(out), log_dir=log_dir, resumed_from=plan.resume,
                       start_step=plan.resume_step, already_finished=True)


def hard_context_length(model) -> int | None:
    """Tokens a sample may have: the position router has one column per position and none beyond its width."""
    from ..model_kinds import model_facts

    facts = model_facts(model)
    return facts.context_length if facts.use_router and facts.router_type == "position" else None


def write_data_report(output_dir: Path, dataset) -> None:
    """data_report.json: what the scan kept, skipped and changed (written once the run has started)."""
    from ..data.report import write_json_atomic

    if getattr(dataset, "report", None) is not None:
        write_json_atomic(output_dir / "data_report.json", dataset.report)


def record_load_failures(output_dir: Path) -> None:
    """Fold the records that failed to load during training (and were replaced) into data_report.json."""
    from ..data.report import merge_load_failures

    merge_load_failures(output_dir / "data_report.json", output_dir / LOAD_FAILURES)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def finish_distributed(exit_code: int = 0) -> None:
    """End a torchrun process cleanly: barrier, destroy the group, flush, `os._exit`.

    On CPU (gloo) ranks have been seen to abort in interpreter teardown after all work was done; exiting
    straight after destroying the group avoids it. Only for entry points (it never returns).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
