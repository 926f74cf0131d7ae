#!/bin/bash
# Downloads, on a machine WITH network access, the wheels benchmarks/gpu_check.sh needs on a GPU
# machine that has Python 3.12 and torch with CUDA but nothing else of the project's and no
# network (e.g. an H200 image). They go to .whl/ in the repository root (git ignores it); copy
# that folder with the working tree, and gpu_check.sh installs them there with
# `pip install --no-index --no-deps --target /tmp/site` before it runs.
#
#   bash benchmarks/gpu_check_wheels.sh                 # megatron-core==0.19.2 (2.4 MB)
#   bash benchmarks/gpu_check_wheels.sh einops==0.8.1   # and any other NAME==VERSION
#
# What the check imports on such a machine, and who provides it:
#   megatron-core 0.19.2   missing: downloaded here (cp312, manylinux x86_64). Its
#                          Requires-Dist: torch>=2.6.0, numpy, packaging>=24.2, all present.
#   the project            megatron_tw/, pretrain_tw.py and tools/ travel with the working
#                          tree (PYTHONPATH = the repository root)
#   sentencepiece, tensorboard, psutil, tqdm, numpy, transformers, safetensors, tokenizers,
#   matplotlib (evaluate.py's plots)
#                          present in the H200 image (docs/gpu.md); not downloaded
# Wheels are fetched with --no-deps: name any other missing package as an argument. The total
# must stay under WHEEL_MAX_MIB [50] (the working tree that travels is limited to 64 MiB).

set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${WHEEL_DIR:-$REPO_DIR/.whl}
MAX_MIB=${WHEEL_MAX_MIB:-50}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON=$REPO_DIR/.venv/bin/python
    else PYTHON=python3
    fi
fi

mkdir -p "$DEST"
# git must not see the wheels (they are copied to the GPU machine explicitly)
EXCLUDE=$REPO_DIR/.git/info/exclude
if [ -d "$REPO_DIR/.git/info" ] && ! grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null; then
    echo '/.whl/' >>"$EXCLUDE"
fi

# manylinux tags: pip matches each N exactly; megatron-core 0.19.2 is manylinux_2_24/2_28
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" megatron-core==0.19.2 "$@"

# one version per package: two stop the whole install on the GPU machine
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "gpu_check_wheels: more than one wheel of: $dupes (remove the old ones from $DEST)" >&2
    exit 1
fi
for whl in "$DEST"/*.whl; do
    needs=$("$PYTHON" - "$whl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
            if l.startswith("Requires-Dist:") and "extra ==" not in l]
print(", ".join(reqs) or "-")
EOF
)
    printf '%8s  %s  (needs: %s)\n' "$(du -h "$whl" | cut -f1)" "$(basename "$whl")" "$needs"
done
total=$(du -cm "$DEST"/*.whl | tail -1 | cut -f1)
echo "gpu_check_wheels: ${total} MiB in $DEST; copy it with the working tree, then" \
     "bash benchmarks/gpu_check.sh"
if [ "$total" -gt "$MAX_MIB" ]; then
    echo "gpu_check_wheels: over ${MAX_MIB} MiB" >&2
    exit 1
fi
