"""CRD validation: the shipped CRD copy is the real one, the CRD directory resolves as
documented, and the tightened schema catches what a strict API server would."""

from __future__ import annotations

import filecmp

import pytest

from dynamo_rl.k8s import validate
from dynamo_rl.k8s.errors import SchemaValidationError
from dynamo_rl.k8s.validate import PACKAGED_CRD_DIR, crd_dir, crd_versions, schema_errors, validate_manifest

from .conftest import SHARED_CRDS

SHIPPED = ["nvidia.com_dynamographdeployments.yaml", "ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml",
           "LICENSE.dynamo", "LICENSE.kuberay", "PROVENANCE.txt"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_crds_equal_shared(name):
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} is absent: nothing to compare the shipped CRD copy with")
    assert (PACKAGED_CRD_DIR / name).is_file(), f"{name} is not shipped in {PACKAGED_CRD_DIR}"
    assert filecmp.cmp(PACKAGED_CRD_DIR / name, SHARED_CRDS / name, shallow=False), f"{name} differs from ../shared/crds"


def test_crd_dir_resolution(monkeypatch, tmp_path):
    assert crd_dir(tmp_path) == tmp_path
    monkeypatch.setenv("DYNAMO_RL_CRD_DIR", str(tmp_path))
    assert crd_dir() == tmp_path
    monkeypatch.delenv("DYNAMO_RL_CRD_DIR")
    monkeypatch.setattr(validate, "DEV_CRD_DIR", tmp_path / "absent")
    assert crd_dir() == PACKAGED_CRD_DIR  # an installed package works without ../shared
    with pytest.raises(SchemaValidationError, match="DYNAMO_RL_CRD_DIR"):
        validate.crd_path("ray.io", "RayCluster", tmp_path)


def test_newest_dgd_crd_serves_both_apis():
    assert crd_versions("nvidia.com", "DynamoGraphDeployment", PACKAGED_CRD_DIR) == ["v1alpha1", "v1beta1"]


def _dgd(spec, api="nvidia.com/v1alpha1", name="g"):
    return {"apiVersion": api, "kind": "DynamoGraphDeployment", "metadata": {"name": name}, "spec": spec}


def test_errors_are_reported_by_path():
    errs = schema_errors(_dgd({"services": {"F": {"componentType": "frontend", "replicas": -1, "bogus": 1}}}))
    assert any(e.startswith("spec.services.F: Additional properties are not allowed ('bogus'") for e in errs), errs
    errs = schema_errors(_dgd({"services": {"F": {"componentType": "frontend", "replicas": "x"}}}))
    assert "spec.services.F.replicas: 'x' is not of type 'integer'" in errs, errs


def test_v1beta1_shape_is_not_v1alpha1():
    spec = {"components": [{"name": "Frontend", "type": "frontend"}]}
    assert schema_errors(_dgd(spec, "nvidia.com/v1beta1")) == []
    assert schema_errors(_dgd(spec, "nvidia.com/v1alpha1"))  # `components` is no v1alpha1 field


def test_names_and_unknown_versions():
    assert schema_errors(_dgd({}, name="Bad_Name"))[-1].startswith("metadata.name: 'Bad_Name' is not a valid")
    with pytest.raises(SchemaValidationError, match="has no version 'v2'"):
        validate_manifest(_dgd({}, "nvidia.com/v2"))
    with pytest.raises(SchemaValidationError, match="no CRD known for kind 'Pod'"):
        validate_manifest({"apiVersion": "core/v1", "kind": "Pod", "metadata": {"name": "p"}})


def test_preserve_unknown_fields_and_int_or_string_are_respected():
    # extraPodSpec resources accept int-or-string quantities; envs are plain EnvVars
    spec = {"services": {"W": {"componentType": "worker", "resources": {"limits": {"gpu": "1"}},
                               "extraPodSpec": {"mainContainer": {"name": "main", "resources": {"limits": {"cpu": 2, "memory": "1Gi"}}}}}}}
    assert schema_errors(_dgd(spec)) == []


def test_older_dgd_crd_via_env(monkeypatch, tmp_path):
    """DYNAMO_RL_CRD_DIR pointed at the 2025-10 DGD CRD (v1alpha1 only, no conversion
    webhook): the v1alpha1 cases and our example validate; a v1beta1 DGD is refused clearly."""
    import shutil

    from dynamo_rl.k8s.manifests import render_dgd
    from dynamo_rl.k8s.schema import parse_infra

    old = SHARED_CRDS / "nvidia.com_dynamographdeployments.2025-10.yaml"
    if not old.is_file():
        pytest.skip(f"{old} is absent")
    shutil.copy(old, tmp_path / "nvidia.com_dynamographdeployments.yaml")
    monkeypatch.setenv("DYNAMO_RL_CRD_DIR", str(tmp_path))
    assert crd_versions("nvidia.com", "DynamoGraphDeployment") == ["v1alpha1"]
    root = SHARED_CRDS.parent / "cases" / "dgd"
    files = [p for p in root.glob("v1alpha1_*.yaml") if "${" not in p.read_text()]
    files.append(PACKAGED_CRD_DIR.parents[3] / "examples" / "k8s" / "tiny.dgd.yaml")
    for p in files:
        validate_manifest(render_dgd(parse_infra({"image": "i", "dynamo": {"g": {"manifest": str(p)}}}), "g"), source=p.name)
    beta = render_dgd(parse_infra({"dynamo": {"g": {"manifest": str(root / "v1beta1_examples-vllm_agg.yaml")}}}), "g")
    with pytest.raises(SchemaValidationError, match=r"has no version 'v1beta1' \(it serves \['v1alpha1'\]\)"):
        validate_manifest(beta)
