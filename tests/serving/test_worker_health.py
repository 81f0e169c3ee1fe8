"""The worker's health watch on a real engine and a real refit publisher/receiver (in
process; the Dynamo runtime's ``set_health_status`` / ``shutdown`` are the two callbacks).

A pull torn by the publisher part-way leaves partial weights: not ready until a complete
load. A scheduling loop that dies is fatal once, even if a request restarted it before the
next check."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dynamo_rl.models import build_tiny_model
from dynamo_rl.models.tiny import TinyModelSpec
from dynamo_rl.refit import Publisher, Receiver, StaleVersionError
from dynamo_rl.serving.engine import Engine, PartialWeightsError, SamplingParams
from dynamo_rl.serving.worker import Worker

EOS = 2
INTERVAL = 0.01


async def until(cond, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(INTERVAL)


@pytest.mark.asyncio
async def test_partial_weights_are_not_ready_and_a_dead_loop_is_fatal():
    torch.set_num_threads(1)
    engine = Engine(build_tiny_model(), eos_token_ids=[EOS], max_batch_size=4)
    await engine.start()
    worker = Worker(engine, served_model_name="tiny", model_path="-", message_eos_id=None)
    ready: list[bool] = []
    fatal: list[str] = []
    watch = asyncio.create_task(worker.watch_health(ready.append, fatal.append, interval_s=INTERVAL))
    sd = {n: t.clone() for n, t in build_tiny_model(TinyModelSpec(seed=1)).state_dict().items()
          if n in engine.param_specs()}
    cfg = engine.model.config.to_dict()
    greedy = SamplingParams(max_tokens=4, temperature=0)
    try:
        await until(lambda: ready == [True], "ready")
        assert (await worker.info({}))["ready"] is True and (await worker.info({}))["unhealthy"] is None
        with Publisher() as pub, Receiver.for_engine(engine) as recv:
            pub.publish(1, sd, model_config=cfg)
            await engine.load_weights(recv.pull(pub.url, 1)[0], 1, adopt=True)
            pub.publish(2, sd, model_config=cfg)

            def torn(params):  # the trainer overwrites version 2 with 3 during the copy
                def progress(done, total):
                    if pub.version == 2:
                        pub.publish(3, sd, model_config=cfg)
                return recv.pull(pub.url, 2, into=params, progress=progress)

            with pytest.raises(StaleVersionError):
                await engine.load_weights_in_place(torn, 2)
            await until(lambda: ready == [True, False], "not ready")
            state = await worker.info({})
            assert state["ready"] is False and state["unhealthy"].startswith("the in-place load of weights version 2 failed part-way")
            with pytest.raises(PartialWeightsError):
                await engine.complete([1, 10, 11], greedy)
            # the served version (1) again, through the worker's route: a reload, not a no-op
            with Publisher() as again:
                again.publish(1, sd, model_config=cfg)
                res = await worker.update_weights_from_distributed(
                    {"engine_rpc": "dynamo_rl_update_weights", "weight_version": 1, "publisher": again.url,
                     "allow_unpaused": True, "reset_prefix_cache": False})
            assert "noop" not in res and res["version"] == 1 and res["tensors"] == len(sd), res
            await until(lambda: ready == [True, False, True], "ready again")
            assert (await worker.info({}))["unhealthy"] is None and fatal == []
            assert engine.weights_version == 1 and len(await engine.complete([1, 10, 11], greedy)) == 4

        # the loop dies (cancelled from outside stop()); a request restarts it at once, but
        # the watch counted the death: fatal, reported once
        engine._task.cancel()
        await until(lambda: engine.loop_died is not None, "the loop's death")
        assert engine.loop_died == "the scheduling loop died: CancelledError: "
        assert engine.unhealthy == engine.loop_died
        outs = await engine.complete([1, 10, 11], greedy)  # restarted: the engine itself recovers
        assert len(outs) == 4 and engine.loop_died is None and engine.stats["loop_deaths"] == 1
        await until(lambda: fatal, "fatal")
        assert len(fatal) == 1 and fatal[0] in ("the scheduling loop died (restarted since)",
                                                "the scheduling loop died: CancelledError: ")
        assert ready[-1] is False
        assert watch.done() and (await worker.info({}))["ready"] is False
    finally:
        watch.cancel()
        worker.close()
        await engine.stop()


@pytest.mark.asyncio
async def test_a_bad_interval_is_refused():
    worker = Worker(Engine(build_tiny_model(), eos_token_ids=[EOS]), served_model_name="tiny", model_path="-",
                    message_eos_id=None)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive, finite number of seconds"):
            await worker.watch_health(print, print, interval_s=bad)
