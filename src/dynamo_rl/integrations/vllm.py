"""The refit weight plane inside Dynamo's stock vLLM worker (``python -m dynamo.vllm``).

Start the worker with::

    python -m dynamo.vllm --model DIR --enable-rl \\
        --worker-extension-cls dynamo_rl.integrations.vllm.RefitWorkerExtension

vLLM mixes :class:`RefitWorkerExtension` into each of its worker processes (one per TP
rank). Dynamo's RL admin route ``update_weights_from_distributed`` then reaches it: the
route calls ``collective_rpc(body["engine_rpc"], kwargs=<the body less allow_unpaused,
engine_rpc, reset_prefix_cache, weight_version>)`` on every rank, resets the prefix cache and
declares ``weight_version`` (Dynamo 1.6.1, ``dynamo/vllm/handlers.py``). So the control
plane sends::

    POST <system_url>/engine/update_weights_from_distributed
    {"engine_rpc": "dynamo_rl_update_weights", "weight_version": N,
     "version": N, "publisher": URL, "transport": "shm"|"dist"|"nixl"|null, "timeout_s": T,
     "deadline_unix_s": D}

and :meth:`RefitWorkerExtension.dynamo_rl_update_weights` runs our
:class:`~dynamo_rl.refit.Receiver` in each rank: it learns the rank's TP position from vLLM,
plans and pulls the trainer's local shards (HF or Megatron-Core names, any trainer TP size;
Megatron's fused QKV / gate-up are split, vocabulary padding trimmed) over our transports,
validates the complete set, and only then loads it through vLLM's own
``model_runner.reload_weights`` (vLLM's loaders fuse q/k/v into ``qkv_proj`` and gate/up
into ``gate_up_proj``, shard by TP rank, pad the vocabulary, and re-run the kernels'
weight processing — on CPU the linear weights are re-packed for oneDNN, so writing into
the parameters alone would not change what is served).

Each rank pulls full (TP=1) tensors and lets vLLM's loaders take its shard: T-fold
over-pull for a vLLM engine with TP size T > 1 (the pull report's ``overpull_factor``);
the pulls are on one host, over shared memory.

Failure semantics: a pull that fails (publisher gone, torn version, mismatched names or
shapes, past ``deadline_unix_s``) raises before anything is loaded, so the rank keeps
its previous weights; Dynamo's route answers ``{"status": "error", "message": ...}`` and
does not declare the version; the orchestrator leaves the worker paused
(:mod:`dynamo_rl.refit.orchestrator`).

Dynamo does not pass an rpc's return value back, so two more rpcs serve tests and
benchmarks through the same route (send ``"allow_unpaused": true, "reset_prefix_cache":
false`` to run them without a pause): :meth:`~RefitWorkerExtension.dynamo_rl_dump_weights`
writes the weights the kernels really use to a safetensors file, and
:meth:`~RefitWorkerExtension.dynamo_rl_write_report` writes the last pull's report as JSON.

Imports ``dynamo_rl.refit`` only (never ``rl``, ``serving`` or ``k8s``); ``vllm`` and
``transformers`` are imported lazily, inside the worker process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dynamo_rl.refit.control import UPDATE_RPC

#: a child of vLLM's own ``vllm`` logger, so the worker's log (vLLM's handler and format) shows it
log = logging.getLogger("vllm.dynamo_rl")

#: the ``engine_rpc`` that writes the served weights to a safetensors file (tests)
DUMP_RPC = "dynamo_rl_dump_weights"
#: the ``engine_rpc`` that writes the last pull's report as JSON
REPORT_RPC = "dynamo_rl_write_report"
#: dotted path for ``--worker-extension-cls``
EXTENSION_CLS = "dynamo_rl.integrations.vllm.RefitWorkerExtension"


def hf_param_specs(hf_config, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{hf_name: (full_shape, dtype)}`` of every parameter of the HF model ``hf_config`` describes.

    Built from ``transformers.AutoModelForCausalLM.from_config`` on the ``meta`` device (no
    memory). A tied ``lm_head.weight`` is omitted, as in ``Engine.param_specs()``.

    Args:
        hf_config: a ``transformers.PretrainedConfig`` (vLLM's ``model_config.hf_config``).
        dtype: the dtype the engine runs (every spec gets it).
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    out = {}
    for name, p in model.named_parameters():
        if tied and name == "lm_head.weight":
            continue
        out[name] = (tuple(p.shape), dtype)
    return out


class RefitWorkerExtension:
    """Mixed into vLLM's ``Worker`` by ``--worker-extension-cls`` (no ``__init__`` of its own).

    Uses only what vLLM's worker has: ``self.model_runner`` (``.model``,
    ``.model_config``, ``.reload_weights``) and ``self.device``. State kept on the worker:
    the :class:`~dynamo_rl.refit.Receiver` (it remembers the publisher's layout between
    pulls), the last version loaded and the last pull's report.
    """

    # ------------------------------------------------------------------ rpcs
    def dynamo_rl_update_weights(self, *, publisher: str, version: int, transport: str | None = None,
                                 timeout_s: float = 120.0, deadline_unix_s: float | None = None,
                                 in_place: bool = False, **_ignored: Any) -> dict:
        """Pull weights ``version`` from the trainer's ``publisher`` and load them.

        Args:
            publisher: rank 0's ``Publisher.url`` (``http://host:port``).
            version: the weights version (int ≥ 0), the same number as ``weight_version``.
            transport: ``"shm"`` | ``"dist"`` | ``"nixl"`` | ``None`` (auto: shm on one host).
            timeout_s: limit of the pull in seconds, waiting for the version included.
            deadline_unix_s: wall-clock time after which the update is refused (the caller
                gave up on it); nothing is loaded then.
            in_place: accepted for symmetry with our worker; vLLM always loads staged
                (validated set first, then ``reload_weights``).
        Returns:
            the pull report (``bytes``, ``tensors``, ``seconds``, ``transport``, ...) plus
            ``load_seconds``, ``tp_rank``, ``tp_size``.
        Raises:
            TimeoutError: past ``deadline_unix_s`` (nothing loaded).
            dynamo_rl.refit.RefitError: the pull failed (nothing loaded; weights unchanged).
            ValueError: ``version`` is not an int ≥ 0 or is older than the loaded one.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"{UPDATE_RPC}: 'version' must be an int >= 0, got {version!r}")
        self._dynamo_rl_check_deadline(deadline_unix_s)
        loaded = getattr(self, "_dynamo_rl_version", None)
        if loaded is not None and version < loaded:
            raise ValueError(f"{UPDATE_RPC}: weights version {version} is older than the loaded version "
                             f"{loaded}; versions only move forward")
        receiver = self._dynamo_rl_receiver()
        tensors, report = receiver.pull(str(publisher), version, transport, float(timeout_s))
        self._dynamo_rl_check_deadline(deadline_unix_s)
        t0 = time.perf_counter()
        self._dynamo_rl_load(tensors.items())
        tp_rank, tp_size = _tp_position()
        report = {**report, "load_seconds": time.perf_counter() - t0, "tp_rank": tp_rank, "tp_size": tp_size,
                  "in_place": False}
        self._dynamo_rl_version = version
        self._dynamo_rl_report = report
        log.info("dynamo-rl refit: rank %d/%d loaded weights version %d (%d bytes, %.3f s pull, %.3f s load)",
                 tp_rank, tp_size, version, report.get("bytes", 0), report.get("seconds", 0.0),
                 report["load_seconds"])
        return report

    def dynamo_rl_reload_weights(self, *, weight_path: str, **_ignored: Any) -> dict:
        """The ``engine_rpc`` of ``update_weights_from_disk`` for the checkpoint transport:
        load every ``*.safetensors`` file of the directory ``weight_path`` (HF names).

        Dynamo's default rpc (vLLM's ``reload_weights(weights_path=...)``) would do the same
        but leave a tied ``lm_head`` on the old weights (:func:`_retie_lm_head`).

        Raises:
            FileNotFoundError: ``weight_path`` holds no ``*.safetensors`` file (nothing loaded).
        """
        from safetensors.torch import load_file

        files = sorted(Path(weight_path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"update_weights_from_disk: {weight_path!r} holds no *.safetensors file; "
                                    "point model_path at a checkpoint written by save_pretrained")
        t0 = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
        self._dynamo_rl_check(tensors, weight_path)   # all or nothing: vLLM's reload applies layer by layer
        self._dynamo_rl_load(tensors.items())
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return {"bytes": nbytes, "tensors": len(tensors), "seconds": time.perf_counter() - t0}

    def dynamo_rl_dump_weights(self, *, path: str, **_ignored: Any) -> str:
        """Write the weights this rank's kernels use to ``<path>.rank<r>.safetensors`` (vLLM names).

        Linear layers are read back through their own kernel (``quant_method.apply`` on an
        identity matrix, exact: every output is one weight times 1 plus zeros), since on CPU
        vLLM re-packs them for oneDNN and empties ``layer.weight``. Everything else is the
        parameter itself. Shapes are this rank's (fused ``qkv_proj`` / ``gate_up_proj``,
        vocabulary padded).

        Returns: the file written.
        """
        from safetensors.torch import save_file

        tp_rank, _ = _tp_position()
        out: dict[str, torch.Tensor] = {}
        model = self.model_runner.model
        with torch.no_grad():
            for mod_name, mod in model.named_modules():
                method = getattr(mod, "quant_method", None)
                k = getattr(mod, "input_size_per_partition", None)
                if method is not None and k is not None and hasattr(method, "apply"):
                    w = getattr(mod, "weight", None)
                    dtype = getattr(mod, "params_dtype", None) or (w.dtype if w is not None else torch.float32)
                    eye = torch.eye(int(k), dtype=dtype, device=self.device)
                    out[f"{mod_name}.weight"] = method.apply(mod, eye, None).t().contiguous().cpu()
            for name, p in model.named_parameters():
                if name not in out and p.numel() > 0:
                    out[name] = p.detach().contiguous().cpu()
        file = f"{path}.rank{tp_rank}.safetensors"
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        save_file(out, file)
        return file

    def dynamo_rl_write_report(self, *, path: str, **_ignored: Any) -> str:
        """Write ``{"version", "report"}`` of the last pull to ``<path>.rank<r>.json``."""
        tp_rank, _ = _tp_position()
        file = f"{path}.rank{tp_rank}.json"
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        with open(file, "w") as f:
            json.dump({"version": getattr(self, "_dynamo_rl_version", None),
                       "report": getattr(self, "_dynamo_rl_report", None), "pid": os.getpid()}, f, default=str)
        return file

    # ------------------------------------------------------------------ helpers
    def _dynamo_rl_load(self, items) -> None:
        """vLLM's own reload (loaders, fusing, TP sharding, kernel weight processing), then the
        tied head re-tied."""
        with torch.no_grad():
            self.model_runner.reload_weights(weights_iterator=iter(items), is_checkpoint_format=True)
            _retie_lm_head(self.model_runner.model, self.model_runner.model_config.hf_config)

    def _dynamo_rl_check(self, tensors: dict, source: str) -> None:
        """Refuse (ValueError, nothing loaded) a set that is not exactly this model's HF
        tensors: missing, unexpected or mis-shaped names. A tied ``lm_head`` is dropped."""
        specs = self._dynamo_rl_specs()
        if "lm_head.weight" in tensors and "lm_head.weight" not in specs:
            tensors.pop("lm_head.weight")
        missing = sorted(set(specs) - set(tensors))
        unexpected = sorted(set(tensors) - set(specs))
        shapes = sorted(n for n in set(specs) & set(tensors) if tuple(tensors[n].shape) != specs[n][0])
        if missing or unexpected or shapes:
            def few(names):
                return ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")

            raise ValueError(f"{source} does not match the served model; nothing was loaded: "
                             + "; ".join(f"{what} ({len(n)}): {few(n)}" for what, n in
                                         (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if n))

    def _dynamo_rl_specs(self) -> dict:
        """:func:`hf_param_specs` of the served model, built once per worker (a meta-device
        model: cheap, but not per refit)."""
        specs = getattr(self, "_dynamo_rl_spec_cache", None)
        if specs is None:
            mc = self.model_runner.model_config
            specs = self._dynamo_rl_spec_cache = hf_param_specs(mc.hf_config, mc.dtype)
        return specs

    def _dynamo_rl_receiver(self):
        receiver = getattr(self, "_dynamo_rl_recv", None)
        if receiver is None:
            from dynamo_rl.refit import Receiver

            specs = self._dynamo_rl_specs()
            # full tensors: vLLM's loaders take this rank's shard (see the module docstring)
            receiver = Receiver(tp_rank=0, tp_size=1, param_specs=specs, device="cpu")
            self._dynamo_rl_recv = receiver
        return receiver

    @staticmethod
    def _dynamo_rl_check_deadline(deadline_unix_s: float | None) -> None:
        if deadline_unix_s is not None and time.time() > float(deadline_unix_s):
            raise TimeoutError(f"{UPDATE_RPC} arrived {time.time() - float(deadline_unix_s):.2f} s after its "
                               "deadline_unix_s; nothing was loaded (the caller has given up on it)")


def _retie_lm_head(model, hf_config) -> None:
    """Tie a tied ``lm_head`` to the reloaded embedding again and re-run its weight processing.

    vLLM 0.31's layerwise ``reload_weights`` materializes ``embed_tokens.weight`` anew, which
    breaks the tie: ``lm_head`` kept the OLD parameter and, on CPU, the oneDNN handle packed
    from it, so the logits came from the previous weights (found by reading the head back
    through its kernel after a refit). Nothing to do for untied heads.
    """
    if not getattr(hf_config, "tie_word_embeddings", False):
        return
    head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if head is None or embed is None or not hasattr(head, "tie_weights"):
        return
    if head.weight is not embed.weight:
        head.tie_weights(embed)
    process = getattr(getattr(head, "quant_method", None), "process_weights_after_loading", None)
    if process is not None:
        process(head)


def _tp_position() -> tuple[int, int]:
    """``(tp_rank, tp_size)`` of this vLLM worker process."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return int(get_tensor_model_parallel_rank()), int(get_tensor_model_parallel_world_size())


def rpc_body(rpc: str, **kwargs: Any) -> Mapping[str, Any]:
    """An ``update_weights_from_distributed`` body that runs ``rpc`` without pausing or
    touching the version or the prefix cache (for :data:`DUMP_RPC` / :data:`REPORT_RPC`)."""
    return {"engine_rpc": rpc, "allow_unpaused": True, "reset_prefix_cache": False, **kwargs}
