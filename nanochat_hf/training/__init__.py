"""Training: the depth dial's plan, initialisation, Muon + AdamW, FP8, checkpoints, and the stages (pretrain, midtrain, sft, rl) with the TRL glue."""
