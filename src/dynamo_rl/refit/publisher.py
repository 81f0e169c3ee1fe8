"""Trainer side of the weight plane: publish this rank's LOCAL shards for version N.

Every source rank runs a :class:`Publisher`. It copies its shards into its arena (flat
buckets allocated once and reused while names/shapes/dtypes stay the same; CPU shared
memory or CUDA memory), then announces them:

* Rank 0 is the *coordinator*: its small HTTP server (stdlib ``ThreadingHTTPServer``) serves
  the merged manifest at ``GET {url}/manifest?version=N``.
* Rank r > 0 POSTs its local descriptors + transport address to ``{coordinator}/register``.
  It learns the coordinator URL from ``coordinator_url=`` or, when torch.distributed is
  initialised and no URL is given, by ``broadcast_object_list`` from rank 0 at
  construction (every rank of ``group`` must construct its Publisher then).
* Version N becomes visible (manifest served) only once all ``tp_size`` ranks registered N;
  before that a receiver gets 404 and polls.
* ``layout_id`` hashes naming + config + descriptors; ``GET /manifest?version=N&layout=ID``
  with the ID the receiver already holds returns the manifest without ``tensors`` /
  ``model_config`` (versions of an unchanged layout cost a few hundred bytes).

Every rank also serves ``GET /state`` → ``{rank, version, epoch, pid}``. ``epoch`` is a
seqlock counter: odd while the arena is being overwritten. A receiver re-reads the state of
every rank it pulled from after its copies; a changed epoch (new version written meanwhile)
or an unreachable rank makes it raise instead of returning torn weights. Ranks also answer
the ``dist`` transport's ``/dist/*`` routes. The same state (plus ``gen``, bumped when the
arena is re-allocated or naming / model_config change) is mirrored in a shared-memory
:class:`~dynamo_rl.refit.transport.shm.StateBlock` named in the ``shm`` address, so a
same-host receiver that already holds the layout needs no HTTP round trip at all.

Manifest JSON::

    {"version": N, "naming": "hf"|"megatron", "model_config": {...HF config...},
     "tp_size": S, "layout_id": sha1, "tensors": [{"name", "role", "global_shape", "dtype",
        "placement": [{"rank", "dim", "start", "length", "bucket", "offset"}], "extras"}],
     "sources": {"0": {"rank": 0, "http": URL, "epoch": e, "pid": p, "shm": {...}, "dist": {...}}}}

Single-process use (the embedded trainer: TP=1, HF names, CPU)::

    pub = Publisher()                                   # transport "shm"
    pub.publish(step, model.state_dict(), model_config=model.config.to_dict())
    # worker: POST /engine/update_weights {"version": step, "publisher": pub.url}
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping

import torch

from dynamo_rl.refit._http import HTTPStatus, JSONServer, request
from dynamo_rl.refit.errors import RefitError, StaleVersionError
from dynamo_rl.refit.roles import (
    Role,
    local_descriptors,
    merge_descriptors,
    strip_wrappers,
)
from dynamo_rl.refit.transport.base import Arena
from dynamo_rl.refit.transport.shm import StateBlock, shm_address


class Publisher:
    """Publish one source rank's local shards.

    Args:
        host, port: where this rank's HTTP server binds (port 0: a free one).
        transport: default transport advertised (``"shm"``, ``"dist"``, ``"nixl"``); shm
            and dist are always served; nixl is registered only when asked for.
        tp_rank, tp_size: this rank's position in the source TP group.
        coordinator_url: rank 0's URL (needed by ranks > 0 unless torch.distributed is
            initialised, then it is broadcast from rank 0 over ``group``).
        bucket_bytes: arena bucket size (bytes).
        overrides: ``{regex: role}`` for the role classifier (non-standard model code).
        group: torch.distributed group for the URL broadcast (default: WORLD).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, transport: str = "shm",
                 tp_rank: int = 0, tp_size: int = 1, coordinator_url: str | None = None,
                 bucket_bytes: int = 256 << 20, overrides: Mapping[str, Role | str] | None = None,
                 group=None, register_timeout_s: float = 60.0):
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} outside tp_size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.transport = transport
        self.bucket_bytes = bucket_bytes
        self.overrides = overrides
        self.register_timeout_s = register_timeout_s
        self.version: int | None = None
        self.epoch = 0
        self._arena: Arena | None = None
        self._lock = threading.RLock()  # serialises publish vs dist sends
        self._pending: dict[int, dict[int, dict]] = {}
        self._manifest: dict | None = None
        self._extra: dict = {}  # transport servers (nixl) by name
        self._want_nixl = transport == "nixl"
        self._shm_addr: dict | None = None
        self._gen = 0  # bumped when the arena is re-allocated or naming / model_config change
        self._sig: str | None = None
        self._state_block = StateBlock.create()  # same-host receivers read the seqlock here
        routes = {("GET", "/state"): self._state}
        if tp_rank == 0:
            routes[("GET", "/manifest")] = self._get_manifest
            routes[("POST", "/register")] = self._register
        from dynamo_rl.refit.transport.dist import DistServer

        self._dist = DistServer(self)
        routes.update(self._dist.routes())
        self._server = JSONServer(host, port, routes)
        self.http_url = self._server.url
        if tp_rank == 0:
            self.url = self.http_url
        elif coordinator_url:
            self.url = coordinator_url.rstrip("/")
        else:
            self.url = None
        if tp_size > 1 and coordinator_url is None:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                if tp_rank > 0:
                    self.close()
                    raise RefitError(
                        f"Publisher rank {tp_rank}: pass coordinator_url=<rank 0's Publisher.url> "
                        "or initialise torch.distributed so it can be broadcast"
                    )
            else:
                obj = [self.url if tp_rank == 0 else None]
                src = 0 if group is None else dist.get_global_rank(group, 0)
                dist.broadcast_object_list(obj, src=src, group=group)
                self.url = obj[0]

    # ------------------------------------------------------------------ publish
    def publish(self, version: int, shards: Mapping[str, torch.Tensor], *, naming: str = "hf",
                model_config: Mapping) -> None:
        """Register this rank's local shards as version ``version``.

        Args:
            version: strictly increasing int.
            shards: this rank's LOCAL tensors (any device; raw names with wrapper prefixes
                allowed; Megatron TP shards when ``naming="megatron"``).
            naming: ``"hf"`` or ``"megatron"``.
            model_config: the HF config dict (``config.to_dict()``).
        Raises:
            StaleVersionError: ``version`` is not newer than the last published one.
            MismatchError: a name cannot be classified (listing them all).
            PublisherGoneError: rank > 0 cannot reach the coordinator.
        """
        if naming not in ("hf", "megatron"):
            raise ValueError(f"naming must be 'hf' or 'megatron', not {naming!r}")
        if self.version is not None and version <= self.version:
            raise StaleVersionError(
                f"publish({version}) but version {self.version} is already published; versions must increase"
            )
        if naming == "hf" and model_config.get("tie_word_embeddings"):
            # a tied lm_head shares the embedding's storage: never published twice
            shards = {k: v for k, v in shards.items() if strip_wrappers(k) != "lm_head.weight"}
        descs = local_descriptors(shards, rank=self.tp_rank, tp_rank=self.tp_rank,
                                  tp_size=self.tp_size, overrides=self.overrides)
        named = {d.name: t for d, t in zip(descs, shards.values())}
        # tensors sharing storage with another one (tied lm_head in a state_dict) are kept:
        # the receiver decides what it needs.
        device = next(iter(named.values())).device if named else torch.device("cpu")
        sig = json.dumps([naming, dict(model_config)], sort_keys=True, default=str)
        with self._lock:
            self.epoch += 1  # odd: writing
            self._state_block.begin(self.epoch)
            ok = False
            try:
                if self._arena is None or not self._arena.fits(named, device):
                    if self._arena is not None:
                        self._arena.close()
                        self._dist.reset()
                    self._arena = Arena(named, bucket_bytes=self.bucket_bytes, device=device)
                    self._shm_addr = None
                    self._gen += 1
                if sig != self._sig:
                    self._sig = sig
                    self._gen += 1
                if self._want_nixl:
                    self._bind_nixl()  # registration once per arena, reused across versions
                self._arena.write(named)
                ok = True
            finally:
                self.epoch += 1
                if ok:
                    self._state_block.commit(self.epoch, version, self._gen)
                else:  # torn arena: no complete version here; cached receiver plans are void
                    self._gen += 1
                    self._state_block.commit(self.epoch, -1, self._gen)
            self.version = version
            for d in descs:
                s = self._arena.slots[d.name]
                d.placement[0].bucket, d.placement[0].offset = s.bucket, s.offset
            entry = {
                "rank": self.tp_rank, "version": version, "epoch": self.epoch,
                "naming": naming, "model_config": dict(model_config),
                "tensors": [d.to_json() for d in descs], "address": self.address(),
            }
        if self.tp_rank == 0:
            self._register({}, entry)
        else:
            deadline = time.monotonic() + self.register_timeout_s
            while True:
                status, body = request(self.url + "/register", entry, timeout=self.register_timeout_s)
                if status == 200:
                    break
                if status == 503 and time.monotonic() < deadline:  # coordinator not ready
                    time.sleep(0.05)
                    continue
                raise RefitError(f"rank {self.tp_rank}: coordinator refused version {version}: {body}")

    def address(self) -> dict:
        a = {"rank": self.tp_rank, "http": self.http_url, "pid": os.getpid(), "epoch": self.epoch,
             "gen": self._gen}
        if self._arena is not None:
            if self._shm_addr is None:  # once per arena: IPC handles stay valid across versions
                self._shm_addr = dict(shm_address(self._arena), state=self._state_block.name)
            a["shm"] = self._shm_addr
            a["dist"] = {"backend": "nccl" if self._arena.device.type == "cuda" else "gloo"}
            if "nixl" in self._extra:
                a["nixl"] = self._extra["nixl"].address()
        return a

    def enable_nixl(self) -> None:
        """Register the arena with a NIXL agent (done automatically with ``transport="nixl"``).
        The next ``publish`` advertises it. Raises TransportError when NIXL is not installed."""
        self._want_nixl = True
        if self._arena is not None:
            self._bind_nixl()

    def _bind_nixl(self) -> None:
        from dynamo_rl.refit.transport.nixl import NixlServer

        srv = self._extra.get("nixl")
        if srv is None:
            self._extra["nixl"] = NixlServer(self._arena, name=f"pub-{os.getpid()}-{self.tp_rank}-{id(self):x}")
        else:
            srv.bind(self._arena)

    # ------------------------------------------------------------------ HTTP routes
    def _state(self, q, body):
        return {"rank": self.tp_rank, "version": self.version, "epoch": self.epoch, "pid": os.getpid()}

    def _register(self, q, entry):
        v = int(entry["version"])
        with self._lock:
            cur = self._manifest["version"] if self._manifest else None
            if cur is not None and v < cur:
                raise HTTPStatus(409, {"error": f"version {v} is older than the published {cur}"})
            self._pending.setdefault(v, {})[int(entry["rank"])] = entry
            ranks = self._pending[v]
            if len(ranks) == self.tp_size:
                first = ranks[0]
                merged = merge_descriptors(_descs(ranks[r]) for r in sorted(ranks))
                tensors = [d.to_json() for d in merged.values()]
                layout_id = hashlib.sha1(json.dumps(
                    [first["naming"], first["model_config"], tensors], sort_keys=True, default=str
                ).encode()).hexdigest()
                self._manifest = {
                    "version": v, "naming": first["naming"], "model_config": first["model_config"],
                    "tp_size": self.tp_size, "layout_id": layout_id,
                    "tensors": tensors,
                    "sources": {str(r): dict(ranks[r]["address"], epoch=ranks[r]["epoch"]) for r in ranks},
                }
                for old in [k for k in self._pending if k <= v]:
                    del self._pending[old]
        return {"ok": True}

    def _get_manifest(self, q, body):
        with self._lock:
            m = self._manifest
        cur = m["version"] if m else None
        if "version" in q:
            want = int(q["version"])
            if cur is None or want > cur:
                raise HTTPStatus(404, {"error": f"version {want} not published yet", "current": cur})
            if want < cur:
                raise HTTPStatus(410, {"error": f"version {want} was replaced by {cur}", "current": cur})
        elif m is None:
            raise HTTPStatus(404, {"error": "nothing published yet", "current": None})
        if q.get("layout") == m["layout_id"]:  # the receiver already holds this layout
            return {k: v for k, v in m.items() if k not in ("tensors", "model_config")}
        return m

    # ------------------------------------------------------------------ lifecycle
    @property
    def arena(self) -> Arena | None:
        return self._arena

    def close(self) -> None:
        """Stop serving and free the arena (receivers that still pull get PublisherGoneError)."""
        try:
            self._server.close()
        except Exception:  # noqa: BLE001
            pass
        self._dist.close()
        for x in self._extra.values():
            x.close()
        self._extra.clear()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
        self._state_block.close()  # drops the liveness lock: cached receivers see "gone"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _descs(entry: dict):
    from dynamo_rl.refit.roles import TensorDescriptor

    return [TensorDescriptor.from_json(d) for d in entry["tensors"]]
