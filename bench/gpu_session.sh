#!/usr/bin/env bash
# The GPU checks that CPU runs cannot make, prepared as device calls of a few minutes each (one H200 lent
# through the device tool; prepare the wheels here first with `bash bench/gpu_wheels.sh`, and carry .whl):
#
#   bash bench/gpu_session.sh pipeline     # ~4 min: the tiny default in bf16 on the GPU, ZeRO-2 and ZeRO-3, the
#                                          # chunked loss against train.loss_chunk=0, flash_attention_2 if installed
#   bash bench/gpu_session.sh throughput   # ~8 min: bench/gpu_throughput.py at the anchor's configuration
#                                          # (seq 4096, checkpointing on, ZeRO-2, micro-batch 1 and 2, all 3 sides)
#
# Everything goes to $OUT (what the device tool brings back), else bench/results/gpu_session/.
set -uo pipefail
part=${1:?usage: bash bench/gpu_session.sh pipeline|throughput}
out=${OUT:-bench/results/gpu_session}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_session: could not install .whl/ (run bash bench/gpu_wheels.sh here and carry .whl)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"

tiny() {  # name, then overrides: 20 steps of the embedded default on one GPU
    local name=$1
    shift
    timeout 300 python3 launch/train.py --overwrite "output_dir=$out/$name" train.max_steps=20 train.save_every=10 \
        "$@" >"$out/$name.log" 2>&1
    echo "$name: exit $? ($(grep -c '"step"' "$out/$name/metrics.jsonl" 2>/dev/null || echo 0) steps)"
}

case $part in
pipeline)
    for zero in 2 3; do
        tiny "z$zero-chunked" --deepspeed_config "deepspeed_configs/zero$zero.json" eval.mmlu.every_checkpoint=true
        tiny "z$zero-full" --deepspeed_config "deepspeed_configs/zero$zero.json" train.loss_chunk=0 \
            eval.mmlu.every_checkpoint=false
    done
    tiny z2-fp32 train.precision=fp32 eval.mmlu.every_checkpoint=false
    if python3 -c "import flash_attn" 2>/dev/null; then
        tiny z2-fa2-packed model.attn_implementation=flash_attention_2 data.packing=true train.seq_len=512 \
            eval.mmlu.every_checkpoint=false
        # the one test CI skips: each packed document's loss alone under flash-attention (tests/test_prepared.py)
        if python3 -c "import pytest" 2>/dev/null; then
            timeout 240 python3 -m pytest -q -m gpu tests/test_prepared.py >"$out/pytest-gpu.log" 2>&1
            echo "pytest -m gpu: exit $? ($(tail -n 1 "$out/pytest-gpu.log"))"
        else
            echo "pytest is not installed here: the gpu-marked test did not run"
        fi
    else
        echo "flash_attn is not installed here: no flash_attention_2 run"
    fi
    python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def losses(name):
    path = out / name / "metrics.jsonl"
    return [json.loads(x)["loss"] for x in path.read_text().splitlines()] if path.is_file() else None
for zero in (2, 3):
    a, b = losses(f"z{zero}-chunked"), losses(f"z{zero}-full")
    if a and b:
        print(f"ZeRO-{zero} bf16 on GPU: chunked vs full loss, largest difference {max(abs(x - y) for x, y in zip(a, b)):.2e}")
for name in ("z2-chunked", "z3-chunked", "z2-fp32", "z2-fa2-packed"):
    rows = losses(name)
    if rows:
        print(f"{name}: loss {rows[0]:.4f} -> {rows[-1]:.4f}")
for name in ("z2-chunked", "z3-chunked"):
    table = out / name / "mmlu.md"
    print(f"{name}: MMLU table {'written' if table.is_file() else 'missing'}")
EOF
    ;;
throughput)
    timeout 560 python3 bench/gpu_throughput.py --seq 4096 --ckpt on --zero 2 --mb 1 2 --timeout 240 \
        --out "$out/gpu_throughput"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh pipeline|throughput"
    exit 2
    ;;
esac
