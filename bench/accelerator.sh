#!/usr/bin/env bash
# The figures that only an accelerator can give, one JSON line each, for the speed table (docs/performance.md):
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
# The device runs. --tiny appends tiny sizes to these same flags (of a flag given twice, the last counts), so that it
# runs every other setting they use: bf16 compute (XLA:CPU computes bf16 too), remat, the LoRA config (bf16, remat).
# Its sizes are the test suite's tiny model's (a vocabulary of 50304, not fewer: --benchmark draws GPT-2 token ids),
# and the LoRA run names no base: the config's gpt-j-6b, in a checkout that has it, would clash with those sizes.
train=(--layers 16 --d_model 2048 --n_heads 16 --pe_rotary_dims 64 --seq 2048 --n_vocab 50432
       --per_replica_batch 8 --remat true --dtype bfloat16 --benchmark_steps 5)
lora=(--config configs/6B_lora_1gpu.json --gradient_accumulation_steps 1 --benchmark_steps 5)
decode=(--preset gptj-6b --dtype bfloat16 --max_new_tokens 128)
if [[ "${1:-}" == "--tiny" && $# -eq 1 ]]; then
  tiny=(--layers 2 --d_model 32 --n_heads 4 --pe_rotary_dims 4 --seq 16 --per_replica_batch 2 --n_vocab 50304
        --benchmark_steps 1)
  train+=("${tiny[@]}")
  lora+=("${tiny[@]}" --init_from "")
  decode+=(--preset tiny --max_new_tokens 8)
elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/accelerator.sh [--tiny]" >&2
  exit 2
fi

# figure NAME COMMAND...: run it, and print its last line (a JSON object) with the figure's name, date and command
# (quoted as a shell would need it, so that it can be pasted and run again).
figure() {
  local name=$1
  shift
  "$@" | "$py" -c 'import json, shlex, sys, time
record = json.loads(sys.stdin.read().strip().splitlines()[-1])
print(json.dumps({"figure": sys.argv[1], "date": time.strftime("%Y-%m-%d"), "command": shlex.join(sys.argv[2:]),
                  **record}), flush=True)' "$name" "$@"
}

figure train "$py" train.py --benchmark "${train[@]}"
figure train_lora "$py" train.py --benchmark "${lora[@]}"
figure decode_b1 "$py" sample.py --benchmark "${decode[@]}" --num_samples 1
figure decode_b8 "$py" sample.py --benchmark "${decode[@]}" --num_samples 8
