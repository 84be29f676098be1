"""Ray Train worker loops: language-model (pretrain/SFT) and preference (reward/DPO) training."""
