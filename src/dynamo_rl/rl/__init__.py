"""GRPO: losses and advantages (grpo), reward tasks (tasks), rollouts through the frontend (rollouts), the policy update (trainer), the recipe loop (loop), run outputs (metrics)."""
