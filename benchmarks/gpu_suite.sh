#!/usr/bin/env bash
# The GPU benchmark, in one command (< 8 minutes on an H200):
#   1. the fused attention kernel against the XLA reference (value and gradient);
#   2. B/16 and L/14 multitask train steps in bf16 with that kernel, each printing
#      images/s and MFU against the bf16 matmul peak measured in the same process.
#
#   benchmarks/gpu_suite.sh                # on the GPU: cuDNN attention, paper-sized towers
#   GPU_SUITE_TINY=1 benchmarks/gpu_suite.sh   # any machine: tiny towers, XLA attention (tests)
#
# Knobs (environment): ATTENTION (cudnn), DTYPE (bfloat16), CLASSES (1000000),
# STEPS (10), MATMUL (8192), B16_BATCH (256), L14_BATCH (128), REMAT (none),
# STEP_TIMEOUT (200 s).
set -euo pipefail
cd "$(dirname "$0")/.."

ATTENTION=${ATTENTION:-cudnn}
DTYPE=${DTYPE:-bfloat16}
CLASSES=${CLASSES:-1000000}
STEPS=${STEPS:-10}
MATMUL=${MATMUL:-8192}
B16_BATCH=${B16_BATCH:-256}
L14_BATCH=${L14_BATCH:-128}
STEP_TIMEOUT=${STEP_TIMEOUT:-200}
REMAT=${REMAT:-none}   # an H200's 141 GB holds both steps' activations
CHECK=()
SHRINK=()
if [[ "${GPU_SUITE_TINY:-0}" == 1 ]]; then
  ATTENTION=head_major DTYPE=float32 CLASSES=2048 STEPS=2 MATMUL=512
  B16_BATCH=4 L14_BATCH=4
  CHECK=(--batch=2 --heads=2 --head_dim=16 --image_len=17 --text_len=9 --tol=1e-4)
  SHRINK=(--config.input.image_size=32 --config.input.text_len=8
          --config.model.image.variant=Ti/16
          --config.model.text.width=64 --config.model.text.depth=1
          --config.model.text.num_heads=2 --config.model.text.mlp_dim=128
          --config.model.text.vocab_size=512)
fi

echo "== gpu_suite: $(date -u +%FT%TZ) attention=$ATTENTION dtype=$DTYPE classes=$CLASSES"
python - <<'EOF'
import jax
print('devices:', jax.devices(), 'jax', jax.__version__)
EOF

echo "== 1. attention kernel vs the XLA reference"
python benchmarks/attention_check.py --implementation="$ATTENTION" --dtype="$DTYPE" "${CHECK[@]}"

step() {  # config, batch, then overrides
  local config=$1 batch=$2
  shift 2
  echo "== train step: $config batch=$batch"
  timeout "$STEP_TIMEOUT" python benchmarks/train_step.py --config="$config" \
    --config.model.attention="$ATTENTION" --config.model.dtype="$DTYPE" \
    --config.loss.head_dtype="$DTYPE" --config.model.remat="$REMAT" \
    --config.input.batch_size="$batch" --config.model.head.num_classes="$CLASSES" \
    --config.model.head.pad_multiple=1024 --steps="$STEPS" --matmul_size="$MATMUL" "$@"
}

echo "== 2. multitask train steps (peak: a ${MATMUL}^3 $DTYPE matmul)"
step configs/mofi_b16.py:multitask "$B16_BATCH" "${SHRINK[@]}"
step configs/mofi_l14.py:multitask "$L14_BATCH" "${SHRINK[@]}"
echo "== gpu_suite: done $(date -u +%FT%TZ)"
