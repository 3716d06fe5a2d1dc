#!/usr/bin/env bash
# Scale-out on CUDA (issue 14), called by scripts/gpu_check.sh: `wings train` under torchrun with NCCL, for DDP,
# DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 (full and sharded state dicts), on the tiny preset and real easy-vqa data.
# The CPU suite runs the same engines on gloo (tests/test_scaleout_*.py); this adds NCCL, CUDA and, for FSDP, the
# stock accelerate (no CPU shim). One process per GPU, at most 2; with one GPU every engine still runs its own
# code path (wrapping, checkpoints, the final gather) on a world of one.
#
# Each engine's 6 per-step losses must match the DDP run's (fp32, relative 1e-3: GPU kernels and TF32 differ
# more than CPU float order), final/ must load with AutoModelForImageTextToText, and a ZeRO-3 run in bf16 (the
# released recipe's precision) must finish with finite losses. About 2-3 minutes.
#
#   bash scripts/gpu_scaleout_check.sh        # from the repository root; needs the [deepspeed] extra for ZeRO
set -u
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nproc=$(python3 -c "import torch; print(min(2, torch.cuda.device_count()))")
echo "== scale-out on $nproc GPU process(es), work dir $work"
python3 -m wings.cli init-model --preset tiny --out "$work/init" >/dev/null || exit 1
python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; \
from scaleout_support import write_alternating; write_alternating(Path('$work/data.json'), 32)" || exit 1

status=0
run() {  # run NAME PRECISION [extra wings args...]
    local name=$1 precision=$2
    shift 2
    timeout 600 python3 -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m wings.cli train \
        wings_stage2 --model "$work/init" --data "$work/data.json" --output-dir "$work/$name" --batch-size 2 \
        --max-steps 6 --set train.save_steps=2 --set train.save_total_limit=null --set train.precision="$precision" \
        --set train.report_to=[] --set train.gradient_checkpointing=false --set train.grad_accum=1 \
        --set train.logging_steps=1 --set train.warmup_ratio=0 --set data.max_length=128 \
        --set groups.llm.lr=1e-3 --set groups.projector.lr=1e-3 --set groups.visual_learner.lr=1e-3 \
        --set groups.textual_learner.lr=1e-3 --set groups.router.lr=1e-3 "$@" > "$work/$name.log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "FAIL $name: exit $rc"; grep -E "error|Error" "$work/$name.log" | tail -5; status=1; return 1
    fi
    echo "ran  $name"
}

have_ds=1
python3 -c "import deepspeed" 2>/dev/null || { have_ds=0; echo "SKIP ZeRO runs: deepspeed is not installed \
(DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8)"; status=1; }
run ddp fp32
[ $have_ds = 1 ] && run zero2 fp32 --deepspeed configs/deepspeed/zero2.json
[ $have_ds = 1 ] && run zero3 fp32 --deepspeed configs/deepspeed/zero3.json
[ $have_ds = 1 ] && run zero3_bf16 bf16 --deepspeed configs/deepspeed/zero3.json
run fsdp fp32 --set train.fsdp=configs/accelerate/fsdp.json
run fsdp_sharded fp32 --set train.fsdp=configs/accelerate/fsdp_sharded.json
run fsdp_sharded_resumed fp32 --set train.fsdp=configs/accelerate/fsdp_sharded.json \
    --resume "$work/fsdp_sharded/checkpoint-2"

python3 - "$work" <<'EOF' || status=1
import json, math, sys
from pathlib import Path

import wings  # noqa: F401  (registers the Auto classes)
from transformers import AutoModelForImageTextToText

work = Path(sys.argv[1])
def losses(name):
    state = work / name / "checkpoint-6" / "trainer_state.json"
    return [h["loss"] for h in json.loads(state.read_text())["log_history"] if "loss" in h] if state.exists() else None

ref, bad = losses("ddp"), 0
print(f"ddp losses {ref}")
for name in ("zero2", "zero3", "fsdp", "fsdp_sharded", "fsdp_sharded_resumed", "zero3_bf16"):
    got = losses(name)
    if got is None:
        print(f"  {name}: no run"); continue
    if name == "zero3_bf16":
        ok = len(got) == 6 and all(math.isfinite(x) for x in got)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: losses {[round(x, 4) for x in got]} (finite)")
    else:
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
        ok = len(got) == len(ref) and worst <= 1e-3
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max relative loss difference to ddp {worst:.1e}")
    try:
        AutoModelForImageTextToText.from_pretrained(work / name / "final")
    except Exception as err:  # noqa: BLE001  (report every engine, then fail)
        ok = False
        print(f"FAIL {name}: final/ does not load: {err}")
    bad += not ok
sys.exit(1 if bad or ref is None else 0)
EOF
exit $status
