"""Fixtures of the Kubernetes launcher tests: the shared cases, the API emulator, a client.

``SHARED`` is ``../shared`` beside the repository (real DGD/KubeRay/nrl-k8s files, CRDs,
status excerpts). Tests that need it skip with a reason when it is absent; the emulator
then validates against the CRD copy shipped in the package.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_rl.k8s.api import Kube
from dynamo_rl.k8s.orchestrate import Timing
from dynamo_rl.k8s.validate import PACKAGED_CRD_DIR

from .emulator import KubeEmulator

SHARED = (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()
CASES = SHARED / "cases"
SHARED_CRDS = SHARED / "crds"
FAST = Timing(poll_s=0.005, gone_timeout_s=2.0)


def need_shared() -> Path:
    if not CASES.is_dir():
        pytest.skip(f"{SHARED} is absent: the real-world cases (../shared/cases) are not available here")
    return SHARED


@pytest.fixture
def cases() -> Path:
    return need_shared() / "cases"


@pytest.fixture
def emu():
    e = KubeEmulator(SHARED_CRDS if SHARED_CRDS.is_dir() else PACKAGED_CRD_DIR).start()
    try:
        yield e
    finally:
        e.stop()
    assert e.invalid == [], f"manifests sent that do not validate against the CRD schema: {e.invalid}"


@pytest.fixture
def kube(emu):
    k = Kube(emu.api_client())
    try:
        yield k
    finally:
        k.api_client.close()


@pytest.fixture(autouse=True)
def _not_in_a_pod(monkeypatch):
    # The tests reach frontends/dashboards through the API server proxy, as from a laptop.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def pytest_collection_modifyitems(items):
    # A broken operator fake must fail a test, not hang the suite.
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(120))
