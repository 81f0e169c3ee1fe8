"""The scheduler alone (no engine, no torch): admission within the prefill budget, prefix
reuse, least-recently-used slots, finish reasons, releasing."""

import subprocess
import sys

from dynamo_rl.serving.engine_types import SamplingParams
from dynamo_rl.serving.scheduler import Request, Scheduler, common_prefix


def make(slots=3, budget=8192, **kw):
    counters = {"prompt_tokens": 0, "prefix_cache_hit_tokens": 0}
    return Scheduler(slots, max_seq_len=32, max_prefill_tokens=budget, prefill_chunk=2048, prefix_caching=True,
                     counters=counters, **kw), counters


def req(name, prompt, **params):
    return Request(name, list(prompt), SamplingParams(**params), frozenset({2}))


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([5], [1]) == 0
    assert common_prefix(list(range(1000)), list(range(777)) + [0]) == 777


def test_admission_is_fifo_within_free_slots_and_the_prefill_budget():
    sched, counters = make(slots=3, budget=12)
    a, b, c, d = req("a", [1, 4, 5, 6]), req("b", [1, 7, 8, 9, 10, 11]), req("c", [1, 3]), req("d", [1, 5])
    sched.waiting.extend([a, b, c, d])
    # a (4 wide) fits; a + b: 2 rows x 6 = 12 fits; + c: 3 x 6 = 18 > 12
    assert sched.admit() == [a, b]
    assert [a.slot, b.slot] == [0, 1] and list(sched.waiting) == [c, d]
    assert counters == {"prompt_tokens": 10, "prefix_cache_hit_tokens": 0}
    assert sched.admit() == [c]  # one slot left
    assert not sched.has_free_slot() and sched.running() == [a, b, c]


def test_a_prompt_gets_the_free_slot_holding_its_longest_prefix_else_the_least_recently_used():
    sched, counters = make(slots=3)
    first = [req(str(i), [1, 10 + i, 20 + i]) for i in range(3)]
    sched.waiting.extend(first)
    sched.admit()
    for r in first:  # each slot now holds its prompt and one generated token
        sched.tick()
        sched.record(r, list(r.prompt), 99)
        sched.release(r)
    assert sched.cached_tokens() == 9 and sched.running() == []
    turn2 = req("turn2", [1, 11, 21, 99, 40])  # extends what slot 1 holds
    sched.waiting.append(turn2)
    assert sched.admit() == [turn2]
    assert turn2.slot == 1 and sched.start_of(turn2) == 3 and counters["prefix_cache_hit_tokens"] == 3
    other = req("other", [3, 50, 51])  # no prefix: the least recently used free slot (slot 0)
    sched.waiting.append(other)
    assert sched.admit() == [other] and other.slot == 0 and sched.start_of(other) == 0
    assert sched.drop_cached() == 3  # slot 2's tokens; slots 0 and 1 are in use
    assert sched.cached_tokens() == 3


def test_finish_reasons_and_release():
    sched, _ = make()
    r = req("r", [1, 2, 3], max_tokens=4)
    assert sched.finish_reason(r, 5, generated=3) is None
    assert sched.finish_reason(r, 2, generated=1) == "stop"
    assert sched.finish_reason(r, 5, generated=4) == "length"
    assert sched.finish_reason(r, 5, generated=29) == "length"  # 3 + 29 = max_seq_len 32
    r.abort_requested = True
    assert sched.finish_reason(r, 2, generated=1) == "abort"
    waiting = req("w", [1, 4])
    sched.waiting.append(waiting)
    sched.release(waiting)  # never admitted: it leaves the queue
    assert waiting.done and not sched.waiting


def test_the_scheduler_imports_neither_torch_nor_asyncio():
    code = "import sys, dynamo_rl.serving.scheduler; print(sorted({'torch', 'asyncio'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
