"""A minimal HTTP-level Kubernetes API emulator for the launcher tests.

Why not kmock: kmock's server is aiohttp-on-an-event-loop with a request-matching DSL
and its Kubernetes emulator has no uid, resourceVersion, generation, label selectors,
garbage collection or service proxy; the official client is synchronous. Adding all of
that around kmock was larger than this stdlib ``ThreadingHTTPServer`` (loopback only).

What it does, and no more:
* namespaced custom objects, Deployments, and core ConfigMaps/PVCs: POST (create), GET (one / list with ``labelSelector``),
  PATCH (``application/merge-patch+json``, optimistic ``resourceVersion``), DELETE
  (with immediate background garbage collection of dependents by ownerReference uid);
  uid, resourceVersion, generation (bumped when ``spec`` changes);
* pods: list with ``labelSelector`` (pods are put in by the test);
* ``/api/v1/namespaces/<ns>/services/<svc>:<port>/proxy/<path>`` → a handler the test registers;
* every object written is validated against the real CRD schema (plain jsonschema on
  ``openAPIV3Schema``); failures answer 422 and are kept in ``invalid`` for the test to assert;
* fault injection (``fail``), missing CRDs (404) and forbidden lists (403);
* hooks, called after each request, through which the test plays the operators;
* a request log (``requests``) to assert order.
"""

from __future__ import annotations

import copy
import functools
import json
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import jsonschema
import yaml
from kubernetes import client as k8s_client

#: core (``/api/v1``) namespaced kinds the emulator stores: a DGD file's companions.
CORE = {"configmaps": "ConfigMap", "persistentvolumeclaims": "PersistentVolumeClaim"}
CRD_FILES = ["nvidia.com_dynamographdeployments.yaml", "ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"]


@dataclass
class Req:
    method: str
    path: str
    plural: str = ""
    namespace: str = ""
    name: str = ""
    body: Any = None
    status: int = 0

    def __repr__(self) -> str:
        return f"{self.method} {self.plural or self.path}{'/' + self.name if self.name else ''} -> {self.status}"


@dataclass
class Fault:
    method: str
    plural: str
    status: int
    name: str | None = None
    times: int = 1
    message: str = "injected fault"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _defaulted(node: Any) -> Any:
    """Like the API server, which fills schema defaults before validating: a required
    property that has a default cannot be missing."""
    if isinstance(node, dict):
        props = node.get("properties") or {}
        if isinstance(node.get("required"), list):
            node["required"] = [r for r in node["required"] if "default" not in (props.get(r) or {})]
        for v in node.values():
            _defaulted(v)
    elif isinstance(node, list):
        for v in node:
            _defaulted(v)
    return node


