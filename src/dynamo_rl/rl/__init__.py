"""GRPO: losses and advantages (grpo), reward tasks (tasks), the training loop (loop), run outputs (metrics)."""
