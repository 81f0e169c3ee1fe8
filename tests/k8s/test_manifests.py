"""Rendering: every real DGD file loads, renders with overrides and validates against
the CRD; wrong inputs give clear errors; defaults never overwrite what a manifest says;
owner references, recipe stamping and the driver entrypoint."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from dynamo_rl.k8s.errors import ManifestError, SchemaValidationError
from dynamo_rl.k8s.manifests import (
    dgd_components,
    driver_entrypoint,
    guess_served_model,
    owner_reference,
    render_dgd,
    render_raycluster,
    render_rayjob,
    stamp_recipe,
)
from dynamo_rl.k8s.overrides import deep_merge
from dynamo_rl.k8s.schema import parse_infra
from dynamo_rl.k8s.validate import validate_manifest

from .conftest import CASES

DGD_FILES = sorted((CASES / "dgd").glob("*.yaml")) if (CASES / "dgd").is_dir() else []
IMAGE = "nvcr.io/acme/dynamo-rl:1.0"


def infra_for(path: Path | str, **dgd) -> object:
    return parse_infra({
        "namespace": "rl",
        "image": IMAGE,
        "imagePullSecrets": ["nvcr-secret"],
        "labels": {"team": "rl"},
        "dynamo": {"g": {"manifest": str(path), **dgd}},
    })


def _overrides_for(doc: dict) -> tuple[dict, str]:
    """A realistic override: scale the first worker-like service and set its image."""
    spec = doc["spec"]
    if "services" in spec:
        name = next(n for n, s in spec["services"].items() if s.get("componentType") != "frontend")
        images = {n: {"extraPodSpec": {"mainContainer": {"image": "nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.3.1"}}}
                  for n, s in spec["services"].items()
                  if "${" in ((s.get("extraPodSpec") or {}).get("mainContainer") or {}).get("image", "")}
        return {"services": deep_merge(images, {name: {"replicas": 3}})}, name
    name = next(c["name"] for c in spec["components"] if c.get("type") != "frontend")
    return {"components": [dict(c, replicas=3) if c["name"] == name else c for c in spec["components"]]}, name


@pytest.mark.parametrize("path", DGD_FILES, ids=[p.name for p in DGD_FILES])
def test_every_case_dgd_renders_with_overrides_and_validates(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    original = next(d for d in docs if d.get("kind") == "DynamoGraphDeployment")
    overrides, svc = _overrides_for(original)
    m = render_dgd(infra_for(path, name="my-graph", overrides=overrides), "g")
    validate_manifest(m, source=path.name)
    assert m["apiVersion"] == original["apiVersion"]
    assert m["metadata"]["name"] == "my-graph" and m["metadata"]["namespace"] == "rl"
    assert m["metadata"]["labels"]["team"] == "rl" and m["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "dynamo-rl"
    comps = {c["name"]: c for c in dgd_components(m)}
    assert comps[svc]["replicas"] == 3
    for c in dgd_components(original):  # images the manifest sets are kept; only missing ones get the default
        orig = c["image"]
        assert comps[c["name"]]["image"] == (orig if orig and "${" not in orig else
                                             IMAGE if not orig else "nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.3.1")
    text = yaml.safe_dump(m)
    assert "serviceAccountName" not in text  # the operator wires its own
    assert "nvcr-secret" in text


def test_v1beta1_components_get_defaults_in_pod_templates(cases):
    m = render_dgd(infra_for(cases / "dgd/v1beta1_examples-vllm_agg.yaml"), "g")
    validate_manifest(m)
    for comp in m["spec"]["components"]:
        pod = comp["podTemplate"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "nvcr-secret"}]
        assert pod["containers"][0]["image"] == "nvcr.io/nvidia/ai-dynamo/vllm-runtime:1.3.1"  # kept
        assert "serviceAccountName" not in pod


def test_multidoc_skips_configmaps(cases):
    path = cases / "dgd/v1alpha1_recipe-gpt-oss-120b_trtllm_agg_deploy.multidoc.yaml"
    m = render_dgd(infra_for(path), "g")
    assert m["kind"] == "DynamoGraphDeployment" and m["metadata"]["name"] == "gpt-oss-agg"


def test_placeholder_image_is_rejected_until_overridden(cases):
    path = cases / "dgd/v1alpha1_examples-vllm_agg_router.yaml"
    with pytest.raises(ManifestError, match=r"(?s)vllm-runtime:\$\{VERSION\}.*overrides"):
        render_dgd(infra_for(path), "g")


def _write(tmp_path, docs, name="g.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump_all(docs))
    return p


DGD = {"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment", "metadata": {"name": "a"},
       "spec": {"services": {"Frontend": {"componentType": "frontend", "replicas": 1}}}}


def test_no_dgd_in_file(tmp_path):
    p = _write(tmp_path, [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
                          {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "p"}}])
    with pytest.raises(ManifestError, match=r"no DynamoGraphDeployment in the file \(found: \['ConfigMap', 'PersistentVolumeClaim'\]\)"):
        render_dgd(infra_for(p), "g")


@pytest.mark.parametrize("spec", [None, {}, {"services": {}}, {"components": []}, {"backendFramework": "vllm"}])
def test_a_dgd_without_services_is_refused_even_with_overrides(tmp_path, spec):
    dgd = {k: v for k, v in DGD.items() if k != "spec"}
    if spec is not None:
        dgd["spec"] = spec
    p = _write(tmp_path, [dgd])
    for overrides in ({}, {"services": {"Worker": {"replicas": 2}}}):
        with pytest.raises(ManifestError, match=r"dynamo.g \(g.yaml\): the DGD declares no services \(spec.services, "
                                                r"v1alpha1\) or components .* e.g. examples/k8s/tiny.dgd.yaml"):
            render_dgd(infra_for(p, overrides=overrides), "g")
    # overrides that delete every service
    p = _write(tmp_path, [DGD], "full.yaml")
    with pytest.raises(ManifestError, match=r"after dynamo.g.overrides, the DGD has no services"):
        render_dgd(infra_for(p, overrides={"services": {"Frontend": None}}), "g")
    inline = parse_infra({"dynamo": {"g": {"name": "inl", "spec": spec or {}}}})
    with pytest.raises(ManifestError, match=r"dynamo.g \(inline spec\): the DGD declares no services"):
        render_dgd(inline, "g")


def test_several_dgds_require_a_choice(tmp_path):
    b = dict(DGD, metadata={"name": "b"})
    p = _write(tmp_path, [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bench"}}, DGD, b])
    with pytest.raises(ManifestError, match=r"declares 2 DynamoGraphDeployments \['a', 'b'\]; choose one with `select: <name>`"):
        render_dgd(infra_for(p), "g")
    assert render_dgd(infra_for(p, select="b"), "g")["metadata"]["name"] == "b"
    with pytest.raises(ManifestError, match="`select: c` matches no"):
        render_dgd(infra_for(p, select="c"), "g")


def test_override_of_a_wrong_type(tmp_path):
    p = _write(tmp_path, [DGD])
    with pytest.raises(SchemaValidationError) as e:
        validate_manifest(render_dgd(infra_for(p, overrides={"services": {"Frontend": {"replicas": "two"}}}), "g"))
    assert "spec.services.Frontend.replicas: 'two' is not of type 'integer'" in str(e.value)
    with pytest.raises(ManifestError, match=r"dynamo.g.overrides.services: cannot replace a mapping with a list"):
        render_dgd(infra_for(p, overrides={"services": ["Frontend"]}), "g")
    with pytest.raises(ManifestError, match=r"dynamo.g.overrides.services.Frontend.replicas: cannot merge a mapping onto a int"):
        render_dgd(infra_for(p, overrides={"services": {"Frontend": {"replicas": {"min": 1}}}}), "g")


def test_override_typo_is_an_unknown_field(tmp_path):
    p = _write(tmp_path, [DGD])
    with pytest.raises(SchemaValidationError, match=r"spec.services.Frontend: Additional properties are not allowed \('replica' was unexpected\)"):
        validate_manifest(render_dgd(infra_for(p, overrides={"services": {"Frontend": {"replica": 2}}}), "g"))


def test_null_override_deletes_and_inline_spec(tmp_path):
    infra = parse_infra({"dynamo": {"g": {"name": "inl", "spec": {"services": {"Frontend": {"componentType": "frontend", "replicas": 1,
                                                                                           "envs": [{"name": "A", "value": "1"}]}}},
                                          "overrides": {"services": {"Frontend": {"envs": None}}}}}})
    m = render_dgd(infra, "g")
    assert m["apiVersion"] == "nvidia.com/v1alpha1" and "envs" not in m["spec"]["services"]["Frontend"]
    assert "image" not in yaml.safe_dump(m)  # no infra image: nothing invented


def test_dgd_labels_and_annotations_reach_its_metadata():
    infra = parse_infra({"labels": {"team": "rl"}, "annotations": {"a": "infra"},
                         "dynamo": {"g": {"name": "inl", "spec": DGD["spec"],
                                          "labels": {"run": "r1", "team": "mine"},
                                          "annotations": {"nvidia.com/kai-scheduler-queue": "q", "a": "dgd"}}}})
    md = render_dgd(infra, "g")["metadata"]
    assert md["annotations"] == {"nvidia.com/kai-scheduler-queue": "q", "a": "dgd"}  # as kuberay.<role>'s
    assert md["labels"]["run"] == "r1" and md["labels"]["team"] == "rl"  # infra-wide labels win (ownership)
    validate_manifest(render_dgd(infra, "g"))


def test_missing_name_and_unreadable_file(tmp_path):
    p = _write(tmp_path, [dict(DGD, metadata={})])
    with pytest.raises(ManifestError, match="set dynamo.g.name"):
        render_dgd(infra_for(p), "g")
    with pytest.raises(ManifestError, match="relative to the infra file"):
        render_dgd(infra_for(tmp_path / "missing.yaml"), "g")


def test_served_model_guess(cases):
    assert guess_served_model(render_dgd(infra_for(cases / "dgd/v1alpha1_examples-vllm_agg.yaml"), "g")) == "Qwen/Qwen3-0.6B"
    m = render_dgd(infra_for(cases / "dgd/v1alpha1_recipe-gpt-oss-120b_trtllm_agg_deploy.multidoc.yaml"), "g")
    assert guess_served_model(m) == "openai/gpt-oss-120b"  # --served-model-name inside a shell string
    m = render_dgd(infra_for(cases / "dgd/v1alpha1_recipe-llama-3-70b_vllm_agg_deploy.yaml"), "g")
    assert guess_served_model(m) == "RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic"  # $VAR args → SERVED_MODEL_NAME env


# ------------------------------------------------------------------ KubeRay


def _ray_spec(cases, name):
    docs = [d for d in yaml.safe_load_all((cases / "kuberay" / name).read_text()) if d]
    obj = next(d for d in docs if d.get("kind") in ("RayCluster", "RayJob"))
    return obj


@pytest.mark.parametrize("name", ["ray-cluster.sample.yaml", "ray-cluster.verl.yaml"])
def test_raycluster_samples_as_roles(cases, name):
    spec = _ray_spec(cases, name)["spec"]
    sample_image = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    infra = parse_infra({"namespace": "rl", "image": IMAGE, "imagePullSecrets": ["s"], "serviceAccount": "trainer",
                         "kuberay": {"training": {"name": "train", "spec": spec}}})
    rc = render_raycluster(infra, "training")
    validate_manifest(rc)
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "trainer" and head["imagePullSecrets"] == [{"name": "s"}]
    assert head["containers"][0]["image"] == sample_image != IMAGE  # kept, not replaced


@pytest.mark.parametrize("name", sorted(p.name for p in (CASES / "kuberay").glob("ray-job*.yaml")) if (CASES / "kuberay").is_dir() else [])
def test_rayjob_samples_validate(cases, name):
    """The validator accepts every real RayJob sample (no false positives from tightening)."""
    validate_manifest(_ray_spec(cases, name), source=name)


def test_rayjob_render_defaults_and_launch_overrides():
    infra = parse_infra({"image": IMAGE, "kuberay": {"training": {"name": "t", "spec": {"headGroupSpec": {
        "rayStartParams": {}, "template": {"spec": {"containers": [{"name": "ray-head"}]}}}}}},
        "launch": {"rayJob": {"ttlSecondsAfterFinished": 60, "shutdownAfterJobFinishes": False}}})
    job = render_rayjob(infra, "training", "echo hi")
    validate_manifest(job)
    assert job["spec"]["entrypoint"] == "echo hi" and job["spec"]["submissionMode"] == "K8sJobMode"
    assert job["spec"]["shutdownAfterJobFinishes"] is False and job["spec"]["ttlSecondsAfterFinished"] == 60
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == IMAGE


@pytest.mark.parametrize("ray_job, message", [
    ({"submissionMode": "InteractiveMode"}, "launch.rayJob.submissionMode 'InteractiveMode': dynamo-rl needs KubeRay"),
    ({"clusterSelector": {"ray.io/cluster": "old"}}, "launch.rayJob.clusterSelector: not allowed: it runs the job on an existing cluster"),
    ({"entrypoint": "python x.py"}, "launch.rayJob.entrypoint: not allowed: dynamo-rl sets it"),
    ({"suspend": True}, "launch.rayJob.suspend: true would create the RayJob without its cluster"),
])
def test_rayjob_launch_overrides_that_would_break_the_run_are_refused(ray_job, message):
    infra = parse_infra({"kuberay": {"training": {"name": "t", "spec": {"headGroupSpec": {
        "rayStartParams": {}, "template": {"spec": {"containers": [{"name": "ray-head"}]}}}}}},
        "launch": {"rayJob": ray_job}})
    with pytest.raises(ManifestError, match=re.escape(message)):
        render_rayjob(infra, "training", "echo hi")
    infra.launch.ray_job = {"submissionMode": "HTTPMode"}
    assert render_rayjob(infra, "training", "echo hi")["spec"]["submissionMode"] == "HTTPMode"


def test_owner_reference_is_non_controlling():
    rc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "train-x7k2p", "uid": "u-1"}}
    assert owner_reference(rc) == {"apiVersion": "ray.io/v1", "kind": "RayCluster", "name": "train-x7k2p", "uid": "u-1",
                                   "controller": False, "blockOwnerDeletion": False}
    with pytest.raises(ManifestError, match="no metadata.uid"):
        owner_reference({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}})


# ------------------------------------------------------------------ recipe + driver


def _dgd(name, ns="rl"):
    return {"metadata": {"name": name, "namespace": ns}}


def test_stamp_recipe_with_one_dgd():
    recipe = {"generation": {"dynamo": {"frontend_url": "http://x:8000", "model": "tiny"}}, "grpo": {"num_steps": 3}}
    out = stamp_recipe(recipe, [_dgd("g1")], {"g1": 8080})
    assert out["generation"]["backend"] == "dynamo"
    assert out["generation"]["dynamo"] == {"model": "tiny", "dgd_name": "g1", "namespace": "rl", "frontend_port": 8080}
    assert recipe["generation"]["dynamo"]["frontend_url"] == "http://x:8000"  # input untouched
    assert stamp_recipe({}, [_dgd("g1")])["generation"] == {"backend": "dynamo", "dynamo": {"dgd_name": "g1", "namespace": "rl"}}


def test_stamp_recipe_takes_one_dgd_or_none():
    r = {"grpo": {"num_steps": 1}}
    assert stamp_recipe(r, []) == r
    with pytest.raises(ValueError, match="2 DGDs given; pass the one that serves the policy"):
        stamp_recipe(r, [_dgd("a"), _dgd("b")])


def test_stamped_example_recipe_is_a_valid_recipe():
    from dynamo_rl.config import load_recipe

    root = Path(__file__).resolve().parents[2]
    recipe = yaml.safe_load((root / "examples/k8s/recipe.yaml").read_text())
    out = stamp_recipe(recipe, [_dgd("dynamo-rl-tiny", "default")])
    p = Path(__file__).parent / "_stamped_tmp.yaml"
    try:
        p.write_text(yaml.safe_dump(out))
        cfg = load_recipe(str(p), [])
    finally:
        p.unlink(missing_ok=True)
    assert cfg.generation.dynamo.dgd_name == "dynamo-rl-tiny" and cfg.generation.dynamo.is_remote


def test_driver_entrypoint_writes_recipe_and_propagates_exit_code(tmp_path):
    recipe = {"name": "x", "generation": {"dynamo": {"dgd_name": "it's \"quoted\""}}}
    target = tmp_path / "sub dir" / "recipe.yaml"
    cmd = driver_entrypoint(recipe, "sh -c 'cat \"$0\"; echo \"$@\"; exit 7'", str(target), ["grpo.num_steps=2", "a b=c"])
    assert "| tee" not in cmd
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30)
    assert r.returncode == 7
    assert yaml.safe_load(target.read_text()) == recipe
    assert r.stdout.strip().endswith("grpo.num_steps=2 a b=c")


# ------------------------------------------------------------------ QA pass: named lists, typos, placeholders


@pytest.mark.parametrize("override", [
    {"components": [{"name": "VllmDecodeWorker", "replicas": 3}]},
    {"components": {"VllmDecodeWorker": {"replicas": 3}}},
])
def test_v1beta1_component_override_merges_by_name(cases, override):
    """QA 1: a v1beta1 components override (list or mapping-by-name) merges onto the named
    component; the Frontend and the worker's type/command/GPU limits survive."""
    p = cases / "dgd/v1beta1_examples-vllm_agg.yaml"
    original = {c["name"]: c for c in yaml.safe_load(p.read_text())["spec"]["components"]}
    m = render_dgd(infra_for(p, overrides=override), "g")
    validate_manifest(m)
    comps = {c["name"]: c for c in m["spec"]["components"]}
    assert list(comps) == ["Frontend", "VllmDecodeWorker"]
    w, w0 = comps["VllmDecodeWorker"], original["VllmDecodeWorker"]
    assert w["replicas"] == 3 and w["type"] == "worker"
    c, c0 = w["podTemplate"]["spec"]["containers"][0], w0["podTemplate"]["spec"]["containers"][0]
    assert c["command"] == c0["command"] and c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert comps["Frontend"]["replicas"] == 1 and comps["Frontend"]["type"] == "frontend"


