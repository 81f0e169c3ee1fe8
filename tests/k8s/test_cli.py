"""``dynamo-rl k8s`` commands through typer's runner: dry runs print valid YAML, errors
exit 2 naming the input, CRD problems exit 1 with a hint, `run` exits with the driver's
code, `status` resolves the suffixed RayJob cluster — against the emulator via a kubeconfig."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dynamo_rl.k8s.cli import app

from .operators import DynamoOperator, KubeRayOperator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "k8s"
INFRA, RECIPE = str(EXAMPLES / "infra.yaml"), str(EXAMPLES / "recipe.yaml")


@pytest.fixture
def runner():
    return CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture
def kubeconfig(emu, tmp_path):
    p = tmp_path / "kubeconfig"
    p.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u", "namespace": "default"}}],
    }))
    return str(p)


def test_render_up_dry_run_is_yaml(runner):
    r = runner.invoke(app, ["up", INFRA, "--dry-run"])
    assert r.exit_code == 0, r.output
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert [d["kind"] for d in docs] == ["RayCluster", "DynamoGraphDeployment"]
    assert "ownerReference to RayCluster dynamo-rl-train at apply time" in r.stdout


def test_run_dry_run_prints_rayjob_and_stamped_recipe(runner):
    r = runner.invoke(app, ["run", INFRA, RECIPE, "--rayjob", "--dry-run", "grpo.num_steps=3"])
    assert r.exit_code == 0, r.output
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    # only Kubernetes objects: the output pipes into `kubectl apply -f -` (QA 6)
    assert [d.get("kind") for d in docs] == ["DynamoGraphDeployment", "RayJob"]
    assert docs[1]["spec"]["entrypoint"].endswith("grpo.num_steps=3")
    # the recipe is shown as comment lines, stamped and with the command-line overrides applied
    lines = r.stdout[r.stdout.index("# the recipe the trainer runs"):].splitlines()
    recipe = yaml.safe_load("\n".join(line[2:] for line in lines[1:] if line.startswith("# ")))
    assert recipe["generation"]["dynamo"]["dgd_name"] == "dynamo-rl-tiny" and recipe["grpo"]["num_steps"] == 3
    r = runner.invoke(app, ["render", INFRA, "--recipe", RECIPE, "--raycluster", "-n", "team-a"])
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert [d["kind"] for d in docs] == ["RayCluster", "DynamoGraphDeployment"]
    assert {d["metadata"]["namespace"] for d in docs} == {"team-a"}


def test_both_modes_is_a_usage_error(runner):
    r = runner.invoke(app, ["run", INFRA, RECIPE, "--rayjob", "--raycluster", "--dry-run"])
    assert r.exit_code == 2 and "at most one of --raycluster / --rayjob" in r.output


def test_bad_infra_exits_2_naming_the_key(runner, tmp_path):
    p = tmp_path / "infra.yaml"
    p.write_text("namespace: x\nkuberay: {training: {name: t, spec: {}, replicas: 2}}\n")
    r = runner.invoke(app, ["check", str(p), "--offline"])
    assert r.exit_code == 2 and "kuberay.training.replicas: unknown key" in r.output


def test_bad_namespace_and_kubeconfig_are_named(runner, tmp_path):
    r = runner.invoke(app, ["render", INFRA, "-n", "Bad_NS!"])
    assert r.exit_code == 2 and "--namespace: 'Bad_NS!' is not a Kubernetes namespace name (RFC 1123" in r.output
    p = tmp_path / "infra.yaml"
    p.write_text(Path(INFRA).read_text().replace("namespace: default", "namespace: Team_A"))
    r = runner.invoke(app, ["check", str(p), "--offline"])
    assert r.exit_code == 2 and "namespace: 'Team_A' is not a Kubernetes namespace name" in " ".join(r.output.split())
    r = runner.invoke(app, ["status", INFRA, "--kubeconfig", str(tmp_path / "nope")])
    assert r.exit_code == 1, r.output  # as every failure to reach a cluster
    assert f"--kubeconfig '{tmp_path / 'nope'}' does not exist; give the path of a kubeconfig file" in r.output


def test_every_object_with_placeholders_is_reported_at_once_with_its_own_fix(runner, tmp_path):
    import shutil

    shutil.copy(EXAMPLES / "tiny.dgd.yaml", tmp_path / "tiny.dgd.yaml")
    text = Path(INFRA).read_text().replace('rayVersion: "2.52.0"', 'rayVersion: "${RAY_VERSION}"')
    (tmp_path / "infra.yaml").write_text(text + "\n" + "deployments:\n  sandbox:\n    name: ${user:}-sb\n"
                                         "    spec: {selector: {}, template: {}}\n")
    dgd = (tmp_path / "tiny.dgd.yaml").read_text()
    (tmp_path / "tiny.dgd.yaml").write_text(dgd.replace("name: dynamo-rl-tiny", "name: ${user:}-tiny", 1))
    r = runner.invoke(app, ["check", str(tmp_path / "infra.yaml"), "--offline"])
    out = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert "kuberay.training: unresolved placeholder(s)" in out and "spec.rayVersion = '${RAY_VERSION}'" in out
    assert "anything else in `kuberay.training.spec`" in out
    assert "deployments.sandbox.name (the infra file) = '${user:}-sb'" in out
    assert "anything else in `deployments.sandbox.spec`" in out
    assert "metadata.name = '${user:}-tiny'" in out and "via `overrides` or the manifest" in out


def test_rayjob_mode_reports_cluster_and_dgd_placeholders_together(runner, tmp_path):
    import shutil

    shutil.copy(EXAMPLES / "tiny.dgd.yaml", tmp_path / "tiny.dgd.yaml")
    (tmp_path / "infra.yaml").write_text(Path(INFRA).read_text().replace("name: dynamo-rl-train", "name: ${user:}-train"))
    dgd = (tmp_path / "tiny.dgd.yaml").read_text()
    (tmp_path / "tiny.dgd.yaml").write_text(dgd.replace("name: dynamo-rl-tiny", "name: ${user:}-tiny", 1))
    r = runner.invoke(app, ["render", str(tmp_path / "infra.yaml"), "--recipe", RECIPE, "--rayjob"])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "metadata.name = '${user:}-tiny'" in out
    assert "kuberay.training.name (the infra file) = '${user:}-train'" in out


def test_check_warns_about_a_rayjob_setting_when_run_uses_a_raycluster(runner, tmp_path):
    import shutil

    shutil.copy(EXAMPLES / "tiny.dgd.yaml", tmp_path / "tiny.dgd.yaml")
    data = yaml.safe_load(Path(INFRA).read_text())
    data["launch"].update(mode="raycluster", rayJob={"clusterSelector": {"ray.io/cluster": "old"}})
    (tmp_path / "infra.yaml").write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["check", str(tmp_path / "infra.yaml"), "--offline"])
    out = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "`run --rayjob` would fail (launch.mode is raycluster, so `run` is fine)" in out


@pytest.mark.parametrize("labels, message", [
    ({"bad label!": "x"}, "labels: label key 'bad label!' is not valid: an optional DNS-subdomain prefix and '/'"),
    ({"app.kubernetes.io/part-of": "dynamo rl"}, "labels: label app.kubernetes.io/part-of='dynamo rl': the value"),
])
def test_bad_labels_are_refused_offline_with_the_whole_message(runner, tmp_path, labels, message):
    data = yaml.safe_load(Path(INFRA).read_text())
    data["kuberay"]["training"]["labels"] = labels
    (tmp_path / "infra.yaml").write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["check", str(tmp_path / "infra.yaml"), "--offline"])
    assert r.exit_code == 2 and "kuberay.training." + message in " ".join(r.output.split()), r.output


def test_errors_are_printed_verbatim_not_as_rich_markup(runner, tmp_path):
    import shutil

    shutil.copy(EXAMPLES / "tiny.dgd.yaml", tmp_path / "tiny.dgd.yaml")
    data = yaml.safe_load(Path(INFRA).read_text())
    data["dynamo"]["serving"]["select"] = "[bold]x[/bold]"
    (tmp_path / "infra.yaml").write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["check", str(tmp_path / "infra.yaml"), "--offline"])
    assert r.exit_code == 2 and "`select: [bold]x[/bold]` matches no" in r.output, r.output


def test_check_offline_and_online(runner, emu, kubeconfig):
    r = runner.invoke(app, ["check", INFRA, "--offline"])
    assert r.exit_code == 0, r.output
    for s in ("dynamo-rl-train", "Frontend", "Worker", "model tiny, port 8000, readyTimeoutS 900", "submissionGraceS 120"):
        assert s in r.stdout, s   # the report goes to stdout: `> file` keeps it
    r = runner.invoke(app, ["check", INFRA, "--kubeconfig", kubeconfig])
    assert r.exit_code == 0, r.output
    assert "dynamographdeployments.nvidia.com/v1alpha1" in r.output and "CRDs installed" in r.output
    emu.missing_crds.add("dynamographdeployments")
    r = runner.invoke(app, ["check", INFRA, "--kubeconfig", kubeconfig])
    assert r.exit_code == 1 and "install the NVIDIA Dynamo Kubernetes platform" in r.output


def test_run_exits_with_the_driver_code_then_status_and_down(runner, emu, kubeconfig):
    DynamoOperator(emu, model="tiny")
    KubeRayOperator(emu, result="FAILED", exit_code=3)
    r = runner.invoke(app, ["run", INFRA, RECIPE, "--raycluster", "--kubeconfig", kubeconfig, "--poll-s", "0.005"])
    assert r.exit_code == 3, r.output
    assert "driver failed" in r.output and "dynamo-rl-tiny ready" in r.output
    r = runner.invoke(app, ["status", INFRA, "--kubeconfig", kubeconfig])
    assert r.exit_code == 0, r.output
    assert "state=successful" in r.stdout and "owner=dynamo-rl-train" in r.stdout
    r = runner.invoke(app, ["down", INFRA, "--kubeconfig", kubeconfig, "--poll-s", "0.005"])
    assert r.exit_code == 0 and "2 object(s) deleted" in r.output
    assert emu.objects == {}


def test_status_resolves_the_suffixed_rayjob_cluster(runner, emu, kubeconfig):
    DynamoOperator(emu, model="tiny")
    KubeRayOperator(emu)
    r = runner.invoke(app, ["run", INFRA, RECIPE, "--rayjob", "--no-wait", "--kubeconfig", kubeconfig, "--poll-s", "0.005"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["status", INFRA, "--kubeconfig", kubeconfig])
    assert "dynamo-rl-train-x7k2p" in r.stdout and "owner=dynamo-rl-train-x7k2p" in r.stdout


def test_up_failure_exits_1(runner, emu, kubeconfig):
    from .emulator import Fault

    KubeRayOperator(emu)
    emu.faults.append(Fault("POST", "dynamographdeployments", 403))
    r = runner.invoke(app, ["up", INFRA, "--kubeconfig", kubeconfig, "--poll-s", "0.005"])
    assert r.exit_code == 1 and "lacks RBAC permission" in r.output and "rollback: deleted RayCluster/dynamo-rl-train" in r.output


@pytest.mark.parametrize("cmd, msg", [
    (["run", INFRA, RECIPE, "--rayjob", "--dry-run", "grpo.num_stepz=20"],
     "error: override 'grpo.num_stepz=20': grpo.num_stepz: unknown key; did you mean 'grpo.num_steps'?"),
    (["run", INFRA, RECIPE, "--raycluster", "--dry-run", "grpo.num_steps=many"],
     "error: override 'grpo.num_steps=many': grpo.num_steps: "),
    (["run", INFRA, RECIPE, "--dry-run", "generation.dynamo.model=qwen"],
     "error: {recipe}: generation.dynamo.model is 'qwen' but dynamo.serving.servedModelName (the model DGD "
     "dynamo-rl-tiny serves) is 'tiny'"),
    (["render", INFRA, "--recipe", "{bad}", "--rayjob"], "error: {bad}: grpo.num_stepz: unknown key"),
    (["check", INFRA, "--recipe", "{bad}", "--offline"], "error: {bad}: grpo.num_stepz: unknown key"),
    (["run", INFRA, "missing.yaml", "--dry-run"], "error: recipe 'missing.yaml' not found"),
])
def test_recipe_and_overrides_are_validated_like_train(runner, tmp_path, cmd, msg):
    """QA 4: the recipe + trailing overrides are validated with dynamo_rl.config before
    anything is rendered or sent; the message is the one `dynamo-rl train` prints; exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(RECIPE).read_text().replace("num_steps:", "num_stepz:"))
    r = runner.invoke(app, [c.format(bad=bad) for c in cmd])
    assert r.exit_code == 2, r.output
    assert msg.format(recipe=RECIPE, bad=bad) in " ".join(r.output.split()), r.output
    assert "apiVersion" not in r.stdout


