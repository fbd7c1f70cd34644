#!/usr/bin/env bash
# Issue 14's GPU figures in one device call (bench/README.md "One call for issue 14"): start-up by phase (8B QLoRA),
# the bench against the seed and the informed HF setup (8B QLoRA), then, if the time left allows, the full
# fine-tuning checkpoint stall under ZeRO-2 offload (1.5B). Each part has its own time limit and writes its JSON and
# log under $OUT/bench/results as soon as it ends, so a call cut short still returns what was measured.
#   bash scripts/gpu_issue14.sh 560     # the seconds this call may take
set -u
budget="${1:-560}"
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
R="${OUT:-/tmp/out}/bench/results"
mkdir -p "$R"
work=/tmp/w
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt" 2>&1
echo "== start-up ($(left) s left)"
timeout $(( $(left) - 20 )) python scripts/bench_startup.py --shape 8b --work "$work" --out "$R" > "$R/startup-8b.log" 2>&1
echo "startup rc=$?"; tail -6 "$R/startup-8b.log"
echo "== bench seed, informed, spot ($(left) s left)"
if [ "$(left)" -gt 200 ]; then
  timeout $(( $(left) - 15 )) python scripts/bench.py --shape 8b --model "$work/model-8b" --work "$work/bench" \
    --parts seed,informed,spot --data var --steps 7 --spot-steps 10 --run-timeout 120 --no-spot-at-seed \
    --out "$R" > "$R/bench-8b.log" 2>&1
  echo "bench rc=$?"; tail -25 "$R/bench-8b.log"
fi
rm -rf "$work/bench"
echo "== ZeRO-2 offload stall ($(left) s left)"
if [ "$(left)" -gt 150 ]; then
  export TORCH_EXTENSIONS_DIR=/tmp/ext
  timeout $(( $(left) - 5 )) python scripts/gpu_deepspeed.py --out "$R" --parts stall --stall-steps 30 \
    --stall-every-minutes 0.2 > "$R/deepspeed-stall.log" 2>&1
  echo "stall rc=$?"; tail -8 "$R/deepspeed-stall.log"
fi
echo "== cold start, 8B QLoRA, 4-bit mirror ($(left) s left)"
if [ "$(left)" -gt 200 ] && [ -d "$work/model-8b" ]; then
  # the 4-bit mirror is ~5.7 GB: three copies of the seeded remote and the download fit the 64 GB disk
  timeout $(( $(left) - 5 )) python scripts/bench_cold_start.py --shape 8b --model "$work/model-8b" \
    --work /tmp/cold --mirror-4bit --result "$R/cold-start-8b-4bit.json" > "$R/cold-start-8b-4bit.log" 2>&1
  echo "cold rc=$?"; tail -3 "$R/cold-start-8b-4bit.log"; rm -rf /tmp/cold
fi
echo "done, $(left) s left"