def test_v1beta1_nested_named_lists_merge_and_delete(cases):
    p = cases / "dgd/v1beta1_examples-vllm_agg.yaml"
    m = render_dgd(infra_for(p, overrides={"components": {
        "VllmDecodeWorker": {"podTemplate": {"spec": {"containers": [{"name": "main", "image": "x/y:1",
                                                                        "env": [{"name": "A", "value": "1"}]}]}}},
        "Frontend": None}}), "g")
    validate_manifest(m)
    [w] = m["spec"]["components"]
    c = w["podTemplate"]["spec"]["containers"][0]
    assert c["image"] == "x/y:1" and c["args"] == ["--model", "Qwen/Qwen3-0.6B"] and c["env"] == [{"name": "A", "value": "1"}]
    assert deep_merge({"env": [{"name": "A", "value": "1"}]}, {"env": [{"name": "B", "value": "2"}]}) == \
        {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}
    assert deep_merge({"args": ["a", "b"]}, {"args": ["c"]}) == {"args": ["c"]}  # plain lists still replace


@pytest.mark.parametrize("file, override, msg", [
    ("v1beta1_examples-vllm_agg.yaml", {"components": {"VllmDecodeWorkr": {"replicas": 3}}},
     "no component 'VllmDecodeWorkr' in {path} (components: Frontend, VllmDecodeWorker); did you mean 'VllmDecodeWorker'?"),
    ("v1beta1_examples-vllm_agg.yaml", {"components": [{"name": "Planner", "replicas": 1}]},
     "no component 'Planner' in {path} (components: Frontend, VllmDecodeWorker)"),
    ("v1beta1_examples-vllm_agg.yaml", {"components": [{"replicas": 1}]}, "every item needs a `name:`"),
    ("v1alpha1_examples-vllm_disagg_planner.yaml", {"services": {"VllmDecodeWroker": {"replicas": 2}}},
     "no service 'VllmDecodeWroker' in {path} (services: "),
])
def test_override_naming_an_unknown_service_or_component_is_an_error(cases, file, override, msg):
    """QA 1/2: a typo no longer adds a bogus service/component; the error lists what exists."""
    p = cases / "dgd" / file
    with pytest.raises(ManifestError) as e:
        render_dgd(infra_for(p, overrides=override), "g")
    assert msg.format(path=p) in str(e.value), str(e.value)
    if "Wroker" in msg:
        assert "did you mean 'VllmDecodeWorker'?" in str(e.value)


