#!/usr/bin/env bash
# The GPU check, for the day a device is lent (the `device` tool's status says at no cost whether one is): the
# flash-attention tests (`pytest -m gpu`: flash-attention-2 against SDPA on both stages of every family, the packing
# encoders' varlen path, SigLIP2's flash path), then LLaVA-OneVision-7B, Qwen2.5-VL-7B and Qwen3-VL-8B at full width
# in bf16 with SDPA and flash-attention-2, baseline and merged settings side by side, batches 1 and 4. It writes the
# tables to $OUT (default benchmarks/results/gpu); under 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh          # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry    # the same steps on CPU at 1/8 width, small images: checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
if [ "${1:-}" = "--dry" ]; then
    DEVICE=cpu DTYPE=float32 SUFFIX=-cpu ATTNS=sdpa REPEATS=1 TOKENS=2 SIZE=224 OUT=${OUT}-dry
else
    DEVICE=cuda DTYPE=bfloat16 SUFFIX= ATTNS="sdpa flash_attention_2" REPEATS=3 TOKENS=8 SIZE=768
    python -c "import torch, flash_attn; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"
fi
start=$SECONDS
python -m pytest -q -m gpu tests
echo "gpu tests: $((SECONDS - start)) s"
for geometry in llava-ov-7b qwen2.5-vl-7b qwen3-vl-8b; do
    for attn in $ATTNS; do
        python -m illava.tools.bench --geometry "$geometry$SUFFIX" --device "$DEVICE" --dtype "$DTYPE" --attn "$attn" \
            --batches 1,4 --repeats "$REPEATS" --new-tokens "$TOKENS" --image-size "$SIZE" --output_dir "$OUT"
        echo "$geometry $attn: $((SECONDS - start)) s"
    done
done
ls "$OUT"
