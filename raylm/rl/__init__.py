"""Reinforcement learning from feedback: the PPO/GRPO math and the RLHF driver's parts."""
