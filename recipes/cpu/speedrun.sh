#!/usr/bin/env bash
# The CPU speedrun as commands: what `nanochat-hf speedrun --tier cpu` (= `make speedrun-cpu`) runs, stage by stage.
# Offline, about 15 minutes on 2 cores: the corpus is Python's own documentation, the chat data the project's own
# generators. For a two-process run of any training stage, prefix it with
#   accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m
set -euo pipefail
RUN=${RUN:-runs/cpu}
mkdir -p "$RUN/logs"

# 1. tokenizer on the embedded corpus (CPython's docs; see nanochat_hf/data/embedded.py), vocab 8192
nanochat-hf tokenizer train --vocab-size 8192 --out "$RUN/tokenizer" | tee "$RUN/logs/tokenizer.log"
python -c "from nanochat_hf.data.embedded import write_corpus_shards; write_corpus_shards('$RUN/corpus')"

# 2. pretraining (d4), then bits per byte
python -m nanochat_hf.pretrain --config recipes/cpu/pretrain.yaml --output_dir "$RUN/train/pretrain" \
  --tokenizer "$RUN/tokenizer" --dataset "$RUN/corpus" --resume true | tee "$RUN/logs/pretrain.log"
mv "$RUN/train/pretrain/final" "$RUN/base"
nanochat-hf eval --model "$RUN/base" --stage base --tier cpu --max-per-task 32 --bpb-data "$RUN/corpus" \
  --bpb-tokens 65536 | tee "$RUN/logs/eval_base.log"

# 3. midtraining, 4. SFT, each followed by the offline chat evaluations
python -m nanochat_hf.midtrain --config recipes/cpu/midtrain.yaml --output_dir "$RUN/train/midtrain" \
  --init_from "$RUN/base" --resume true | tee "$RUN/logs/midtrain.log"
mv "$RUN/train/midtrain/final" "$RUN/mid"
nanochat-hf eval --model "$RUN/mid" --stage mid --tier cpu --max-per-task 32 | tee "$RUN/logs/eval_mid.log"
python -m nanochat_hf.sft --config recipes/cpu/sft.yaml --output_dir "$RUN/train/sft" --init_from "$RUN/mid" \
  | tee "$RUN/logs/sft.log"
mv "$RUN/train/sft/final" "$RUN/sft"
nanochat-hf eval --model "$RUN/sft" --stage sft --tier cpu --max-per-task 32 | tee "$RUN/logs/eval_sft.log"

# 5. (optional) RL on the arithmetic task
if [[ "${WITH_RL:-0}" == 1 ]]; then
  python -m nanochat_hf.rl --config recipes/cpu/rl.yaml --output_dir "$RUN/train/rl" --init_from "$RUN/sft" \
    | tee "$RUN/logs/rl.log"
  mv "$RUN/train/rl/final" "$RUN/rl"
  nanochat-hf eval --model "$RUN/rl" --stage rl --tier cpu --max-per-task 32 | tee "$RUN/logs/eval_rl.log"
fi

# 6. the report card
nanochat-hf report --run-dir "$RUN"
