#!/bin/bash
# Builds the git-ignored kit a GPU run carries (run's carry: [".carry", ".whl"]), on a fresh
# checkout of this machine:
#   .whl/   cp312 manylinux wheels of what core v0.33 needs and the GPU image lacks (its server
#           dependencies, comfy-aimdo, comfy-kitchen without its 230 MB of cuda/hip binaries,
#           NVML's bindings), about 46 MB;
#   .carry/ both core trees of ../shared/comfyui as xz tarballs (2 MB).
# benchmarks/device/run_dynamic.sh (tracked, so it travels anyway) runs the benchmark there.
# Usage: bash benchmarks/device/make_kit.sh [SHARED_COMFYUI_DIR]
set -euo pipefail
shared=$(realpath "${1:-$(dirname "$0")/../../../shared/comfyui}")  # before the cd below
cd "$(dirname "$0")/../.."
mkdir -p .whl .carry
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d .whl \
  comfy-aimdo==0.4.13 comfy-kitchen==0.2.31 gguf alembic "SQLAlchemy>=2" greenlet Mako \
  MarkupSafe "pydantic~=2.0" pydantic-core annotated-types typing-inspection \
  "pydantic-settings~=2.0" python-dotenv "av>=16" torchsde trampoline "simpleeval>=1" blake3 \
  pytest pluggy iniconfig nvidia-ml-py psutil safetensors 2>&1 | { grep -v -i warning || true; }
# comfy-kitchen's Python backends run without its binaries (and keep the carry under 64 MiB)
python - <<'PY'
import glob, os, zipfile
for wheel in glob.glob(".whl/comfy_kitchen-*.whl"):
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            if info.filename.endswith(".so"):
                continue
            data = source.read(info)
            if info.filename.endswith("RECORD"):
                data = b"\n".join(l for l in data.split(b"\n") if b".so," not in l)
            out.writestr(info, data)
    os.replace(wheel + ".tmp", wheel)
PY
for version in v0.33.0 v0.3.64; do
  tar -C "$shared" -cJf ".carry/comfyui_$version.tar.xz" "$version"
done
du -sh .whl .carry
