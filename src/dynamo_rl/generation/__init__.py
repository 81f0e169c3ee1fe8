"""Data plane: rollouts through a Dynamo frontend with exact token ids (``DESIGN.md`` §1).

Owns: :class:`DynamoGeneration` (endpoint resolution, batched/streamed requests, retries),
:class:`Sample`, :class:`Conversation` (token-exact multi-turn), and the error family in
:mod:`dynamo_rl.generation.errors`. Depends on ``dynamo_rl.config`` and
``dynamo_rl.models`` only; never imports ``serving``, ``rl`` or ``k8s`` (the workers are
reached over HTTP).
"""

from dynamo_rl.generation._endpoint import in_kubernetes_pod, resolve_frontend_url
from dynamo_rl.generation.client import ChatPrompt, DynamoGeneration, Sample
from dynamo_rl.generation.conversation import (
    Conversation,
    assistant_message,
    check_contiguity,
    render_ids,
    text_messages,
)
from dynamo_rl.generation.errors import (
    ContiguityError,
    EndpointConfigError,
    FrontendUnavailableError,
    GenerationError,
    ModelNotServedError,
    RequestRejectedError,
    ResponseFormatError,
)

__all__ = [
    "ChatPrompt", "ContiguityError", "Conversation", "DynamoGeneration", "EndpointConfigError",
    "FrontendUnavailableError", "GenerationError", "ModelNotServedError", "RequestRejectedError",
    "ResponseFormatError", "Sample", "assistant_message", "check_contiguity", "text_messages", "in_kubernetes_pod", "render_ids",
    "resolve_frontend_url",
]
