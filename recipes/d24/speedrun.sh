#!/usr/bin/env bash
# The d24 speedrun as commands: what `nanochat-hf speedrun --tier d24` runs, stage by stage.
# nanochat HEAD's runs/speedrun.sh: GPT-2's CORE (0.2565) in about 1.65 h of pretraining on 8xH100, in FP8.
# From the repository root, after `make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`
# (a CUDA build of torch, and `pip install -e .[gpu]` for torchao's FP8) and `hf auth login` if the datasets need it. Each training stage resumes from its
# last checkpoint when run again.
set -euo pipefail
RUN=${RUN:-runs/d24}
DATA=karpathy/climbmix-400b-shuffle
LAUNCH=(accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml --num_processes "${GPUS:-8}" -m)
mkdir -p "$RUN/logs"

# 1. tokenizer: 2B characters of the pretraining text, vocab 32768
nanochat-hf tokenizer train --data "$DATA" --vocab-size 32768 --max-chars 2000000000 --out "$RUN/tokenizer" \
  | tee "$RUN/logs/tokenizer.log"

# 2. pretraining on the Trainer with Muon, then CORE + bits per byte. Its final folder keeps optimizer.pt and
# run_args.json, which the 2026 pipeline's SFT warm-starts from and inherits its batch and LRs from.
"${LAUNCH[@]}" nanochat_hf.pretrain --config recipes/d24/pretrain.yaml --output_dir "$RUN/train/pretrain" \
  --tokenizer "$RUN/tokenizer" --dataset "$DATA" --resume true | tee "$RUN/logs/pretrain.log"
mv "$RUN/train/pretrain/final" "$RUN/base"
nanochat-hf eval --model "$RUN/base" --stage base --bpb-data "$DATA" | tee "$RUN/logs/eval_base.log"

# 3-4. HEAD's SFT through TRL, straight from the base model: packed rows, the optimizer warm-started
"${LAUNCH[@]}" nanochat_hf.sft --config recipes/d24/sft-2026.yaml --output_dir "$RUN/train/sft" \
  --init_from "$RUN/base" | tee "$RUN/logs/sft.log"
mv "$RUN/train/sft/final" "$RUN/sft"
nanochat-hf eval --model "$RUN/sft" --stage sft | tee "$RUN/logs/eval_sft.log"

# 5. (optional) RL on GSM8K through TRL's GRPO
if [[ "${WITH_RL:-0}" == 1 ]]; then
  "${LAUNCH[@]}" nanochat_hf.rl --config recipes/d24/rl.yaml --output_dir "$RUN/train/rl" \
    --init_from "$RUN/sft" | tee "$RUN/logs/rl.log"
  mv "$RUN/train/rl/final" "$RUN/rl"
  nanochat-hf eval --model "$RUN/rl" --stage rl | tee "$RUN/logs/eval_rl.log"
fi

# 6. the report card
nanochat-hf report --run-dir "$RUN"
