"""Worker side of the weight plane: pull version N from a publisher into the engine's layout.

``Receiver.pull`` = fetch manifest (poll until version N is complete) → plan this TP
rank's copies (:mod:`dynamo_rl.refit.planner`, validating every name / shape / dtype
first) → allocate fresh destination tensors → pull through a transport (straight into
the destination slices where the layout allows) → re-check every source rank's seqlock
epoch → return. Any failure raises a :class:`~dynamo_rl.refit.errors.RefitError` subclass
before anything is returned, so the engine never sees a partial set and keeps serving
its previous weights::

    recv = Receiver.for_engine(engine)
    tensors, report = recv.pull(url, version=N)               # raises RefitError
    await engine.load_weights(tensors, N, adopt=True)

Destination tensors are freshly allocated on every pull (the engine adopts them as its
storage), so a failed pull never touches live weights. They are views into ONE flat buffer
laid out in source order, so that contiguous runs coalesce into few large copies (with an
unchanged layout, one copy per source bucket). The manifest's ``layout_id`` lets repeat
pulls skip re-sending and re-planning the descriptors.

In place (the fast path, for a GPU engine): ``pull(..., into=params)`` writes straight
into tensors the caller owns — the engine's live parameters, drained first by
:meth:`Engine.load_weights_in_place <dynamo_rl.serving.engine.Engine.load_weights_in_place>`.
One pass over the bytes, no second buffer, and captured CUDA graphs stay valid. When the
parameters are the views of one buffer this receiver allocated (the engine adopted a
staged pull once), the copies coalesce exactly as above::

    tensors, _ = recv.pull(url, 1); await engine.load_weights(tensors, 1, adopt=True)   # once
    await engine.load_weights_in_place(lambda p: recv.pull(url, N, into=p)[1], N)       # then

Control without HTTP (``shm`` transport): once a receiver holds a publisher's layout, it
reads every source rank's :class:`~dynamo_rl.refit.transport.shm.StateBlock` (version,
seqlock epoch, layout generation, liveness) from shared memory instead of the manifest
and ``/state`` round trips; a changed generation sends it back to the manifest.
``report["control"]`` says which path a pull took (``"http"`` or ``"shm_state"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from dynamo_rl.refit._http import request
from dynamo_rl.refit.errors import (
    PublisherGoneError,
    RefitError,
    StaleVersionError,
    TransportError,
    VersionNotFoundError,
)
from dynamo_rl.refit.planner import TargetPlan, plan_target
from dynamo_rl.refit.roles import TensorDescriptor
from dynamo_rl.refit.transport.base import ALIGN, Reader, boot_id, get_reader
from dynamo_rl.refit.transport.shm import StateBlock


class FrozenTensors(Mapping):
    """A read-only ``{name: tensor}`` for ``Receiver.pull(into=...)``.

    It cannot change after construction, so a receiver validates it once and afterwards
    only checks that it is the same object: O(1) per pull, where a plain dict is re-checked
    entry by entry (~0.1 ms for 400 tensors, a few % of an 8 GB GPU refit). Build a new one
    when the tensors change (``Engine`` does after adopting new storage).
    """

    __slots__ = ("_tensors",)

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class Receiver:
    """Pulls published weights into one target TP rank's layout.

    Args:
        tp_rank, tp_size: the engine's TP position.
        param_specs: ``{hf_name: (local_shape, dtype)}`` exactly as the engine expects
            (``Engine.param_specs()``; a tied ``lm_head`` omitted).
        device: where destination tensors are allocated (``"cpu"``, ``"cuda:0"``...).
        transport: default transport (None: ``shm`` when every source is on this host,
            else ``dist``).
        transport_options: ``{transport: kwargs}`` for its reader (e.g.
            ``{"dist": {"msg_bytes": 64 << 20}}``).
        double_buffer: reuse two destination sets alternately instead of allocating fresh
            tensors per pull (saves allocation / first-touch page faults). Only safe when the
            engine adopted the previous pull's tensors (``load_weights(adopt=True)`` succeeded):
            pull N+2 overwrites the set returned by pull N.
    """

    def __init__(self, *, tp_rank: int, tp_size: int,
                 param_specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 device: str | torch.device = "cpu", transport: str | None = None,
                 transport_options: Mapping[str, dict] | None = None, double_buffer: bool = False):
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.param_specs = {n: (tuple(s), dt) for n, (s, dt) in param_specs.items()}
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:   # "cuda" is the current device:
            self.device = torch.device("cuda", torch.cuda.current_device())   # compare with tensors' cuda:N
        self.transport = transport
        self.transport_options = dict(transport_options or {})
        self.double_buffer = double_buffer
        self._sets: list[dict[str, torch.Tensor] | None] = [None, None]
        self._flip = 0
        self.last_version: int | None = None
        self._readers: dict[str, Reader] = {}
        self._layout: dict | None = None
        self._fast: dict | None = None  # {url, plan, descs, sources, gens}: the shm-state path
        self._states: dict[str, StateBlock] = {}  # attached state blocks by segment name
        self._into: tuple | None = None  # (key, (dst, flat, dst_key)) of the last ``into``

    @classmethod
    def for_engine(cls, engine, **kw) -> "Receiver":
        """Receiver matching an ``Engine`` (its ``layout``, ``param_specs()``, device)."""
        layout = getattr(engine, "layout", None) or {"tp_rank": 0, "tp_size": 1}
        device = kw.pop("device", getattr(engine, "device", "cpu"))
        return cls(tp_rank=int(layout.get("tp_rank", 0)), tp_size=int(layout.get("tp_size", 1)),
                   param_specs=engine.param_specs(), device=device, **kw)

    # ------------------------------------------------------------------ manifest
    def fetch_manifest(self, publisher_url: str, version: int, deadline: float) -> dict:
        """GET the manifest of ``version``, polling while it is not complete yet.

        Raises: StaleVersionError (publisher moved past it), VersionNotFoundError (timeout),
        PublisherGoneError (unreachable).
        """
        url = publisher_url.rstrip("/") + f"/manifest?version={int(version)}"
        if self._layout is not None:
            url += f"&layout={self._layout['id']}"
        delay = 0.01
        while True:
            status, body = request(url, timeout=max(1.0, deadline - time.monotonic()))
            if status == 200:
                return body
            if status == 410:
                raise StaleVersionError(
                    f"publisher {publisher_url} no longer holds version {version} (current "
                    f"{body.get('current')}); ask for the current version"
                )
            if status != 404:
                raise RefitError(f"publisher {publisher_url} answered {status}: {body.get('error', body)}")
            if time.monotonic() + delay > deadline:
                raise VersionNotFoundError(
                    f"publisher {publisher_url} did not publish version {version} in time (current "
                    f"{body.get('current')}); publish it first or raise timeout_s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def plan(self, manifest: dict) -> tuple[TargetPlan, dict]:
        """This rank's ``(plan, descriptors)`` for a manifest, cached per ``layout_id``
        (a manifest without ``tensors`` refers to the cached layout). Raises MismatchError."""
        lid = manifest.get("layout_id")
        if self._layout is not None and lid == self._layout["id"]:
            return self._layout["plan"], self._layout["descs"]
        if "tensors" not in manifest:
            raise RefitError("the publisher sent a short manifest for a layout this receiver does not hold")
        descs = {d["name"]: TensorDescriptor.from_json(d) for d in manifest["tensors"]}
        p = plan_target(descs, manifest["naming"], manifest["model_config"], self.param_specs,
                        self.tp_rank, self.tp_size)
        self._layout = {"id": lid, "plan": p, "descs": descs, "dst": self._dst_layout(p, descs),
                        "bytes": sum(torch.Size(s).numel() * dt.itemsize for s, dt in self.param_specs.values())}
        self._sets = [None, None]
        return p, descs

    def _dst_layout(self, plan: TargetPlan, descs) -> tuple[dict[str, int], int]:
        """Byte offsets of every destination tensor in one flat buffer, in source order
        (so that an unchanged layout makes whole source buckets contiguous copies)."""
        first: dict[str, tuple] = {}
        for c in plan.copies:
            pl = next(p for p in descs[c.src].placement if p.rank == c.src_rank)
            key = (c.src_rank, pl.bucket, pl.offset, c.src_box[0][0])
            if c.dst not in first or key < first[c.dst]:
                first[c.dst] = key
        order = sorted(self.param_specs, key=lambda n: first.get(n, (1 << 30,)))
        offs, pos = {}, 0
        for n in order:
            shape, dt = self.param_specs[n]
            offs[n] = pos
            nbytes = torch.Size(shape).numel() * dt.itemsize
            pos += -(-max(nbytes, 1) // ALIGN) * ALIGN
        return offs, pos

    def _allocate(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        offs, total = self._layout["dst"]
        flat = torch.empty(max(total, 1), dtype=torch.uint8, device=self.device)
        dst = {}
        for n, (shape, dt) in self.param_specs.items():
            nbytes = torch.Size(shape).numel() * dt.itemsize
            dst[n] = flat[offs[n] : offs[n] + nbytes].view(dt).view(shape)
        return dst, flat

    # ------------------------------------------------------------------ pull
    def pull(self, publisher_url: str, version: int, transport: str | None = None,
             timeout_s: float = 120.0, *, progress: Callable[[int, int], None] | None = None,
             into: Mapping[str, torch.Tensor] | None = None
             ) -> tuple[dict[str, torch.Tensor], dict]:
        """Pull version ``version`` into this rank's layout.

        Args:
            publisher_url: rank 0's ``Publisher.url``.
            version: the weights version to load.
            transport: ``"shm"`` | ``"dist"`` | ``"nixl"`` | None (auto).
            timeout_s: overall limit (seconds) incl. waiting for the version to appear.
            progress: optional ``callable(done_bytes, total_bytes)`` during the transfer.
            into: write into these tensors instead of fresh ones: exactly ``param_specs``
                (names, shapes, dtypes), contiguous, on this receiver's device. Coalesced
                copies need them to be views of one buffer laid out as this receiver's own
                (see the module docstring). Validated again whenever the mapping or one of its
                tensor objects changes; after moving a tensor to new storage in place
                (``p.data = t``), pass a new mapping. A failure part-way leaves them PARTIAL:
                only for a caller that stops using them until a later pull succeeds
                (``Engine.load_weights_in_place`` does).
        Returns:
            ``(tensors, report)``: HF-named tensors matching ``param_specs`` exactly (``into``
            itself when given), and ``{"version", "bytes", "tensors", "seconds",
            "transfer_seconds", "transport", "control", "overpull_factor", "moved_bytes",
            "overpull_by_role", "copy_ops"}`` (bytes = destination bytes; transfer_seconds =
            the transport's data movement alone, incl. translation; control = ``"http"`` |
            ``"shm_state"``, how the version and the seqlock were read).
        Raises:
            StaleVersionError: ``version`` older than the last pulled one or than the
                publisher's, or overwritten during the pull.
            VersionNotFoundError: not published before the timeout.
            MismatchError: missing / unexpected / shape / dtype / layout mismatch (all listed),
                also for an ``into`` that does not match ``param_specs``.
            PublisherGoneError: a source rank disappeared before the pull was complete.
            TransportError: the transport is unavailable.
            Every error raised before the first byte is written has ``untouched = True``.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        try:
            if self.last_version is not None and version < self.last_version:
                raise StaleVersionError(
                    f"asked for version {version} but this receiver already loaded {self.last_version}; "
                    "versions only move forward"
                )
            prep = self._prepare(publisher_url, version, transport, deadline, into)
        except RefitError as e:
            e.untouched = True  # nothing written yet: ``into`` still holds what it held
            raise
        via_state, snap, plan, descs, sources, used, name, reader, dst, flat, dst_key = prep
        t_xfer = time.monotonic()
        try:
            with torch.no_grad():  # ``into`` may be parameters that require grad
                for n, box in plan.fills:
                    dst[n][tuple(slice(a, b) for a, b in box)].zero_()
                moved = reader.pull(plan, descs, sources, dst, version=version, deadline=deadline,
                                    progress=progress, flat=flat, dst_key=dst_key)
            t_xfer = time.monotonic() - t_xfer
        except RefitError:
            raise
        except Exception as e:  # transport-level failure (socket closed, gloo error...)
            raise PublisherGoneError(
                f"pull of version {version} from {publisher_url} over {name!r} failed: "
                f"{type(e).__name__}: {e}; "
                + ("the engine keeps its previous weights" if into is None else
                   "the tensors given as into= are partial: pull a complete version into them")
            ) from e
        states = self._state_blocks(sources, used) if name == "shm" else None
        if states is not None:
            if snap is None:
                snap = {r: sources[r].get("epoch") for r in used}
            self._check_states(states, snap, version, publisher_url, partial=into is not None)
            self._fast = {"url": publisher_url, "plan": plan, "descs": descs, "sources": sources,
                          "used": used, "gens": {r: sources[r].get("gen") for r in used}, "states": states}
        else:
            self._check_sources(sources, used, version, deadline)
            self._fast = None
        self.last_version = version
        if self.double_buffer and into is None:
            self._sets[self._flip] = (dst, flat)
            self._flip ^= 1
        nbytes = self._layout["bytes"]
        report = {
            "version": version, "bytes": nbytes, "tensors": len(dst),
            "seconds": time.monotonic() - t0, "transfer_seconds": t_xfer, "transport": name,
            "control": "shm_state" if via_state else "http",
            "moved_bytes": moved, "copy_ops": getattr(reader, "last_ops", None),
            "overpull_factor": moved / plan.needed_bytes if plan.needed_bytes else 1.0,
            "overpull_by_role": plan.overpull_by_role,
        }
        return (dst if into is None else into), report

    def _prepare(self, publisher_url, version, transport, deadline, into):
        """Everything before the first byte moves: version wait, plan, reader, destination."""
        snap = None
        fast = self._fast
        if fast is not None and fast["url"] == publisher_url and (transport or self.transport or "shm") == "shm":
            snap = self._wait_states(fast, version, deadline)  # None: layout changed, ask HTTP
        via_state = snap is not None
        if via_state:
            plan, descs, sources, used, name = fast["plan"], fast["descs"], fast["sources"], fast["used"], "shm"
        else:
            manifest = self.fetch_manifest(publisher_url, version, deadline)
            plan, descs = self.plan(manifest)
            sources = {int(r): a for r, a in manifest["sources"].items()}
            used = list(plan.source_ranks)
            name = transport or self.transport or self._auto(sources, used)
        reader = self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = get_reader(name, device=self.device,
                                                     **self.transport_options.get(name, {}))
        if into is not None:
            dst, flat, dst_key = self._bind_into(into)
        elif self.double_buffer and self._sets[self._flip] is not None:
            dst, flat = self._sets[self._flip]
            dst_key = ("own", self._layout["id"])
        else:
            dst, flat = self._allocate()
            dst_key = ("own", self._layout["id"])
        return via_state, snap, plan, descs, sources, used, name, reader, dst, flat, dst_key

    # ------------------------------------------------------------------ in place
    def _bind_into(self, into: Mapping[str, torch.Tensor]):
        """``(dst, flat, dst_key)`` for caller-owned tensors, validated whenever the mapping or
        one of its tensor objects changes (a :class:`FrozenTensors` only when it is another
        object). Not detected: moving ONE tensor object to new storage in place
        (``p.data = t``, ``set_``): pass a new mapping then.

        ``flat`` (coalesced copies) only when every tensor sits where this receiver's own
        buffer layout puts it, in one storage: then the bytes between tensors are this
        receiver's alignment padding and may be copied over. Any other layout gets one copy
        per planned slice, touching nothing but the tensors' own bytes.

        Raises: MismatchError (names, shapes, dtypes, device, contiguity, overlapping tensors,
        non-tensors; all listed)."""
        key = self._into_key(into)
        if key is not None and self._into is not None and self._into[0] == key:
            return self._into[1]
        values = list(into.values())
        from dynamo_rl.refit.errors import MismatchError

        missing = [n for n in self.param_specs if n not in into]
        unexpected = [n for n in into if n not in self.param_specs]
        bad = {}
        spans = []
        for n, t in into.items():
            if n not in self.param_specs:
                continue
            shape, dt = self.param_specs[n]
            if not isinstance(t, torch.Tensor):
                bad[n] = f"not a torch.Tensor ({type(t).__name__})"
            elif tuple(t.shape) != shape or t.dtype != dt:
                bad[n] = f"into has {tuple(t.shape)} {t.dtype}, the layout needs {shape} {dt}"
            elif t.device != self.device:
                bad[n] = f"into is on {t.device}, this receiver pulls to {self.device}"
            elif not t.is_contiguous():
                bad[n] = "into is not contiguous"
            elif t.numel():
                spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), n))
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                bad.setdefault(b, f"shares memory with {a} (every tensor needs its own bytes)")
        if missing or unexpected or bad:
            raise MismatchError(
                "the tensors given as into= do not match this receiver's param_specs",
                missing=missing, unexpected=unexpected, mismatched=bad,
                fix="pass into= exactly the receiver's param_specs (names, shapes, dtypes) as contiguous, "
                    "non-overlapping torch tensors on its device, e.g. the engine's parameters")
        dst = dict(into)
        offs, total = self._layout["dst"]
        st = values[0].untyped_storage() if values else None
        flat, dst_key = None, ("into", tuple(map(torch.Tensor.data_ptr, values)))
        if st is not None and st.nbytes() >= total and all(
                t.untyped_storage().data_ptr() == st.data_ptr() and t.data_ptr() - st.data_ptr() == offs[n]
                for n, t in dst.items()):
            flat = torch.empty(0, dtype=torch.uint8, device=self.device).set_(st)
            dst_key = ("own", self._layout["id"])
        self._into = (key, (dst, flat, dst_key), into)  # holding ``into`` keeps its id unique
        return self._into[1]

    @staticmethod
    def _into_key(into) -> tuple | None:
        """What identifies a validated ``into`` (None: a mapping holding non-tensors).

        A :class:`FrozenTensors` is immutable: its identity is enough, O(1). Another mapping:
        itself, its names, its tensor objects and the first / last address (new storage for
        all, as an engine that adopts). The cached binding holds ``into`` and its tensors, so
        none of these ids can be reused by another object."""
        if isinstance(into, FrozenTensors):
            return ("frozen", id(into))
        values = list(into.values())
        try:
            return (id(into), tuple(into), tuple(map(id, values)),
                    values[0].data_ptr() if values else 0, values[-1].data_ptr() if values else 0)
        except (AttributeError, TypeError):
            return None

    # ------------------------------------------------------------------ shm state (no HTTP)
    def _state_blocks(self, sources, used) -> dict[int, StateBlock] | None:
        """Attached state blocks of the used source ranks, or None when one offers none."""
        out = {}
        for r in used:
            name = ((sources[r].get("shm") or {}).get("state"))
            if not name or sources[r].get("gen") is None:
                return None
            blk = self._states.get(name)
            if blk is None:
                blk = self._states[name] = StateBlock.attach(name, r)
            out[r] = blk
        return out

    def _wait_states(self, fast: dict, version: int, deadline: float) -> dict[int, int] | None:
        """Wait until every used source rank holds ``version`` (read from shared memory).

        Returns ``{rank: epoch}`` to check after the copies, or None when a rank's layout
        generation changed or its publisher is gone (the caller asks the manifest over HTTP:
        a restarted publisher answers, a dead one raises PublisherGoneError there).
        Raises: StaleVersionError, VersionNotFoundError."""
        delay = 0.0005
        while True:
            snap, waiting = {}, []
            for r in fast["used"]:
                blk = fast["states"][r]
                epoch, v, gen = blk.read()
                if gen != fast["gens"][r]:
                    return None
                if v > version:
                    raise StaleVersionError(
                        f"publisher {fast['url']} rank {r} no longer holds version {version} (current {v}); "
                        "ask for the current version")
                if v < version or epoch % 2:
                    # not there yet: a dead (or restarted) publisher never gets there, ask HTTP.
                    # (When it is there, liveness is checked after the copies, in _check_states.)
                    if not blk.alive():
                        self._drop_fast()
                        return None
                    waiting.append(f"rank {r} at version {v}")
                snap[r] = epoch
            if not waiting:
                return snap
            if time.monotonic() + delay > deadline:
                raise VersionNotFoundError(
                    f"publisher {fast['url']} did not publish version {version} in time "
                    f"({', '.join(waiting)}); publish it first or raise timeout_s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def ready(self, publisher_url: str, version: int) -> bool:
        """True when a pull of ``version`` from ``publisher_url`` would start copying at once:
        this receiver holds that publisher's layout (it pulled from it before over ``shm``)
        and every source rank's shared-memory state shows ``version`` complete. Reads shared
        memory only; never blocks, never raises."""
        fast = self._fast
        if fast is None or fast["url"] != publisher_url:
            return False
        try:
            for r in fast["used"]:
                epoch, v, gen = fast["states"][r].read()
                if v != version or epoch % 2 or gen != fast["gens"][r]:
                    return False
        except (OSError, ValueError):  # a closed mapping
            return False
        return True

    def _drop_fast(self) -> None:
        """Forget the shared-memory path (its publisher went away); detach its blocks."""
        fast, self._fast = self._fast, None
        for blk in (fast or {}).get("states", {}).values():
            self._states.pop(blk.name, None)
            blk.close()

    def _check_states(self, states, snap, version, url, partial: bool = False) -> None:
        """Seqlock check through shared memory: same epoch and version, publisher alive."""
        gone, moved = [], []
        for r, blk in states.items():
            epoch, v, _ = blk.read()
            if not blk.alive():
                gone.append(f"rank {r}")
            elif epoch != snap[r] or v != version:
                moved.append(f"rank {r} now at version {v} epoch {epoch}")
        if gone:
            raise PublisherGoneError(
                f"source {', '.join(gone)} of {url} disappeared during the pull of version {version}; "
                + ("the tensors given as into= are partial" if partial else
                   "nothing was returned, the engine keeps its previous weights")
                + "; restart the publisher and retry")
        if moved:
            raise StaleVersionError(
                f"version {version} was overwritten during the pull ({'; '.join(moved)}); "
                "retry with the newer version")

    def _auto(self, sources, used) -> str:
        me = boot_id()
        if all((sources[r].get("shm") or {}).get("boot_id") == me for r in used):
            return "shm"
        return "dist"

    def _check_sources(self, sources, used, version, deadline) -> None:
        """Seqlock check: every source rank read must still hold ``version`` at the same epoch."""
        gone, moved = [], []
        for r in used:
            a = sources[r]
            try:
                status, st = request(a["http"] + "/state", timeout=max(1.0, min(10.0, deadline - time.monotonic())))
            except PublisherGoneError:
                gone.append(f"rank {r} ({a['http']}, pid {a.get('pid')})")
                continue
            if status != 200 or st.get("version") != version or st.get("epoch") != a.get("epoch"):
                moved.append(f"rank {r} now at version {st.get('version')} epoch {st.get('epoch')}")
        if gone:
            raise PublisherGoneError(
                f"source {', '.join(gone)} disappeared during the pull of version {version}; "
                "nothing was returned, the engine keeps its previous weights; restart the "
                "publisher and retry"
            )
        if moved:
            raise StaleVersionError(
                f"version {version} was overwritten during the pull ({'; '.join(moved)}); "
                "retry with the newer version"
            )

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()
        for b in self._states.values():
            b.close()
        self._states.clear()
        self._fast = None
        self._into = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["FrozenTensors", "Receiver", "TransportError"]
