#!/bin/bash
# On the GPU machine, from the repository root, with the kit of make_kit.sh carried:
# benchmarks/comfyui_dynamic_benchmark.py at 40 blocks on core v0.33.0, servers with
# --enable-triton-backend, results in $OUT.
#   TAG=name ARMS="core_dynamic ours_default core_dynamic" PAIRS="1:12 81:7" \
#   PROMPTS=3 STEPS=2 DEADLINE=480 bash benchmarks/device/run_dynamic.sh
# (1-frame rows: STEPS=8 for the warm-ups; their rate comes from 4- and 16-step prompts.)
# DEADLINE counts from the benchmark's start (writing the 40-block file takes about 67 s
# on a fresh machine); keep it 100 s under the call's limit.
set -u
: "${TAG:?}" "${ARMS:?}" "${PAIRS:?}" "${OUT:?}"
cd "$(dirname "$0")/../.."
t0=$(date +%s)
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl > /tmp/site_install.log 2>&1 \
    || { tail -5 /tmp/site_install.log; exit 1; }
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site
mkdir -p .carry/comfyui
for version in v0.33.0 v0.3.64; do
  [ -d ".carry/comfyui/$version" ] || tar -C .carry/comfyui -xJf ".carry/comfyui_$version.tar.xz"
done
python3 - <<'PY'
import sys, torch
print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))
missing = []
for name in ("comfy_aimdo comfy_kitchen av sqlalchemy alembic pydantic pydantic_settings "
             "torchsde simpleeval blake3 pynvml psutil safetensors einops transformers "
             "tokenizers sentencepiece aiohttp yarl yaml PIL scipy tqdm requests filelock "
             "triton").split():
    try:
        __import__(name)
    except Exception as error:
        missing.append(f"{name}: {error}")
print("missing:", missing)
PY
echo "setup $(( $(date +%s) - t0 )) s"
python3 benchmarks/comfyui_dynamic_benchmark.py --comfyui .carry/comfyui/v0.33.0 \
  --output "$OUT/$TAG.json" --workdir /tmp/dyn40 --arms $ARMS --blocks 40 --pairs $PAIRS \
  --prompts "${PROMPTS:-3}" --warmups "${WARMUPS:-1}" --steps "${STEPS:-2}" --deadline "${DEADLINE:-480}" \
  --server-arg=--enable-triton-backend > "$OUT/${TAG}_stdout.log" 2>&1
rc=$?
[ -f "$OUT/$TAG.json" ] && python3 - "$OUT/$TAG.json" <<'PY'
import json, sys
for row in json.load(open(sys.argv[1])).get("rows", []):
    print(row["arm"], row["frames"], row["free_gib"], row.get("s_per_it"),
          row.get("prompt_s_each"), row.get("warmup_s_each"), row.get("peak_rss_gib"), row["status"], row.get("equal_to_core"))
PY
tail -n 400 /tmp/dyn40/server.log > "$OUT/${TAG}_server_tail.log" 2>/dev/null
echo "rc=$rc total $(( $(date +%s) - t0 )) s"
exit "$rc"
