"""The tests against Dynamo's stock vLLM worker (``python -m dynamo.vllm``) use the
``vllm_python`` fixture of ``tests/conftest.py``: the vLLM environment is built by ``make
vllm`` (``.venv-vllm``; ``make test`` builds it); without it they are skipped with the reason,
except under ``CI=true``, where they fail. The terminal summary counts them."""
