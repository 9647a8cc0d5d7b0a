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
# Each stage's output goes to the terminal as it comes and to logs/<stage>.log line by line, with a progress bar
# kept only in its final state (no carriage-return residue), so `tail -f` follows it.
export PYTHONUNBUFFERED=1
logged() { local name=$1; shift; "$@" 2>&1 | tee >(sed -u 's/.*\r//' > "$RUN/logs/$name.log"); }

if [[ "$TIER" == cpu ]]; then
  LAUNCH=(python -m)
  DATA=$RUN/corpus
  EVAL=(--tier cpu --max-per-task 32)
  # 1. the embedded corpus (CPython's docs; nanochat_hf/data/embedded.py) and its tokenizer, vocab 8192
  logged tokenizer nanochat-hf tokenizer train --vocab-size 8192 --out "$RUN/tokenizer"
  python -c "from nanochat_hf.data.embedded import write_corpus_shards; write_corpus_shards('$DATA')"
  BPB=(--bpb-data "$DATA" --bpb-tokens 65536)
else
  LAUNCH=(accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml --num_processes "${GPUS:-8}" -m)
  DATA=karpathy/climbmix-400b-shuffle
  EVAL=()
  # 1. tokenizer: 2B characters of the pretraining text, vocab 32768
  logged tokenizer nanochat-hf tokenizer train --data "$DATA" --vocab-size 32768 --max-chars 2000000000 \
    --out "$RUN/tokenizer"
  BPB=(--bpb-data "$DATA")
fi

# 2. pretraining on the Trainer with Muon, then CORE + bits per byte. Its final folder keeps optimizer.pt and
# run_args.json, which the 2026 pipeline's SFT warm-starts from and inherits its batch and LRs from.
logged pretrain "${LAUNCH[@]}" nanochat_hf.training.pretrain --config "$RECIPES/pretrain.yaml" --output_dir "$RUN/train/pretrain" \
  --tokenizer "$RUN/tokenizer" --dataset "$DATA" --resume true
mv "$RUN/train/pretrain/final" "$RUN/base"
logged eval_base nanochat-hf eval --model "$RUN/base" --stage base "${EVAL[@]}" "${BPB[@]}"

if [[ "$PIPELINE" == 2025 ]]; then
  # 3. midtraining on the conversation mixture, then the chat evaluations
  logged midtrain "${LAUNCH[@]}" nanochat_hf.training.midtrain --config "$RECIPES/midtrain.yaml" --output_dir "$RUN/train/midtrain" \
    --init_from "$RUN/base" --resume true
  mv "$RUN/train/midtrain/final" "$RUN/mid"
  logged eval_mid nanochat-hf eval --model "$RUN/mid" --stage mid "${EVAL[@]}"
  # 4. SFT through TRL: one conversation a row, LRs x 0.02
  logged sft "${LAUNCH[@]}" nanochat_hf.training.sft --config "$RECIPES/sft.yaml" --output_dir "$RUN/train/sft" \
    --init_from "$RUN/mid"
else
  # 3-4. HEAD's SFT through TRL, straight from the base model: packed rows, the optimizer warm-started
  logged sft "${LAUNCH[@]}" nanochat_hf.training.sft --config "$RECIPES/sft-2026.yaml" --output_dir "$RUN/train/sft" \
    --init_from "$RUN/base"
fi
mv "$RUN/train/sft/final" "$RUN/sft"
logged eval_sft nanochat-hf eval --model "$RUN/sft" --stage sft "${EVAL[@]}"

# 5. (optional) RL through TRL's GRPO: GSM8K on the GPU tiers, arithmetic on cpu
if [[ "${WITH_RL:-0}" == 1 ]]; then
  logged rl "${LAUNCH[@]}" nanochat_hf.training.rl --config "$RECIPES/rl.yaml" --output_dir "$RUN/train/rl" \
    --init_from "$RUN/sft"
  mv "$RUN/train/rl/final" "$RUN/rl"
  logged eval_rl nanochat-hf eval --model "$RUN/rl" --stage rl "${EVAL[@]}"
fi

# 6. the report card
nanochat-hf report --run-dir "$RUN"