def test_train_prints_the_same_recipe_error(tmp_path):
    from dynamo_rl.config import ConfigError, load_recipe
    from dynamo_rl.k8s.errors import RecipeError
    from dynamo_rl.k8s.orchestrate import validate_recipe

    with pytest.raises(ConfigError) as want:
        load_recipe(RECIPE, ["grpo.num_stepz=20"])
    with pytest.raises(RecipeError) as got:
        validate_recipe(yaml.safe_load(Path(RECIPE).read_text()), ["grpo.num_stepz=20"], RECIPE)
    assert str(got.value) == str(want.value)


def test_help_and_hints(runner, tmp_path, monkeypatch):
    """QA 7: `check` without a kubeconfig suggests --offline; --wait and the default mode are documented."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    r = runner.invoke(app, ["check", INFRA])
    assert r.exit_code == 1 and "check --offline" in r.output, r.output
    r = runner.invoke(app, ["down", "--help"])
    assert "wait until every deleted object is gone" in " ".join(r.output.split())
    r = runner.invoke(app, ["run", "--help"])
    out = " ".join(r.output.split())
    assert "launch.mode (default: rayjob)" in out and "follow the driver to its end" in out
    bad = tmp_path / "i.yaml"
    bad.write_text("namespace: x\nnamspace: y\n")
    r = runner.invoke(app, ["check", str(bad), "--offline"])
    assert r.exit_code == 2 and "examples/k8s/infra.yaml" in r.output and "dynamo_rl.k8s.schema" not in r.output
