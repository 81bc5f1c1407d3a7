#!/usr/bin/env bash
# The GPU check as one device call (about 8 minutes on an H200, with time left in a 15-minute
# lease to rerun once): benchmarks/gpu_check.py in two processes, so a sticky CUDA error or a
# hang in one (an illegal address poisons the whole context) leaves the other's tables.
#   1. correctness (A, B), split-K decode (D) and Gemma-3-270M's throughput rows (C)
#   2. Llama-3.2-1B's and Qwen2.5-0.5B's throughput rows (C, without the first model's
#      extra rows: eager, no overlap, unfused, compiled, profile; D again, seconds)
# Each writes gpu_check.md / .json (and decode_profile.txt) under OUT/1 and OUT/2 as it goes;
# their logs are OUT/1.log and OUT/2.log. The Gemma tokenizer, where at hand (here: the
# converted default model's, `~/.cache/girandole/tokenizers/v1-gemma-*/tokenizer.json` copied
# into an ignored folder the call carries), is TOKENIZER_DIR; else a word-level stand-in.
#
#   bash benchmarks/gpu_run.sh [OUT] [TOKENIZER_DIR]
set -u
out=${1:-${OUT:-gpu_out}}
tok=${2:-.gputok}
tok_args=()
[ -f "$tok/tokenizer.json" ] && tok_args=(--tokenizer "$tok")
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
mkdir -p "$out/1" "$out/2"
nvidia-smi -L 2>/dev/null
python3 -c "import torch, triton, transformers as t; print(torch.__version__, triton.__version__, t.__version__)"
timeout 290 python3 benchmarks/gpu_check.py "${tok_args[@]}" --out "$out/1" \
    --models gemma-3-270m --budget-s 225 >"$out/1.log" 2>&1
echo "part 1 exit $?"
timeout 200 python3 benchmarks/gpu_check.py --skip-correctness --out "$out/2" \
    --models llama-3.2-1b,qwen2.5-0.5b --no-variants --budget-s 150 >"$out/2.log" 2>&1
echo "part 2 exit $?"
cat "$out/1/gpu_check.md" "$out/2/gpu_check.md" 2>/dev/null
grep -h -B2 -A8 "Traceback" "$out/1.log" "$out/2.log" | tail -60