def test_every_unresolved_placeholder_is_reported_by_path(tmp_path):
    """QA 5: `${...}` anywhere (labels, env values, secret names) fails render, each by path;
    shell expansions inside container command/args stay legal; the infra `name:` is blamed."""
    dgd = {"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment",
           "metadata": {"name": "g", "labels": {"owner": "${user:}"}},
           "spec": {"services": {"W": {"componentType": "worker", "envFromSecret": "${user:}-secrets",
                                       "envs": [{"name": "HF_HOME", "value": "/ws/${oc.env:USER}/hf"}],
                                       "extraPodSpec": {"mainContainer": {
                                           "image": "a/b:1", "command": ["/bin/sh", "-c"],
                                           "args": ["python -m x --model ${MODEL_PATH} --n ${N:-1} --u ${user:}"]}}}}}}
    f = tmp_path / "g.yaml"
    f.write_text(yaml.safe_dump(dgd))
    with pytest.raises(ManifestError) as e:
        render_dgd(infra_for(f), "g")
    msg = str(e.value)
    for p in ("metadata.labels.owner = '${user:}'", "spec.services.W.envFromSecret = '${user:}-secrets'",
              "spec.services.W.envs[0].value", "spec.services.W.extraPodSpec.mainContainer.args[0]"):
        assert p in msg, msg
    dgd["metadata"]["labels"] = {}
    dgd["spec"]["services"]["W"].update(envFromSecret="s", envs=[])
    dgd["spec"]["services"]["W"]["extraPodSpec"]["mainContainer"]["args"] = ["python -m x --model ${MODEL_PATH} --n ${N:-1}"]
    f.write_text(yaml.safe_dump(dgd))
    render_dgd(infra_for(f), "g")  # shell expansions in args are fine
    with pytest.raises(ManifestError, match=r"dynamo.g.name \(the infra file\) = '\$\{user:\}-g'") as e:
        render_dgd(infra_for(f, name="${user:}-g"), "g")
    assert "metadata.name" not in str(e.value)
