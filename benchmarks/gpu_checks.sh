#!/bin/bash
# Every GPU check of issue 16 in one run, for a machine with a CUDA device:
# the CUDA tests, bench_gpu.py parts a (with a profile), b and c, merge-search throughput,
# and last (it writes ~14 GB) part d, the demo's gate on a 7B-shaped bf16 model.
# Output goes to stdout and to $LOG (default gpu-checks.log); each step has its own time limit,
# so one that hangs does not cost the others.
#
#   MODEL_DIR  SmolLM2-135M directory for (c) and the search: the converted model, or only
#              its config.json + tokenizer files (seeded random weights; timings only)
#   DEMO_DIR   a directory with work/adapters/{reverse,arithmetic}-*, work/data and
#              work/gate-policy.yaml (what `make demo` leaves in .adapters-demo)
#   PROFILE    where bench_gpu.py (a) writes its operator profile (default gpu-profile.txt)
#
# Usage: MODEL_DIR=... DEMO_DIR=... bash benchmarks/gpu_checks.sh
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG=${LOG:-gpu-checks.log}
MODEL_DIR=${MODEL_DIR:-.adapters-demo/work/base}
DEMO_DIR=${DEMO_DIR:-.adapters-demo}
PROFILE=${PROFILE:-gpu-profile.txt}
step() { echo; echo "=== $1 ($(date +%T))"; }
{
step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, peft, transformers; print('torch', torch.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
step "tests on CUDA"
timeout 150 $PY -m pytest -q -p no:cacheprovider -p no:randomly -o addopts="" \
    tests/unit/test_gpu_paths.py tests/unit/test_merge_device.py tests/functional/test_device_cli.py \
    tests/functional/test_graph_decoding.py 2>&1 | tail -15
step "bench_gpu (a): TIES at 7B shapes, with a profile"
timeout 200 $PY benchmarks/bench_gpu.py --parts a --profile "$PROFILE"
step "bench_gpu (b): nf4"
timeout 120 $PY benchmarks/bench_gpu.py --parts b
step "bench_gpu (c): the demo's gate"
timeout 200 $PY benchmarks/bench_gpu.py --parts c --gate-base "$MODEL_DIR"
step "merge-search throughput on cuda"
timeout 150 $PY benchmarks/bench_search.py --only smollm2 --device cuda --base "$MODEL_DIR" \
    --demo-dir "$DEMO_DIR" --real-trials 9
step "bench_gpu (d): the demo's gate on a 7B-shaped model"
timeout 300 $PY benchmarks/bench_gpu.py --parts d --gate-base "$MODEL_DIR"
step done
} 2>&1 | tee "$LOG"
