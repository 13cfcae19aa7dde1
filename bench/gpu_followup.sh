#!/usr/bin/env bash
# One device call: what the first H200 session left unmeasured (run by the lead on the GPU machine
# after the onnxruntime-gpu pieces were copied; see ../shared/tools/gpu/README.md).
#  1. verify's tolerance for caches made on the GPU (issue 15): lite0 on hymenoptera val,
#     fp32/fp16 x gpu/cpu decode, re-embedded on cuda and on cpu, every row;
#  2. efficientnet_lite0 fp16 vs fp32 end to end under four $EMBEDX_CUDA_OPTIONS sets.
# Everything comes back as one results.tgz (a call returns few files). The other measurements of
# that session were `python3 bench/gpu.py --sections data,extract,lite0,serve` and `pytest -m gpu`.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
bash .gpu/install.sh && . /tmp/site/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1
W=$(mktemp -d)
for cfg in fp32:gpu fp16:gpu fp32:cpu fp16:cpu; do
  p=${cfg%%:*}; d=${cfg##*:}
  timeout 90 python3 -m embedx extract .gpu/real --backbone efficientnet_lite0 --device cuda --precision "$p" \
      --decode "$d" -o "$W/$p-$d.h5" > "$OUT/extract-$p-$d.txt" 2>&1
  for dev in cuda cpu; do
    timeout 90 python3 -m embedx verify "$W/$p-$d.h5" --sample 200 --device "$dev" --json \
        > "$OUT/verify-$p-$d-on-$dev.json" 2> "$OUT/verify-$p-$d-on-$dev.err"
  done
done
echo "verify done at $(( $(date +%s) - T0 )) s" | tee "$OUT/progress.txt"
# lite0 fp16 ran slower than fp32 inside extract: which CUDA option is to blame
for opts in "" "prefer_nhwc=0" "cudnn_conv_algo_search=HEURISTIC" "prefer_nhwc=0,cudnn_conv_algo_search=HEURISTIC"; do
  EMBEDX_CUDA_OPTIONS="$opts" timeout 90 python3 bench/gpu.py --images 4096 --lite-images 4096 --sections data,lite0 \
      --out "$W/lite0-${opts:-default}.json" > "$W/lite0-${opts:-default}.log" 2>&1
  echo "lite0 [$opts] rc=$? at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/progress.txt"
done
cp "$W"/lite0-*.json "$W"/lite0-*.log "$OUT/" 2>/dev/null
cd "$OUT" && tar czf /tmp/results.tgz --remove-files ./* && mv /tmp/results.tgz "$OUT/results.tgz"
