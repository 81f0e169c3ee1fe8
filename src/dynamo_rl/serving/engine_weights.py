"""The weights side of :class:`~dynamo_rl.serving.engine.Engine`: how a new version is loaded.

Owns: the one path by which weights change (validate, stop admitting, drain, swap or fill
on the engine thread, drop the prefix cache, make the version current, admit again), the
weights-version rules (never back, a repeat is a no-op) and the partial state a failed
in-place load leaves. The bytes themselves are
:class:`~dynamo_rl.serving.model_runner.ModelRunner`'s (``validate``, ``swap``, ``fill``).

:class:`EngineWeights` is a mixin of :class:`~dynamo_rl.serving.engine.Engine` (as vLLM's
model runner takes its LoRA and KV-connector parts from mixins): it shares the engine's
scheduling state and reads these attributes of it: ``_runner`` (the ModelRunner),
``_sched`` (the Scheduler), ``_load_lock``, ``_hold`` (admission held while > 0),
``_partial``, ``weights_version``, ``_wake``, ``_loop`` and ``_executor``, and calls its
``start()``, ``_wait_idle()`` and ``_fail(request, error)``. Must not import
``dynamo_rl.serving.engine``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from dynamo_rl.serving.engine_types import PartialWeightsError, WeightsError

__all__ = ["EngineWeights"]


class EngineWeights:
    """Weight loading for :class:`~dynamo_rl.serving.engine.Engine` (see the module docstring)."""

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """HF parameter names → ``(shape, dtype)`` of this engine's weights (tied ``lm_head`` omitted)."""
        return self._runner.param_specs()

    async def load_weights(self, tensors: Mapping[str, torch.Tensor], version: int, *,
                           adopt: bool = False) -> dict:
        """Replace every weight with ``tensors`` (HF names, :meth:`param_specs` layout) as ``version``.

        Validates all names, shapes and dtypes first; then stops admitting, waits for the
        in-flight requests to finish (as :meth:`pause`), swaps, drops the prefix cache,
        sets ``weights_version`` and admits again (unless :meth:`pause` was called).
        ``adopt=True`` makes each tensor the parameter's storage (``param.data = t``, no
        copy; tied weights stay tied); otherwise the values are copied in.

        Returns:
            ``{"version", "bytes", "tensors", "seconds", "freed_tokens"}``, or
            ``{"noop": True, "version", "bytes": 0, "tensors": 0, "seconds"}`` when
            ``version`` is the current one.
        Raises:
            WeightsError: ``version`` is older than the current one, or the set does not
                match (every missing/unexpected/mismatched name listed). Nothing changes.
        """
        nbytes, rep = await self._replace_weights(
            version, lambda: self._runner.swap(tensors, adopt),
            prepare=lambda: self._runner.validate(tensors, version, self.weights_version, adopt))
        return rep if rep.get("noop") else {**rep, "bytes": nbytes}

    async def _replace_weights(self, version: int, work: Callable[[], object], *,
                               prepare: Callable[[], None] | None = None,
                               on_error: Callable[[BaseException], None] | None = None,
                               inline: bool = False) -> tuple[object, dict]:
        """The one way weights change: under the load lock, unless ``version`` is current
        (then ``(None, noop report)``), ``prepare()`` (may refuse), stop admitting, wait
        until no request runs, ``work()`` on the engine thread (or on this one, ``inline``;
        ``on_error(exc)`` and re-raise on failure), drop the prefix cache, make ``version`` current, admit again.

        Returns ``(work's result, {"version", "tensors", "seconds", "freed_tokens"})``."""
        await self.start()
        t0 = time.perf_counter()
        async with self._load_lock:
            if self._is_current(version):
                return None, {"noop": True, "version": version, "bytes": 0, "tensors": 0,
                              "seconds": time.perf_counter() - t0}
            if prepare is not None:
                prepare()
            self._hold += 1
            try:
                await self._wait_idle()
                try:
                    # the engine thread is idle here (drained); inline: run on this thread
                    out = work() if inline else await self._loop.run_in_executor(self._executor, work)
                except BaseException as exc:
                    if on_error is not None:
                        on_error(exc)
                    raise
                freed = self._sched.drop_cached()
                self.weights_version = version
                self._partial = None
            finally:
                self._hold -= 1
                self._wake.set()
        return out, {"version": version, "tensors": len(self._runner.params), "seconds": time.perf_counter() - t0,
                     "freed_tokens": freed}

    def _is_current(self, version) -> bool:
        """True when ``version`` is served already (a no-op load).

        Raises: WeightsError when ``version`` is not an int or is older than the served one."""
        if isinstance(version, bool) or not isinstance(version, int):
            raise WeightsError(f"version must be an int, got {version!r}")
        if version < self.weights_version:
            raise WeightsError(f"weights version {version} is older than the served version "
                               f"{self.weights_version}; refusing to go back (send a newer version)")
        return version == self.weights_version and self._partial is None

    async def load_weights_in_place(self, fill: Callable[[dict[str, torch.Tensor]], object],
                                    version: int, *, inline: bool = False) -> dict:
        """Write version ``version`` straight into the live parameters.

        Stops admitting and drains (as :meth:`load_weights`), then calls ``fill(params)`` on
        the engine thread under ``torch.inference_mode()``, where ``params`` is
        ``{hf_name: tensor}`` in the :meth:`param_specs` layout (a tied ``lm_head`` omitted):
        detached views sharing the parameters' storage, one read-only
        :class:`~dynamo_rl.refit.receiver.FrozenTensors` until the storage changes; ``fill`` must write every element of every tensor in place and never
        replace them (e.g. ``Receiver.pull(url, version, into=params)``). Then drops the
        prefix cache, sets ``weights_version`` and admits again.

        Against :meth:`load_weights`: one pass over the bytes instead of two (or a second
        buffer), and captured CUDA graphs stay valid, since the parameters keep their
        addresses. The price: if ``fill`` raises part-way, the parameters are a mix of
        versions. The engine then refuses every request with :class:`PartialWeightsError`
        (waiting ones too) until a later load of either kind completes, and ``fill``'s
        exception is re-raised unchanged. An exception with ``untouched = True`` (a refit
        error raised before the first byte was written) leaves the engine serving as before. Use it where a failed refit is retried or the
        worker replaced anyway (RL refits); :meth:`load_weights` keeps serving the old
        version on failure.

        ``inline=True`` runs ``fill`` on the event loop's thread instead of the engine
        thread: no thread hand-offs (~0.3-0.5 ms), but the event loop is held for the whole
        fill. Only for a fill that cannot wait on anything, e.g. a pull whose version is
        already published (``Receiver.ready``) into a GPU (a few ms of copies).

        Returns:
            ``{"version", "bytes", "tensors", "seconds", "freed_tokens", "fill"}`` (``fill``:
            what ``fill`` returned), or ``{"noop": True, ...}`` for the current version.
        Raises:
            WeightsError: ``version`` is not an int or is older than the current one
                (nothing changes).
            Exception: whatever ``fill`` raised (the weights are then partial, see above).
        """
        def failed(exc: BaseException) -> None:
            if getattr(exc, "untouched", False):  # failed before writing a byte
                return
            self._mark_partial(
                f"the in-place load of weights version {version} failed part-way "
                f"({type(exc).__name__}: {exc}); the parameters are partial and this engine "
                f"refuses requests until a complete weights load (last complete version "
                f"{self.weights_version})")

        out, rep = await self._replace_weights(version, lambda: self._runner.fill(fill), on_error=failed, inline=inline)
        return rep if rep.get("noop") else {**rep, "bytes": self._runner.param_bytes, "fill": out}

    def _mark_partial(self, reason: str) -> None:
        self._partial = reason
        self._sched.drop_cached()
        error = PartialWeightsError(reason)
        for req in list(self._sched.waiting):
            self._fail(req, error)

    @property
    def weights_partial(self) -> str | None:
        """Why the parameters are partial (a failed :meth:`load_weights_in_place`), else None."""
        return self._partial