@functools.lru_cache(maxsize=4)
def _load_crds(crd_dir: str) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, str, str], jsonschema.Draft7Validator]]:
    """plural → (group, kind), and (group, version, plural) → validator; loaded once per process."""
    kinds: dict[str, tuple[str, str]] = {}
    validators: dict[tuple[str, str, str], jsonschema.Draft7Validator] = {}
    for fname in CRD_FILES:
        crd = yaml.load((Path(crd_dir) / fname).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        spec = crd["spec"]
        kinds[spec["names"]["plural"]] = (spec["group"], spec["names"]["kind"])
        for v in spec["versions"]:
            validators[(spec["group"], v["name"], spec["names"]["plural"])] = jsonschema.Draft7Validator(
                _defaulted(v["schema"]["openAPIV3Schema"]))
    kinds["deployments"] = ("apps", "Deployment")  # core kind: the real API server validates it, not a CRD
    for plural, kind in CORE.items():
        kinds[plural] = ("", kind)
    return kinds, validators


def _matches(labels: dict, selector: str) -> bool:
    for term in filter(None, (selector or "").split(",")):
        k, _, v = term.partition("=")
        if labels.get(k.strip()) != v.strip():
            return False
    return True


class KubeEmulator:
    def __init__(self, crd_dir: Path):
        self.lock = threading.RLock()
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, ns, name) -> obj
        self.pods: dict[tuple[str, str], dict] = {}
        self.requests: list[Req] = []
        self.invalid: list[str] = []
        self.faults: list[Fault] = []
        self.missing_crds: set[str] = set()
        self.forbidden_list: set[str] = set()
        self.hooks: list[Callable[["KubeEmulator", Req], None]] = []
        self.proxies: dict[str, Callable[[str, str, Any], tuple[int, Any]]] = {}
        self._rv = 100
        self.kinds, self.validators = _load_crds(str(crd_dir))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "KubeEmulator":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def api_client(self) -> k8s_client.ApiClient:
        cfg = k8s_client.Configuration()
        cfg.host = self.url
        return k8s_client.ApiClient(cfg)

    # ------------------------------------------------------------------ state, for tests
    def next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def get(self, plural: str, name: str, ns: str = "default") -> dict | None:
        with self.lock:
            o = self.objects.get((plural, ns, name))
            return copy.deepcopy(o) if o else None

    def names(self, plural: str) -> list[str]:
        with self.lock:
            return sorted(n for (p, _, n) in self.objects if p == plural)

    def insert(self, obj: dict) -> dict:
        """Create an object as an operator would (no validation, no request logged)."""
        with self.lock:
            obj = copy.deepcopy(obj)
            md = obj.setdefault("metadata", {})
            md.setdefault("namespace", "default")
            md.update(uid=str(uuid.uuid4()), resourceVersion=self.next_rv(), generation=1,
                      creationTimestamp="2026-01-01T00:00:00Z")
            plural = next(p for p, (g, k) in self.kinds.items() if k == obj["kind"])
            self.objects[(plural, md["namespace"], md["name"])] = obj
            return copy.deepcopy(obj)

    def set_status(self, plural: str, name: str, status: dict, ns: str = "default", merge: bool = True) -> None:
        with self.lock:
            o = self.objects[(plural, ns, name)]
            o["status"] = merge_patch(o.get("status") or {}, status) if merge else status
            o["metadata"]["resourceVersion"] = self.next_rv()

    def update_spec(self, plural: str, name: str, patch: dict, ns: str = "default") -> None:
        with self.lock:
            o = self.objects[(plural, ns, name)]
            o["spec"] = merge_patch(o["spec"], patch)
            o["metadata"]["generation"] += 1
            o["metadata"]["resourceVersion"] = self.next_rv()

    def add_pod(self, name: str, labels: dict, ready: bool, ns: str = "default", owner_uid: str | None = None) -> None:
        with self.lock:
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels, "uid": str(uuid.uuid4())},
                "status": {"phase": "Running",
                           "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
            }
            if owner_uid:
                pod["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": owner_uid}]
            self.pods[(ns, name)] = pod

    def set_pod_ready(self, name: str, ready: bool, ns: str = "default") -> None:
        with self.lock:
            self.pods[(ns, name)]["status"]["conditions"][0]["status"] = "True" if ready else "False"

    def log(self, *, methods: tuple[str, ...] = ("POST", "PATCH", "DELETE"), plurals: tuple[str, ...] | None = None) -> list[tuple[str, str, str]]:
        """(method, plural, name) of logged requests, writes only by default."""
        with self.lock:
            return [(r.method, r.plural, r.name or (r.body or {}).get("metadata", {}).get("name", ""))
                    for r in self.requests
                    if r.method in methods and r.plural and (plurals is None or r.plural in plurals)]

    # ------------------------------------------------------------------ internals
    def _delete(self, key: tuple[str, str, str]) -> None:
        obj = self.objects.pop(key, None)
        if obj is None:
            return
        uid = obj["metadata"]["uid"]
        for k2, o2 in list(self.objects.items()):
            if any(r.get("uid") == uid for r in o2["metadata"].get("ownerReferences") or []):
                self._delete(k2)
        for k2, p in list(self.pods.items()):
            if any(r.get("uid") == uid for r in p["metadata"].get("ownerReferences") or []):
                del self.pods[k2]

    def _validate(self, group: str, version: str, plural: str, obj: dict) -> list[str]:
        v = self.validators.get((group, version, plural))
        if group == "" and plural in CORE:
            return [] if obj.get("kind") == CORE[plural] else [f"kind: must be {CORE[plural]}"]
        if (group, version, plural) == ("apps", "v1", "deployments"):
            return [] if obj.get("spec", {}).get("template") else ["spec.template: Required value"]
        if v is None:
            return [f"no schema for {group}/{version} {plural}"]
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]

    def _status(self, code: int, reason: str, message: str) -> tuple[int, dict]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                      "message": message, "code": code}

    def handle(self, method: str, raw_path: str, body: Any) -> tuple[int, Any]:
        split = urlsplit(raw_path)
        path = unquote(split.path)
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        parts = [p for p in path.split("/") if p]
        req = Req(method, path, body=body)
        with self.lock:
            code, out = self._route(method, parts, query, body, req)
            req.status = code
            self.requests.append(req)
            for hook in list(self.hooks):
                hook(self, req)
        return code, out

    def _route(self, method, parts, query, body, req: Req) -> tuple[int, Any]:
        # /api/v1/namespaces/<ns>/pods
        if parts[:2] == ["api", "v1"] and len(parts) == 5 and parts[4] == "pods" and method == "GET":
            req.plural, req.namespace = "pods", parts[3]
            items = [copy.deepcopy(p) for (ns, _), p in sorted(self.pods.items())
                     if ns == parts[3] and _matches(p["metadata"].get("labels") or {}, query.get("labelSelector", ""))]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        # /api/v1/namespaces/<ns>/services/<svc:port>/proxy/<path>
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) >= 7 and parts[4] == "services" and parts[6] == "proxy":
            svc = parts[5]
            req.plural, req.namespace, req.name = "services/proxy", parts[3], svc
            sub = "/".join(parts[7:])
            req.path = sub
            handler = self.proxies.get(svc)
            if handler is None:
                return self._status(503, "ServiceUnavailable", f'no endpoints available for service "{svc}"')
            return handler(method, sub, body)
        # /apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]
        # /api/v1/namespaces/<ns>/<configmaps|persistentvolumeclaims>[/<name>]
        core = parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (5, 6) and parts[4] in CORE
        if core or (parts[:1] == ["apis"] and len(parts) in (6, 7) and parts[3] == "namespaces"):
            if core:
                group, version, ns, plural = "", "v1", parts[3], parts[4]
                name = parts[5] if len(parts) == 6 else ""
            else:
                group, version, ns, plural = parts[1], parts[2], parts[4], parts[5]
                name = parts[6] if len(parts) == 7 else ""
            req.plural, req.namespace, req.name = plural, ns, name or ((body or {}).get("metadata") or {}).get("name", "")
            known = (group, version, plural) in self.validators or (group, version, plural) == ("apps", "v1", "deployments") or core
            if plural in self.missing_crds or plural not in self.kinds or not known:
                return self._status(404, "NotFound", "the server could not find the requested resource")
            for f in self.faults:
                if f.times > 0 and f.method == method and f.plural == plural and f.name in (None, name or (body or {}).get("metadata", {}).get("name")):
                    f.times -= 1
                    return self._status(f.status, "Injected", f.message)
            if not name and method == "GET":
                if plural in self.forbidden_list:
                    return self._status(403, "Forbidden", f'{plural}.{group} is forbidden: cannot list resource "{plural}"')
                items = [copy.deepcopy(o) for (p, n, _), o in sorted(self.objects.items())
                         if p == plural and n == ns and _matches(o["metadata"].get("labels") or {}, query.get("labelSelector", ""))]
                lim = int(query.get("limit", 0) or 0)
                return 200, {"apiVersion": f"{group}/{version}" if group else version, "kind": self.kinds[plural][1] + "List",
                             "metadata": {"resourceVersion": str(self._rv)}, "items": items[:lim] if lim else items}
            if not name and method == "POST":
                obj = copy.deepcopy(body)
                errs = self._validate(group, version, plural, obj)
                mname = (obj.get("metadata") or {}).get("name")
                if errs:
                    self.invalid.append(f"{plural}/{mname}: {errs}")
                    return self._status(422, "Invalid", "; ".join(errs[:5]))
                key = (plural, ns, mname)
                req.name = mname
                if key in self.objects:
                    return self._status(409, "AlreadyExists", f'{plural}.{group} "{mname}" already exists')
                md = obj.setdefault("metadata", {})
                md.update(namespace=ns, uid=str(uuid.uuid4()), resourceVersion=self.next_rv(), generation=1,
                          creationTimestamp="2026-01-01T00:00:00Z")
                self.objects[key] = obj
                return 201, copy.deepcopy(obj)
            key = (plural, ns, name)
            if key not in self.objects:
                return self._status(404, "NotFound", f'{plural}.{group} "{name}" not found')
            if method == "GET":
                return 200, copy.deepcopy(self.objects[key])
            if method == "DELETE":
                self._delete(key)
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
            if method == "PATCH":
                cur = self.objects[key]
                want_rv = ((body or {}).get("metadata") or {}).get("resourceVersion")
                if want_rv is not None and want_rv != cur["metadata"]["resourceVersion"]:
                    return self._status(409, "Conflict", "the object has been modified; please apply your changes to the latest version")
                new = merge_patch(cur, body)
                errs = self._validate(group, version, plural, new)
                if errs:
                    self.invalid.append(f"PATCH {plural}/{name}: {errs}")
                    return self._status(422, "Invalid", "; ".join(errs[:5]))
                for k in ("uid", "name", "namespace", "creationTimestamp"):
                    new["metadata"][k] = cur["metadata"][k]
                new["metadata"]["resourceVersion"] = self.next_rv()
                if new.get("spec") != cur.get("spec"):
                    new["metadata"]["generation"] = cur["metadata"]["generation"] + 1
                self.objects[key] = new
                return 200, copy.deepcopy(new)
        return self._status(404, "NotFound", "the server could not find the requested resource")

    def _handler_class(self):
        emu = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode()
                code, out = emu.handle(self.command, self.path, body)
                data = out.encode() if isinstance(out, str) else json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if not isinstance(out, str) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

        return Handler
