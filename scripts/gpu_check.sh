#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none), sized for a 15-minute lease including start-up:
#   1. tests/test_cuda.py: fp32/bf16 forward, fused paths vs reference (padded head sizes in the GPU's SDPA
#      kernels), cached/batched/static-compiled generation, a bf16 two-stage Trainer run, chat;   ~2 min
#   2. training step at a 7B-class width (hidden 4096, 32 heads, FFN 11008, 4 layers, bf16 autocast):
#      time ratios of every variant interleaved in one process at B8 x 2048, then peak memory, one process per
#      variant (llava, wings, wings with full or selective learner recompute);                    ~5 min
#   3. decode at that width, one 576-token image, 128 new tokens, batch 1 and 8, against HF Llava
#      (its stock cache, and the growing KV cache Wings uses);                                       ~3 min
#   4. scale-out (issue 14): scripts/gpu_scaleout_check.sh (DDP, ZeRO-2/3, FSDP2 on NCCL; GPU only);  ~2-3 min
# Each step has its own time limit, so one stuck step cannot eat the lease.
#
#   bash scripts/gpu_check.sh            # from the repository root, with the package importable
#   bash scripts/gpu_check.sh --dry-run  # no GPU: the same steps at a tiny size on the CPU (checks the script)
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [ "${1:-}" = "--dry-run" ] || ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device (or --dry-run): running every step at a tiny size on the CPU"
    DEV="--device cpu --threads 1"; PREC=fp32; REPEATS=2
    WIDTH="--hidden 256 --layers 2 --heads 4 --kv-heads 4 --intermediate 512"
    TRAIN_SHAPE="--batch 1 --seq 160 --image-size 64 --patch-size 8"
    DECODE="--image-size 64 --patch-size 8 --new-tokens 8 --uncached-tokens 2 --repeats 1"
    LIMIT=600
else
    DEV="--device cuda"; PREC=bf16; REPEATS=5
    WIDTH="--hidden 4096 --layers 4 --heads 32 --kv-heads 32 --intermediate 11008"
    TRAIN_SHAPE="--batch 8 --seq 2048 --image-size 384 --patch-size 16"
    DECODE="--image-size 384 --patch-size 16 --new-tokens 128 --uncached-tokens 8 --repeats 3"
    LIMIT=300
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
status=0
step() {  # step TITLE COMMAND...: run with a time limit, keep going on failure
    echo; echo "=== $1"; shift
    timeout "$LIMIT" "$@" || { echo "!!! failed or timed out (rc $?)"; status=1; }
}
step "CUDA tests" $PY -m pytest -q -p no:cacheprovider -rA tests/test_cuda.py
step "training step, time (variants interleaved)" $PY benchmarks/bench_train_step.py $DEV --precision $PREC $WIDTH \
    $TRAIN_SHAPE --rank 64 --repeats $REPEATS \
    --variants llava,wings,wings+masked,wings+separate,wings+unfused,wings+recompute,wings+recompute-projections
step "training step, memory (one process per variant)" $PY benchmarks/bench_train_step.py --isolate $DEV \
    --precision $PREC $WIDTH $TRAIN_SHAPE --rank 64 --repeats $REPEATS \
    --variants llava,wings,wings+recompute,wings+recompute-projections
step "decode, batch 1" $PY benchmarks/bench_generate.py $DEV $WIDTH $DECODE --batch 1
step "decode, batch 8" $PY benchmarks/bench_generate.py $DEV $WIDTH $DECODE --batch 8
if [ "$PREC" = bf16 ]; then  # a GPU: the scale-out engines on NCCL (the CPU suite covers them on gloo)
    step "scale-out (issue 14)" bash scripts/gpu_scaleout_check.sh
fi
exit $status
