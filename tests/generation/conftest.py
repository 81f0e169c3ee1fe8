"""Fixtures of the generation tests: the real local Dynamo stack (frontend + our workers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamo_rl.config import DynamoConfig, GenerationConfig


def gen_config(url: str, **kw) -> GenerationConfig:
    """A GenerationConfig pointing at ``url`` (tests' defaults: 10 s retry deadline)."""
    kw.setdefault("retry_deadline_s", 10.0)
    kw.setdefault("request_timeout_s", 60.0)
    return GenerationConfig(dynamo=DynamoConfig(frontend_url=url), **kw)


def read_records(stack, workers=None) -> dict[str, dict]:
    """Every worker's ``--record-file`` lines by ``request_id`` (``workers`` default: the
    stack's live ones); each record gets ``"_instance_id"`` (the worker that wrote it).
    Duplicated request ids are an error."""
    out: dict[str, dict] = {}
    for w in stack.workers if workers is None else workers:
        path = Path(w.record_file)
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            assert rec["request_id"] not in out, f"request {rec['request_id']} recorded twice"
            rec["_instance_id"] = str(w.instance_id)
            out[rec["request_id"]] = rec
    return out


def record_of(records: dict[str, dict], sample) -> dict:
    """The worker's record of ``sample`` (response id ``cmpl-<uuid>`` ↔ record ``<uuid>``)."""
    rid = sample.request_id.split("-", 1)[1]
    assert rid in records, f"no worker record for {sample.request_id}"
    return records[rid]


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    """The tiny model behind the real Dynamo frontend, 2 workers, requests recorded."""
    from dynamo_rl.serving.stack import LocalStack

    with LocalStack(tiny_model_dir, workers=2, record=True, quiet=True,
                    run_dir=tmp_path_factory.mktemp("gen-stack")) as st:
        yield st


@pytest.fixture(scope="module")
def drift_model_dir(tmp_path_factory) -> Path:
    """Tiny Qwen3 + BPE tokenizer + a template that drops past <think> blocks, trained to
    answer ``<think> h m </think> he llo <|im_end|>`` (see drift_model.py)."""
    from .drift_model import build

    return build(tmp_path_factory.mktemp("models") / "drift")


@pytest.fixture(scope="module")
def drift_stack(drift_model_dir, tmp_path_factory):
    from dynamo_rl.serving.stack import LocalStack

    with LocalStack(drift_model_dir, served_model_name="drift", workers=1, record=True, quiet=True,
                    run_dir=tmp_path_factory.mktemp("drift-stack")) as st:
        yield st
