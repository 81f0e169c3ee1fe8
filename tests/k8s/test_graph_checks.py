"""Checks made before anything is sent (issue 18, defects 2, 3, 4 and 8), through the CLI:
each bad infra exits 2 from `check --offline` and `run --dry-run`, naming the graph or key
and the fix; nothing waits for readyTimeoutS to find it out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dynamo_rl.k8s.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "k8s"
RECIPE = str(EXAMPLES / "recipe.yaml")


@pytest.fixture
def runner():
    return CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def _infra(tmp_path: Path, dynamo: dict, launch: dict | None = None) -> str:
    """examples/k8s/infra.yaml with its `dynamo` section (and `launch` keys) replaced."""
    for f in ("tiny.dgd.yaml", "vllm.dgd.yaml"):
        shutil.copy(EXAMPLES / f, tmp_path / f)
    infra = yaml.safe_load((EXAMPLES / "infra.yaml").read_text())
    infra["dynamo"] = dynamo
    infra["launch"].update(launch or {})
    path = tmp_path / "infra.yaml"
    path.write_text(yaml.safe_dump(infra, sort_keys=False))
    return str(path)


def _both(runner, infra: str):
    check = runner.invoke(app, ["check", infra, "--offline"])
    run = runner.invoke(app, ["run", infra, RECIPE, "--rayjob", "--dry-run"])
    return check, run


def test_several_dgds_need_launch_policy_graph(runner, tmp_path):
    dynamo = {"serving": {"manifest": "tiny.dgd.yaml", "servedModelName": "tiny"},
              "vllm": {"manifest": "vllm.dgd.yaml", "servedModelName": "tiny"},
              "judge": {"manifest": "tiny.dgd.yaml", "name": "judge", "servedModelName": "tiny"}}
    for r in _both(runner, _infra(tmp_path, dynamo)):
        assert r.exit_code == 2, r.output
        assert "declares 3 DGDs (dynamo.serving, dynamo.vllm, dynamo.judge)" in r.output
        assert "launch:\n    policyGraph: serving" in r.output
    # named: the recipe is stamped with that DGD
    r = runner.invoke(app, ["run", _infra(tmp_path, dynamo, {"policyGraph": "vllm"}), RECIPE, "--rayjob",
                            "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = r.stdout[r.stdout.index("# the stamped recipe the trainer runs"):].splitlines()
    recipe = yaml.safe_load("\n".join(line[2:] for line in lines[1:] if line.startswith("# ")))
    assert recipe["generation"]["dynamo"]["dgd_name"] == "dynamo-rl-vllm"
    # a key that is not declared is named
    r = runner.invoke(app, ["check", _infra(tmp_path, dynamo, {"policyGraph": "servng"}), "--offline"])
    assert r.exit_code == 2 and "launch.policyGraph is 'servng' but the file declares no dynamo.servng" in r.output


def test_a_frontend_url_override_is_blamed_for_what_it_is(runner, tmp_path):
    infra = _infra(tmp_path, {"serving": {"manifest": "tiny.dgd.yaml", "servedModelName": "tiny"}})
    r = runner.invoke(app, ["run", infra, RECIPE, "--rayjob", "--dry-run",
                            "generation.dynamo.frontend_url=http://10.0.0.1:8000"])
    assert r.exit_code == 2, r.output
    assert "points the trainer at DGD dynamo-rl-tiny itself" in r.output and "drop this override" in r.output
    assert "not both" not in r.output


def test_a_graph_without_frontend_or_worker_is_refused(runner, tmp_path):
    dgd = yaml.safe_load((EXAMPLES / "tiny.dgd.yaml").read_text())
    workers_only = {**dgd, "metadata": {"name": "workers-only"},
                    "spec": {"services": {"Worker": dgd["spec"]["services"]["Worker"]}}}
    frontend_only = {**dgd, "metadata": {"name": "frontend-only"},
                     "spec": {"services": {"Frontend": dgd["spec"]["services"]["Frontend"]}}}
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump_all([workers_only, frontend_only]))
    for select, lacks in (("workers-only", "has no Frontend"), ("frontend-only", "has no worker")):
        infra = _infra(tmp_path, {"serving": {"manifest": "multi.yaml", "select": select, "servedModelName": "tiny"}})
        for r in _both(runner, infra):
            assert r.exit_code == 2, r.output
            assert f"dynamo.serving: DGD {select} {lacks}" in r.output, r.output


def test_served_model_name_must_match_the_workers_args(runner, tmp_path):
    infra = _infra(tmp_path, {"serving": {"manifest": "vllm.dgd.yaml", "servedModelName": "Qwen/Qwen3-0.6B"}})
    for r in _both(runner, infra):
        assert r.exit_code == 2, r.output
        assert "dynamo.serving.servedModelName is 'Qwen/Qwen3-0.6B' but the DGD's workers serve 'tiny'" in r.output


def test_v1alpha1_overrides_on_a_v1beta1_graph_say_how_to_write_them(runner, tmp_path, shared_dir):
    shutil.copy(shared_dir / "cases" / "dgd" / "v1beta1_examples-vllm_agg.yaml", tmp_path / "beta.yaml")
    infra = _infra(tmp_path, {"serving": {"manifest": "beta.yaml",
                                          "overrides": {"services": {"VllmDecodeWorker": {"replicas": 3}}}}})
    r = runner.invoke(app, ["check", infra, "--offline"])
    assert r.exit_code == 2, r.output
    assert "is a nvidia.com/v1beta1 DGD, whose spec lists `components`" in r.output
    assert "{components: {VllmDecodeWorker: {replicas: 3}}}" in r.output
    assert "'services' was unexpected" not in r.output
    fixed = _infra(tmp_path, {"serving": {"manifest": "beta.yaml",
                                          "overrides": {"components": {"VllmDecodeWorker": {"replicas": 3}}}}})
    assert runner.invoke(app, ["check", fixed, "--offline"]).exit_code == 0


def test_the_vllm_example_validates(runner):
    r = runner.invoke(app, ["check", str(EXAMPLES / "infra-vllm.yaml"), "--offline"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["run", str(EXAMPLES / "infra-vllm.yaml"), RECIPE, "--rayjob", "--dry-run"])
    assert r.exit_code == 0, r.output
    dgd = next(d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "DynamoGraphDeployment")
    worker = dgd["spec"]["services"]["VllmWorker"]
    assert worker["extraPodSpec"]["mainContainer"]["command"] == ["python3", "-m", "dynamo.vllm"]
    args = worker["extraPodSpec"]["mainContainer"]["args"]
    assert "--enable-rl" in args
    assert args[args.index("--worker-extension-cls") + 1] == "dynamo_rl.integrations.vllm.RefitWorkerExtension"
