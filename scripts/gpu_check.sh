#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none): the CUDA test file (fp32/bf16 forward, cached and
# batched generation, a bf16 two-stage Trainer run, chat), then the training-step benchmark at a 7B-class width
# (4096 hidden, 32 heads, 4 layers) and the decode benchmark on the GPU. About 4 minutes on one H100/H200.
#
#   bash scripts/gpu_check.sh            # from the repository root, with the package importable
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
status=0
python3 -m pytest -q -p no:cacheprovider -rA tests/test_cuda.py || status=1
python3 benchmarks/bench_train_step.py --device cuda --precision bf16 --hidden 4096 --layers 4 --heads 32 \
    --kv-heads 32 --intermediate 11008 --rank 64 --repeats 5 || status=1
python3 benchmarks/bench_generate.py --device cuda --repeats 3 || status=1

# ---- Scale-out (issue 14): DDP, DeepSpeed ZeRO-2/3, FSDP2 full/sharded through `wings train` on NCCL, with loss
# equality against DDP and a resume from a sharded checkpoint. Details and budget in the script (~2-3 min).
bash scripts/gpu_scaleout_check.sh || status=1
exit $status
