#!/usr/bin/env bash
# The figures that only an accelerator can give, one JSON line each, for the README's speed table:
#   train         train.py --benchmark on a ~1B-parameter GPT-J (bf16 compute, remat): tokens/s and MFU
#   train_lora    the same for LoRA fine-tuning of GPT-J-6B (configs/6B_lora_1gpu.json, one micro-batch)
#   decode_b1/b8  sample.py --benchmark, GPT-J-6B shapes in bf16 at batch 1 and 8: decode tokens/s beside the bound
#                 of reading every weight once per step, and the streaming path (a host round trip per token)
# Each line adds the figure's name, the date and the command. A few minutes on one GPU or TPU host:
#   bash bench/accelerator.sh            # on the accelerator machine, from a checkout with requirements.txt
#   bash bench/accelerator.sh --tiny     # the same runs at tiny sizes: checks the script on any CPU (tested)
# PYTHON names the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [[ "${1:-}" == "--tiny" ]]; then
  train=(--layers 2 --d_model 64 --n_heads 4 --pe_rotary_dims 8 --seq 32 --per_replica_batch 2 --n_vocab 512
         --benchmark_steps 1)
  lora=(--layers 2 --d_model 64 --n_heads 4 --pe_rotary_dims 8 --seq 32 --per_replica_batch 2 --n_vocab 512
        --lora_rank 4 --benchmark_steps 1)
  decode=(--preset tiny --max_new_tokens 8)
elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/accelerator.sh [--tiny]" >&2
  exit 2
else
  train=(--layers 16 --d_model 2048 --n_heads 16 --pe_rotary_dims 64 --seq 2048 --n_vocab 50432
         --per_replica_batch 8 --remat true --dtype bfloat16 --benchmark_steps 5)
  lora=(--config configs/6B_lora_1gpu.json --gradient_accumulation_steps 1 --benchmark_steps 5)
  decode=(--preset gptj-6b --dtype bfloat16 --max_new_tokens 128)
fi

# figure NAME COMMAND...: run it, and print its last line (a JSON object) with the figure's name, date and command.
figure() {
  local name=$1
  shift
  "$@" | "$py" -c 'import json, sys, time
record = json.loads(sys.stdin.read().strip().splitlines()[-1])
print(json.dumps({"figure": sys.argv[1], "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv[2:]),
                  **record}), flush=True)' "$name" "$@"
}

figure train "$py" train.py --benchmark "${train[@]}"
figure train_lora "$py" train.py --benchmark "${lora[@]}"
figure decode_b1 "$py" sample.py --benchmark "${decode[@]}" --num_samples 1
figure decode_b8 "$py" sample.py --benchmark "${decode[@]}" --num_samples 8
