"""Parameter-efficient fine-tuning: LoRA/DoRA, bottleneck adapters, prompt tuning, and the
4/8-bit base-weight quantization behind QLoRA."""
