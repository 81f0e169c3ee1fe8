"""The recipe: one pydantic model per section, unknown keys rejected (``extra="forbid"``).

Sections: ``policy`` (model, dtype, optimizer, warm start), ``generation`` (backend,
Dynamo endpoint, sampling), ``grpo`` (algorithm), ``refit`` (transport), ``task``
(reward), ``logging`` (run directory, TensorBoard, W&B), ``checkpoint`` (how often the
policy is saved), ``cluster`` (the embedded Dynamo stack's workers).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModel(_Section):
    """Shapes and seed of the locally built tiny Qwen3 model (``dynamo_rl.models.tiny``).

    Every field maps onto ``transformers.Qwen3Config``; the same values (seed included)
    always give byte-identical weights.
    """

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    seed: int = 0
    vocab: Literal["chars", "tools"] = Field(
        "chars", description="chars: digits, letters, a few signs (53 tokens); tools: also JSON's characters "
                             "and Qwen3's <tool_call>/<tool_response>/<think> tags and 4 JSON merges (69), for tool-use tasks")


class OptimizerConfig(_Section):
    """AdamW settings. ``lr`` in units of the parameters per step."""

    lr: float = Field(5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null disables")


class TaskConfig(_Section):
    """What the policy is trained on (``dynamo_rl.rl.tasks``, ``dynamo_rl.rl.environments``):
    a built-in task, a built-in environment (``tool_lookup``: multi-turn, with tools), or
    ``custom`` — your JSONL ``data`` with either your ``reward`` function (``"module:function"``
    or ``"path/to/file.py:function"``; records with ``prompt`` or ``messages``, optional
    ``answer``) or your ``environment`` class (``"module:Class"``; each record is handed to its
    ``reset``) — or ``agent``: your agent program (``agent_command``) plays episodes against
    the rollout endpoint and ends each with its reward (``dynamo_rl.rl.agents``)."""

    name: Literal["reverse_digits", "multiturn_reverse", "tool_lookup", "custom", "agent"] = "reverse_digits"
    num_digits: int = Field(3, ge=1, le=12)
    turns: int = Field(2, ge=1, description="multiturn tasks: user turns per episode")
    data: str | None = Field(None, description="custom: a JSONL file, one record per line")
    reward: str | None = Field(None, description="custom: 'module:function' or 'file.py:function'")
    environment: str | None = Field(None, description="custom: an Environment class, 'module:Class' or "
                                                      "'file.py:Class'")
    agent_command: str | None = Field(None, description="agent: the command that runs your agent program; it plays "
                                                        "episodes against $DYNAMO_RL_ROLLOUT_URL (dynamo_rl.rl.agents)")
    agent_timeout_s: float = Field(600.0, gt=0, description="agent: the longest wait for one step's episodes")
    session_timeout_s: float = Field(120.0, gt=0, description="agent: an idle session ends with reward 0 after this")

    @model_validator(mode="after")
    def _custom_needs_data_and_reward(self):
        if self.name == "custom":
            if not self.data or bool(self.reward) == bool(self.environment):
                raise ValueError("task.name=custom needs task.data (a JSONL file) and either task.reward "
                                 "('module:function') or task.environment ('module:Class'), not both")
        elif self.data or self.reward or self.environment:
            raise ValueError(f"task.data / task.reward / task.environment belong to task.name=custom, not "
                             f"{self.name!r}; set task.name=custom or drop them")
        if self.name == "agent" and not (self.agent_command or "").strip():
            raise ValueError("task.name=agent needs task.agent_command: the command that runs your agent, e.g. "
                             "'python examples/agents/tool_agent.py'")
        if self.name != "agent" and self.agent_command:
            raise ValueError(f"task.agent_command belongs to task.name=agent, not {self.name!r}")
        return self

    @property
    def is_environment(self) -> bool:
        """True when episodes are run by an environment (multi-turn, tools)."""
        return self.name == "tool_lookup" or bool(self.environment)


class WarmStartConfig(_Section):
    """Supervised warm start on the task's reference answers, fixed by step count.
    ``task``: another task to take them from (default: the recipe's own), e.g. the built-in
    ``tool_lookup`` environment's demonstrations before GRPO on an external agent's episodes."""

    steps: int = Field(0, ge=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    task: TaskConfig | None = None


class PolicyConfig(_Section):
    """The trained policy. ``model_path`` (a HF checkpoint dir) or, when null, the tiny model."""

    model_path: str | None = None
    tiny: TinyModel = TinyModel()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    num_threads: int = Field(1, ge=1, description="torch intra-op threads of the trainer")
    optimizer: OptimizerConfig = OptimizerConfig()
    warm_start: WarmStartConfig = WarmStartConfig()


class DynamoConfig(_Section):
    """Where the Dynamo frontend is: ``dgd_name`` (in-cluster) **or** ``frontend_url``.

    With ``dgd_name`` the URL is ``http://<dgd_name>-frontend.<namespace>.svc.cluster.local:<frontend_port>``
    (the Service the Dynamo operator creates for a DGD's frontend); it resolves only inside
    a pod of that cluster. ``frontend_url`` works anywhere. With neither, ``dynamo-rl
    train`` starts the embedded local stack and fills ``frontend_url`` itself.
    """

    dgd_name: str | None = None
    namespace: str = "default"
    frontend_port: int = Field(8000, gt=0, lt=65536)
    frontend_url: str | None = None
    model: str | None = Field(None, description="served model name; discovered from /v1/models when null")

    @model_validator(mode="after")
    def _one_endpoint(self):
        if self.dgd_name and self.frontend_url:
            raise ValueError(
                "generation.dynamo: set either dgd_name (in-cluster) or frontend_url, not both"
            )
        return self

    @property
    def is_remote(self) -> bool:
        """True when the recipe points at an existing deployment (no embedded stack)."""
        return bool(self.dgd_name or self.frontend_url)


class SamplingConfig(_Section):
    """Sampling for rollouts. Logprobs are always of the raw (temperature-1) distribution."""

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    max_tokens: int = Field(8, gt=0)


class GenerationConfig(_Section):
    backend: Literal["dynamo"] = "dynamo"
    dynamo: DynamoConfig = DynamoConfig()
    sampling: SamplingConfig = SamplingConfig()
    max_concurrency: int = Field(64, gt=0, description="requests in flight on one HTTP client")
    request_timeout_s: float = Field(60.0, gt=0)
    retry_deadline_s: float = Field(30.0, ge=0, description="retry connection errors/502/503 this long")


class GRPOConfig(_Section):
    num_steps: int = Field(60, ge=1)
    prompts_per_step: int = Field(16, gt=0)
    samples_per_prompt: int = Field(8, ge=2, description="group size; advantages are normalized per group")
    clip_eps: float = Field(0.2, gt=0)
    kl_coef: float = Field(0.0, ge=0, description="k3 KL to the reference policy; 0 disables")
    updates_per_batch: int = Field(2, ge=1)
    loop: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(1, ge=0, description="async: drop samples older than this many versions")
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="greedy eval every N steps through the frontend; 0 disables")
    eval_prompts: int = Field(64, gt=0)


class RefitConfig(_Section):
    """How new weights reach the serving workers after every step.

    ``transport``: ``shm`` (same host, shared memory / CUDA IPC), ``dist``
    (torch.distributed gloo/NCCL), ``nixl`` — pulled by the workers through Dynamo's
    ``update_weights_from_distributed`` — or ``checkpoint``: the trainer writes a safetensors
    checkpoint under ``<run_dir>/refit/`` and the workers load it through Dynamo's
    ``update_weights_from_disk`` (slowest; works wherever the workers can read that path).
    ``pause_mode``: Dynamo's ``pause_generation`` mode during a refit: ``wait`` (in-flight
    requests finish on the old weights), ``abort`` (they are ended), ``keep`` (they go on
    after the resume, on the new weights: those responses mix two versions).
    ``control_urls``: the workers' system servers (``http://host:DYN_SYSTEM_PORT``) when
    generation is remote; the embedded stack fills them itself.
    ``in_place``: see ``Engine.load_weights_in_place`` (off: the safe staged path, where a
    failed refit leaves a worker serving its previous version).
    """

    transport: Literal["shm", "dist", "nixl", "checkpoint"] = "shm"
    timeout_s: float = Field(120.0, gt=0)
    publisher_host: str = Field("127.0.0.1", description="address the trainer's publisher binds (pod IP on K8s)")
    control_urls: list[str] = Field(default_factory=list)
    pause_mode: Literal["wait", "keep", "abort"] = "wait"
    in_place: bool = Field(
        False, description="workers pull new weights straight into their live parameters (one pass over "
                           "the bytes, CUDA graphs kept; fastest on GPUs). A pull failing part-way leaves a "
                           "worker refusing requests until the next complete refit")


class CheckpointConfig(_Section):
    """The trained policy, kept (``dynamo_rl.rl.checkpoint``): a Hugging Face checkpoint under
    ``<run_dir>/checkpoints/step-N`` every ``every`` steps (0: only at the end) and always at
    the end of the run, also after Ctrl-C or a failure; the trainer state for ``--resume``
    beside it under ``<run_dir>/trainer_state/step-N``."""

    every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")


class LoggingConfig(_Section):
    run_dir: str | None = Field(None, description="default: runs/<recipe>-<timestamp>")
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "dynamo-rl"


WorkerEngine = Literal["dynamo-rl", "vllm"]


class ClusterConfig(_Section):
    """The embedded local Dynamo stack (ignored when generation points at a deployment).

    ``engine``: the workers' kind: ``dynamo-rl`` (our worker) or ``vllm`` (Dynamo's stock
    ``python -m dynamo.vllm --enable-rl`` with our refit worker extension), or a list with
    one kind per worker (a mixed fleet; ``workers`` then defaults to its length).
    ``vllm_python``: the vLLM environment's Python (default: ``$DYNAMO_RL_VLLM_PYTHON``, else
    ``.venv-vllm/bin/python``, built by ``make vllm``).
    ``tool_call_parser`` / ``reasoning_parser``: Dynamo's parsers for chat answers, given to
    both worker kinds (``--dyn-tool-call-parser`` / ``--dyn-reasoning-parser``).
    ``stream_interval``: tokens per streamed message after the first (``--stream-interval``;
    16: the trainer does not stream, and agents that do get the first token at once).
    ``engine_cpus``: a CPU list for our workers' engine processes, the rest for the others.
    """

    workers: int = Field(2, ge=1)
    engine: WorkerEngine | list[WorkerEngine] = "dynamo-rl"
    vllm_python: str | None = None
    worker_threads: int = Field(1, ge=1, description="torch threads per worker process")
    worker_device: str = "cpu"
    startup_timeout_s: float = Field(180.0, gt=0)
    tool_call_parser: str | None = Field(
        None, description="Dynamo's tool-call parser for the workers' model (--dyn-tool-call-parser), e.g. hermes; "
                          "needed by environments that offer tools")
    reasoning_parser: str | None = Field(
        None, description="Dynamo's reasoning parser (--dyn-reasoning-parser), e.g. qwen3")
    stream_interval: int | None = Field(
        16, ge=1, description="tokens per streamed message after the first, for both worker kinds "
                              "(--stream-interval, vLLM's option). The trainer's requests do not stream, so "
                              "fewer, larger messages through the frontend cost nothing: 16 gave 1.5x the "
                              "tokens/s of 1 at concurrency 32 (benchmarks/serving.py). None: the workers' "
                              "default (1)")
    engine_cpus: str | None = Field(
        None, description="CPUs for the engine processes of our workers, as taskset -c writes them (e.g. '1' or "
                          "'2-7'); the frontend and the workers' own processes run on the other CPUs, so forwards "
                          "never wait for a core (LocalStack(engine_cpus=)). None: no affinity")

    @field_validator("engine_cpus", mode="before")
    @classmethod
    def _cpu_list_as_text(cls, v):
        """``engine_cpus: 1`` (YAML reads an int) and ``[0, 2]`` mean ``"1"`` and ``"0,2"``."""
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        if isinstance(v, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in v):
            return ",".join(map(str, v))
        return v

    @model_validator(mode="after")
    def _one_kind_per_worker(self):
        if isinstance(self.engine, list):
            if not self.engine:
                raise ValueError("cluster.engine: an empty list; give one kind per worker, e.g. [vllm, dynamo-rl]")
            if "workers" not in self.model_fields_set:
                object.__setattr__(self, "workers", len(self.engine))
            elif self.workers != len(self.engine):
                raise ValueError(f"cluster.engine lists {len(self.engine)} worker kinds but cluster.workers is "
                                 f"{self.workers}; give one kind per worker or drop cluster.workers")
        return self

    def engines(self) -> list[str]:
        """One worker kind per worker."""
        return list(self.engine) if isinstance(self.engine, list) else [self.engine] * self.workers


class Recipe(_Section):
    """A whole training recipe. See ``examples/grpo_tiny.yaml``."""

    name: str = "grpo"
    policy: PolicyConfig = PolicyConfig()
    generation: GenerationConfig = GenerationConfig()
    grpo: GRPOConfig = GRPOConfig()
    refit: RefitConfig = RefitConfig()
    task: TaskConfig = TaskConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    cluster: ClusterConfig = ClusterConfig()
