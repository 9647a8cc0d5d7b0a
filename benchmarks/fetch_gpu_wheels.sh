#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels benchmarks/gpu_check.py needs on a bare GPU machine that has
# no network, into .whl/ at the repository root; a device call carries that folder (`carry: [".whl"]`).
#
# The machine's image has Python 3.12, torch 2.11 (CUDA 13), triton 3.6,
# transformers 5.17, tokenizers 0.23.2, huggingface_hub 1.33.0, safetensors 0.8.0, accelerate 1.15.0, numpy, pyyaml,
# typer, tqdm and packaging, but no torchao. So we carry:
#   transformers 5.24.0  the version we develop against (the project needs >= 5.23; its cache keyword changed in 5.24)
#   regex                transformers 5.24 checks regex >= 2025.10.22 at import; the image's version is not recorded
#   torchao 0.18.0       fp8 training (nanochat_hf.training.fp8); 0.18 is the release built against torch 2.11
# Everything else transformers 5.24 requires (huggingface-hub >= 1.31, tokenizers >= 0.23.1, < 0.24,
# safetensors >= 0.8.0, numpy, packaging, pyyaml, tqdm, typer) is on the image in a version it accepts.
# Not carried:
#   flash-attn   PyPI has only a source distribution, which compiles against the local CUDA for an hour or more;
#                the check lists flash_attention_2 as skipped.
#   kernels      kernels-community/flash-attn3 is downloaded from the Hub when first used, and the GPU machine
#                cannot reach the Hub; the check lists it as skipped. (With `kernels` installed, transformers would
#                also try the Hub for flash_attention_2 and wait on time-outs.)
#   the project  the check imports nanochat_hf from the checkout the call carries (it puts the repository root
#                first on sys.path), so the code measured is the working tree, never a wheel built earlier.
#
#     bash benchmarks/fetch_gpu_wheels.sh        # then: du -sh .whl
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WHEELS=(
    "transformers==5.24.0"
    "regex==2026.12.2"
    "torchao==0.18.0"
)

# One version of each package, or the --no-deps install on the machine stops: start from an empty folder.
mkdir -p .whl
rm -f .whl/*.whl
for spec in "${WHEELS[@]}"; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done

ls -l .whl/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $NF}'
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
awk -v t="$total" 'BEGIN {printf "total %.1f MiB (a device call carries at most 64 MiB with the working tree)\n", t / 1048576}'
if [ "$total" -gt $((50 * 1048576)) ]; then
    echo "more than 50 MiB of wheels: leave room for the working tree" >&2
    exit 1
fi
