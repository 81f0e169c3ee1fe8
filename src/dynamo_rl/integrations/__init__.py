"""Adapters that run inside other programs. ``integrations.vllm``: the refit worker extension
for Dynamo's stock vLLM worker (``--worker-extension-cls``). Imports ``refit``, never ``rl``."""
