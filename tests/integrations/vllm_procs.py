"""A trainer in a process of its own, for the vLLM refit tests (spawned; torch threads 1).

``trainer_main(conn, naming, S, rank, coordinator_url)`` owns one TP rank's Publisher.
Commands: ``("publish", version, seed, ref_file)``: build the tiny Qwen3 of ``seed``
(``TinyModelSpec(seed=seed)``), publish this rank's shard of it (``naming`` ``"hf"``: the
whole state dict when S = 1; ``"megatron"``: Megatron-Core TP shards, fused QKV / gate-up,
vocabulary padded), rank 0 also writes the full HF tensors to ``ref_file`` (the reference
the test compares the workers with) → ``("ok",)``; ``("exit",)`` → ``("bye",)``.
"""

from __future__ import annotations

import os
import traceback

import torch


def trainer_main(conn, naming, S, rank, coordinator_url):
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from dynamo_rl.models import TinyModelSpec, build_tiny_model
    from dynamo_rl.refit import Publisher
    from dynamo_rl.refit.megatron import hf_to_megatron

    pub = Publisher(tp_rank=rank, tp_size=S, coordinator_url=coordinator_url)
    conn.send(("url", pub.url, os.getpid()))
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "publish":
                _, version, seed, ref_file = msg
                model = build_tiny_model(TinyModelSpec(seed=seed))
                cfg = model.config.to_dict()
                hf = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
                if naming == "megatron":
                    shards = hf_to_megatron(hf, cfg, S, pad_value=9.0)[rank]
                else:
                    assert S == 1, "HF naming here publishes the whole model from one rank"
                    shards = hf
                pub.publish(version, shards, naming=naming, model_config=cfg)
                if rank == 0 and ref_file:
                    save_file({k: v.contiguous() for k, v in hf.items()}, ref_file)
                conn.send(("ok",))
            elif msg[0] == "exit":
                pub.close()
                conn.send(("bye",))
                return
        except Exception as e:  # noqa: BLE001
            conn.send(("err", type(e).__name__, f"{e}\n{traceback.format_exc()}"))
