"""Transports of the weight plane, behind one small interface.

Publisher side: every source rank keeps its local shards in an :class:`Arena` — a few
flat byte buckets (default 256 MiB) allocated once and reused across versions while the
tensor layout stays the same (CPU: POSIX shared memory; CUDA: device memory exported by
CUDA IPC handles). Each transport serves that arena:

* ``shm``  — same host. CPU: ``multiprocessing.shared_memory`` segments mapped by the
  receiver; CUDA: IPC handles (``torch.multiprocessing.reductions``) opened once and cached.
  The receiver copies each needed (possibly strided) slice straight into its destination
  tensor: one copy per byte, no over-pull.
* ``dist`` — ``torch.distributed`` point-to-point (gloo on CPU, NCCL on CUDA) over a private
  2-process group per (publisher rank, receiver), formed once and reused. Moves whole rows
  of source shards in bucket-sized messages.
* ``nixl`` — optional (``pip install --no-deps nixl-cu13==1.5.1``): one-sided READs of the
  registered arena over UCX; import-guarded (TransportError naming the install otherwise).

Receiver side: ``Reader.pull(plan, ...)`` fills the destination tensors.
"""

from dynamo_rl.refit.transport.base import Arena, Reader, get_reader

__all__ = ["Arena", "Reader", "get_reader"]
