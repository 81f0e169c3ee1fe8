"""dynamo-rl: GRPO post-training whose rollouts are served by an NVIDIA Dynamo inference graph.

Module map (dependencies point down this list only; ``cli`` may use all):
``config`` → ``models`` → ``refit`` → ``serving`` → ``generation`` → ``rl`` → ``k8s`` → ``cli``.
"""

__version__ = "0.1.0"
