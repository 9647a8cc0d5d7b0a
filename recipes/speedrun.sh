#!/usr/bin/env bash
# Every speedrun as commands: what `nanochat-hf speedrun --tier TIER --pipeline PIPELINE` runs, stage by stage.
#   bash recipes/speedrun.sh TIER [PIPELINE]      TIER: cpu d12 d20 d24 d26 d32; PIPELINE: 2025 or 2026
# PIPELINE 2026 (the GPU tiers' default) is nanochat HEAD's runs/speedrun.sh: pretraining, then SFT straight from
# the base model. 2025 (the cpu tier's default) midtrains first. d24 is HEAD's GPT-2 speedrun (FP8) and has no
# midtraining. The cpu tier runs offline in plain Python on the embedded corpus; the GPU tiers need a CUDA build of
# torch (`make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`), ClimbMix from
# the Hub, and `accelerate launch` on every GPU (GPUS=8). Each training stage resumes from its last checkpoint when
# run again; RUN (default runs/TIER) is the run folder, WITH_RL=1 adds RL.
set -euo pipefail
TIER=${1:?usage: bash recipes/speedrun.sh TIER [PIPELINE]}
PIPELINE=${2:-$([[ "$TIER" == cpu ]] && echo 2025 || echo 2026)}
RUN=${RUN:-runs/$TIER}
RECIPES=recipes/$TIER
[[ -f "$RECIPES/pretrain.yaml" ]] || { echo "no recipes for tier $TIER in $RECIPES" >&2; exit 2; }
mkdir -p "$RUN/logs"

if [[ "$TIER" == cpu ]]; then
  LAUNCH=(python -m)
  DATA=$RUN/corpus
  EVAL=(--tier cpu --max-per-task 32)
  # 1. the embedded corpus (CPython's docs; nanochat_hf/data/embedded.py) and its tokenizer, vocab 8192
  nanochat-hf tokenizer train --vocab-size 8192 --out "$RUN/tokenizer" | tee "$RUN/logs/tokenizer.log"
  python -c "from nanochat_hf.data.embedded import write_corpus_shards; write_corpus_shards('$DATA')"
  BPB=(--bpb-data "$DATA" --bpb-tokens 65536)
else
  LAUNCH=(accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml --num_processes "${GPUS:-8}" -m)
  DATA=karpathy/climbmix-400b-shuffle
  EVAL=()
  # 1. tokenizer: 2B characters of the pretraining text, vocab 32768
  nanochat-hf tokenizer train --data "$DATA" --vocab-size 32768 --max-chars 2000000000 --out "$RUN/tokenizer" \
    | tee "$RUN/logs/tokenizer.log"
  BPB=(--bpb-data "$DATA")
fi

# 2. pretraining on the Trainer with Muon, then CORE + bits per byte. Its final folder keeps optimizer.pt and
# run_args.json, which the 2026 pipeline's SFT warm-starts from and inherits its batch and LRs from.
"${LAUNCH[@]}" nanochat_hf.training.pretrain --config "$RECIPES/pretrain.yaml" --output_dir "$RUN/train/pretrain" \
  --tokenizer "$RUN/tokenizer" --dataset "$DATA" --resume true | tee "$RUN/logs/pretrain.log"
mv "$RUN/train/pretrain/final" "$RUN/base"
nanochat-hf eval --model "$RUN/base" --stage base "${EVAL[@]}" "${BPB[@]}" | tee "$RUN/logs/eval_base.log"

if [[ "$PIPELINE" == 2025 ]]; then
  # 3. midtraining on the conversation mixture, then the chat evaluations
  "${LAUNCH[@]}" nanochat_hf.training.midtrain --config "$RECIPES/midtrain.yaml" --output_dir "$RUN/train/midtrain" \
    --init_from "$RUN/base" --resume true | tee "$RUN/logs/midtrain.log"
  mv "$RUN/train/midtrain/final" "$RUN/mid"
  nanochat-hf eval --model "$RUN/mid" --stage mid "${EVAL[@]}" | tee "$RUN/logs/eval_mid.log"
  # 4. SFT through TRL: one conversation a row, LRs x 0.02
  "${LAUNCH[@]}" nanochat_hf.training.sft --config "$RECIPES/sft.yaml" --output_dir "$RUN/train/sft" \
    --init_from "$RUN/mid" | tee "$RUN/logs/sft.log"
else
  # 3-4. HEAD's SFT through TRL, straight from the base model: packed rows, the optimizer warm-started
  "${LAUNCH[@]}" nanochat_hf.training.sft --config "$RECIPES/sft-2026.yaml" --output_dir "$RUN/train/sft" \
    --init_from "$RUN/base" | tee "$RUN/logs/sft.log"
fi
mv "$RUN/train/sft/final" "$RUN/sft"
nanochat-hf eval --model "$RUN/sft" --stage sft "${EVAL[@]}" | tee "$RUN/logs/eval_sft.log"

# 5. (optional) RL through TRL's GRPO: GSM8K on the GPU tiers, arithmetic on cpu
if [[ "${WITH_RL:-0}" == 1 ]]; then
  "${LAUNCH[@]}" nanochat_hf.training.rl --config "$RECIPES/rl.yaml" --output_dir "$RUN/train/rl" \
    --init_from "$RUN/sft" | tee "$RUN/logs/rl.log"
  mv "$RUN/train/rl/final" "$RUN/rl"
  nanochat-hf eval --model "$RUN/rl" --stage rl "${EVAL[@]}" | tee "$RUN/logs/eval_rl.log"
fi

# 6. the report card
nanochat-hf report --run-dir "$RUN"
