"""The KubeRay manifests in cluster/k8s/, checked offline, and their autoscaling run for real.

* Every manifest of every overlay, rendered, validates against KubeRay v1.7.0's CRD schemas
  made strict (``tests/data/kuberay/``), core kinds with ``kubernetes-validate``, and
  ``serveConfigV2`` with Ray Serve's ``ServeDeploySchema`` and the application's own ``AppArgs``.
* Every RayJob entrypoint is parsed by its job's own argument parser and config tree.
* Each worker group's Ray resources agree with its container's limits.
* The Dockerfile, parsed, builds on the official Ray image of the pinned Ray release.
* Each check is also run on a deliberately broken copy, which must fail.
* The dev RayCluster's autoscaling, as KubeRay hands it to Ray's autoscaler, runs on this machine
  with Ray's simulated multi-node provider: a training job grows the cpu group from 0 and it
  shrinks back after the idle timeout.

Rendering uses cluster/k8s/render.py (kustomize's features that the manifests use); where
kubectl is installed a test checks that ``kubectl kustomize`` renders the same.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "cluster" / "k8s"
DOCKERFILE = REPO / "cluster" / "docker" / "Dockerfile"
sys.path.insert(0, str(K8S))

import render
import serve_config

KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/gpu"]
CRD_DIR = REPO / "tests" / "data" / "kuberay"  # KubeRay v1.7.0, unmodified (tests/data/README.md)
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
K8S_VERSION = "1.32"  # kubernetes-validate's schemas for the core kinds
APP_DIR = "/home/ray/dcgh-dist"  # where the Dockerfile puts the checkout
CONFIGMAP = "dcgh-storage"
CREDENTIALS_SECRET = "dcgh-s3-credentials"


def _pinned(name: str) -> str:
    text = (REPO / "requirements" / "constraints.txt").read_text()
    m = re.search(rf"^{re.escape(name)}==([^\s;]+)", text, re.MULTILINE)
    assert m, f"{name} is not pinned in requirements/constraints.txt"
    return m.group(1)


def _project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)


# --------------------------------------------------------------------------------------------
# Rendering and schemas


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {k: render.render(k) for k in KUSTOMIZATIONS}


def strict(schema: Any) -> Any:
    """KubeRay's generated schema made strict, as its scripts/openapi2jsonschema.py does: every
    object that lists ``properties`` admits no other key; int-or-string fields take either."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, Any]:
    import jsonschema

    validators = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.safe_load((CRD_DIR / name).read_text())
        [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[kind] = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    return validators


def manifest_errors(doc: dict[str, Any], crd_validators: dict[str, Any]) -> list[str]:
    """Schema errors of one manifest: KubeRay kinds against the strict CRD schema (metadata as
    core ObjectMeta), everything else with kubernetes-validate (strict)."""
    import kubernetes_validate

    kind = doc.get("kind")
    errors: list[str] = []
    if kind in crd_validators:
        if doc.get("apiVersion") != "ray.io/v1":
            errors.append(f"{kind}: apiVersion {doc.get('apiVersion')!r}, not ray.io/v1")
        for e in crd_validators[kind].iter_errors(doc):
            errors.append(f"{kind}/{doc.get('metadata', {}).get('name')}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
        # The CRD leaves metadata open; check it as what it is, a core ObjectMeta.
        probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
        try:
            kubernetes_validate.validate(probe, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{kind} metadata: {e.message}")
    else:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{kind}/{doc.get('metadata', {}).get('name')}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{kind}: no schema (apiVersion {doc.get('apiVersion')})")
    return errors


def test_kubectl_renders_what_render_py_renders():
    if not render.kubectl_available():
        # CI sets DCGH_REQUIRE_KUBECTL: there the renderer is always checked, never skipped.
        assert not os.environ.get("DCGH_REQUIRE_KUBECTL"), "kubectl is required here (.ci/run)"
        pytest.skip("kubectl is not installed: the other tests render with cluster/k8s/render.py only")
    for k in KUSTOMIZATIONS:
        assert render.by_key(render.render_kubectl(k)) == render.by_key(render.render(k)), k


def test_render_py_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(render.RenderError, match="commonLabels"):
        render.render(tmp_path)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_manifest_validates(rendered, crd_validators, kustomization):
    docs = rendered[kustomization]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("RayCluster") == 1 and kinds.count("RayService") == 1 and kinds.count("ConfigMap") == 1
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "RayJob"} == {
        "dcgh-train", "dcgh-encode", "dcgh-build-index-image", "dcgh-build-index-text"}
    errors = [e for d in docs for e in manifest_errors(d, crd_validators)]
    assert errors == []


def _first_container(node: Any) -> dict[str, Any] | None:
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list) and node["containers"]:
            return node["containers"][0]
        for v in node.values():
            if (c := _first_container(v)) is not None:
                return c
    elif isinstance(node, list):
        for v in node:
            if (c := _first_container(v)) is not None:
                return c
    return None


def _broken_copies(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A misspelt key deep inside (the first container), and a wrong type near the top."""
    out = {}
    misspelt = copy.deepcopy(doc)
    container = _first_container(misspelt)
    if container is not None:
        container["imagePulPolicy"] = "IfNotPresent"
    else:
        misspelt["datta"] = {}
    out["misspelt key"] = misspelt
    typed = copy.deepcopy(doc)
    if doc["kind"] == "RayCluster":
        typed["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    elif doc["kind"] == "RayJob":
        typed["spec"]["backoffLimit"] = "twice"
    elif doc["kind"] == "RayService":
        typed["spec"]["upgradeStrategy"] = "NewCluster"
    elif doc["kind"] == "ConfigMap":
        typed["data"]["DCGH_RUN"] = 1
    elif "spec" in doc:
        typed["spec"] = "none"
    out["wrong type"] = typed
    return out


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_a_broken_copy_of_each_manifest_fails(rendered, crd_validators, kustomization):
    for doc in rendered[kustomization]:
        for how, broken in _broken_copies(doc).items():
            assert manifest_errors(broken, crd_validators), f"{how} in {doc['kind']}/{doc['metadata']['name']} passed"
    # the CRD README's example: a bad enum, a missing required key, a misspelt key, a wrong type
    cluster = copy.deepcopy(next(d for d in rendered[kustomization] if d["kind"] == "RayCluster"))
    cluster["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    del cluster["spec"]["workerGroupSpecs"][0]["minReplicas"]
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 1
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "1"
    assert len(manifest_errors(cluster, crd_validators)) == 4


# --------------------------------------------------------------------------------------------
# The cluster: groups, resources, autoscaling, auth


def cluster_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every cluster spec in a rendering: the RayCluster's, each RayJob's, the RayService's."""
    out = {}
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "RayCluster":
            out[name] = d["spec"]
        elif d["kind"] == "RayJob":
            out[name] = d["spec"]["rayClusterSpec"]
        elif d["kind"] == "RayService":
            out[name] = d["spec"]["rayClusterConfig"]
    return out


def _cpu(q: str | int) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _bytes(q: str | int) -> int:
    import decimal

    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    q = str(q)
    for u, f in units.items():
        if q.endswith(u):
            return int(decimal.Decimal(q[: -len(u)]) * f)
    return int(q)


def cluster_problems(spec: dict[str, Any]) -> list[str]:
    """What is wrong with one cluster spec: resources vs limits, autoscaling, auth, version."""
    from simulate_autoscaling import kuberay_autoscaling_config

    problems = []
    if spec.get("rayVersion") != _pinned("ray"):
        problems.append(f"rayVersion {spec.get('rayVersion')} != the pinned ray {_pinned('ray')}")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("Ray token authentication (authOptions.mode: token) is off")
    if not spec.get("enableInTreeAutoscaling"):
        problems.append("in-tree autoscaling is off")
    opts = spec.get("autoscalerOptions", {})
    if opts.get("version") != "v2" or "upscalingMode" not in opts or "idleTimeoutSeconds" not in opts:
        problems.append(f"autoscalerOptions must set version v2, upscalingMode, idleTimeoutSeconds: {opts}")
    if spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0":
        problems.append("the head must take no work (num-cpus: \"0\")")
    groups = [("headgroup", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    derived = kuberay_autoscaling_config({"metadata": {"name": "x"}, "spec": spec})
    for name, g in groups:
        c = g["template"]["spec"]["containers"][0]
        res = c.get("resources", {})
        limits, requests = res.get("limits", {}), res.get("requests", {})
        if limits != requests or not limits:
            problems.append(f"{name}: requests {requests} != limits {limits}")
            continue
        params = g.get("rayStartParams", {})
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if name != "headgroup":
            if params.get("num-cpus") is None or _cpu(params["num-cpus"]) != _cpu(limits["cpu"]):
                problems.append(f"{name}: rayStartParams num-cpus {params.get('num-cpus')} != cpu limit {limits['cpu']}")
            if not 0 <= g.get("minReplicas", 0) <= g["maxReplicas"]:
                problems.append(f"{name}: minReplicas/maxReplicas {g.get('minReplicas')}/{g['maxReplicas']}")
            ray_res = derived["available_node_types"][name]["resources"]
            want = {"CPU": int(_cpu(limits["cpu"])), "memory": _bytes(limits["memory"]), **({"GPU": gpus} if gpus else {})}
            if ray_res != want:
                problems.append(f"{name}: Ray sees {ray_res}, the pod has {want}")
        if gpus or "num-gpus" in params:
            if int(params.get("num-gpus", -1)) != gpus:
                problems.append(f"{name}: rayStartParams num-gpus {params.get('num-gpus')} != nvidia.com/gpu {gpus}")
            tolerations = g["template"]["spec"].get("tolerations", [])
            if not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
                problems.append(f"{name}: a GPU group without the nvidia.com/gpu toleration")
        if "memory" in params and _bytes(params["memory"]) != _bytes(limits["memory"]):
            problems.append(f"{name}: rayStartParams memory {params['memory']} != memory limit {limits['memory']}")
    return problems


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_worker_groups_ray_resources_agree_with_limits(rendered, kustomization):
    specs = cluster_specs(rendered[kustomization])
    assert len(specs) == 6
    for name, spec in specs.items():
        assert cluster_problems(spec) == [], name
        groups = [g["groupName"] for g in spec["workerGroupSpecs"]]
        assert groups == (["cpu"] if kustomization == "overlays/dev" else ["cpu", "gpu"]), name
    # one definition: every RayJob and the RayService run the RayCluster's spec
    cluster = next(s for n, s in specs.items() if n.startswith("RayCluster/"))
    for name, spec in specs.items():
        ignore = {"headGroupSpec"} if name.startswith("RayService/") else set()  # + the model-run stamp
        assert {k: v for k, v in spec.items() if k not in ignore} == {k: v for k, v in cluster.items() if k not in ignore}


def test_the_resource_check_bites(rendered):
    spec = cluster_specs(rendered["overlays/gpu"])["RayCluster/dcgh"]
    cases = {
        "num-cpus": lambda s: s["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": "8"}),
        "num-gpus": lambda s: s["workerGroupSpecs"][1]["rayStartParams"].update({"num-gpus": "2"}),
        "requests": lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]
        .update({"memory": "32Gi"}),
        "toleration": lambda s: s["workerGroupSpecs"][1]["template"]["spec"].pop("tolerations"),
        "head": lambda s: s["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
        "auth": lambda s: s.pop("authOptions"),
        "autoscaler": lambda s: s["autoscalerOptions"].update({"version": "v1"}),
        "version": lambda s: s.update({"rayVersion": "2.59.0"}),
    }
    for what, breaker in cases.items():
        broken = copy.deepcopy(spec)
        breaker(broken)
        assert cluster_problems(broken), what


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kuberay_autoscaling_config_of_each_group(rendered, kustomization):
    """What KubeRay hands Ray's autoscaler, and what the simulation runs: the same node types."""
    from simulate_autoscaling import HEAD_TYPE, autoscaling_config, kuberay_autoscaling_config

    cr = next(d for d in rendered[kustomization] if d["kind"] == "RayCluster")
    kuberay = kuberay_autoscaling_config(cr)
    opts = cr["spec"]["autoscalerOptions"]
    assert kuberay["idle_timeout_minutes"] == opts["idleTimeoutSeconds"] / 60
    assert kuberay["upscaling_speed"] == {"Default": 1000, "Aggressive": 1000, "Conservative": 1}[opts["upscalingMode"]]
    for g in cr["spec"]["workerGroupSpecs"]:
        t = kuberay["available_node_types"][g["groupName"]]
        assert (t["min_workers"], t["max_workers"]) == (g["minReplicas"], g["maxReplicas"])
        if "idleTimeoutSeconds" in g:
            assert t["idle_timeout_s"] == g["idleTimeoutSeconds"]
    sim = autoscaling_config(cr, "127.0.0.1:1")
    assert sim["provider"]["type"] == "external" and sim["head_node_type"] == HEAD_TYPE
    for name, t in kuberay["available_node_types"].items():
        s = sim["available_node_types"][HEAD_TYPE if name == "headgroup" else name]
        assert {k: v for k, v in s["resources"].items() if k != "object_store_memory"} == t["resources"]
        assert {k: v for k, v in s.items() if k != "resources"} == {k: v for k, v in t.items() if k != "resources"}
    assert {k: v for k, v in sim.items() if k not in ("provider", "available_node_types", "head_node_type")} == {
        k: v for k, v in kuberay.items() if k not in ("provider", "available_node_types", "head_node_type")}


# --------------------------------------------------------------------------------------------
# RayJobs


def storage_values(docs: list[dict[str, Any]]) -> dict[str, str]:
    [cm] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIGMAP]
    return cm["data"]


def expand(entrypoint: str, env: dict[str, str]) -> list[str]:
    """The entrypoint as the submitter pod's shell runs it: ${VAR} from the ConfigMap, then words."""
    if re.search(r"[;&|<>`]|\$\(", entrypoint):
        raise ValueError(f"entrypoint has shell syntax beyond ${{VAR}}: {entrypoint}")
    unknown = sorted(set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", entrypoint)) - set(env))
    if unknown:
        raise ValueError(f"entrypoint uses {unknown}, which the ConfigMap {CONFIGMAP} does not define")
    return shlex.split(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], entrypoint))


def _job_module(script: str):
    """The module whose ``main`` ``jobs/<name>.py`` runs: dcgh_dist.jobs.<name>."""
    import importlib

    if not script.startswith("jobs/"):
        raise ValueError(f"no parser known for {script}")
    return importlib.import_module(f"dcgh_dist.jobs.{Path(script).stem}")


def parse_entrypoint(argv: list[str]) -> tuple[str, Any]:
    """(repo-relative script, the parsed job config): parsed by the job's own parser, its flags
    and ``section.key=value`` overrides checked against the config tree. Raises on any mistake."""
    if argv[:1] != ["python"] or len(argv) < 2 or not argv[1].startswith(APP_DIR + "/"):
        raise ValueError(f"entrypoint must be `python {APP_DIR}/<script> ...`, got {argv[:2]}")
    script = argv[1][len(APP_DIR) + 1:]
    if not (REPO / script).is_file():
        raise ValueError(f"{script} is not in the repository (the image has the repository at {APP_DIR})")
    args = argv[2:]
    job = _job_module(script)
    parsed = job.parse_args(args)
    from dcgh_dist.cli import config_from_args

    if script == "jobs/train.py":
        return script, job.build_config(parsed)
    if script in ("jobs/encode.py", "jobs/build_index.py"):
        return script, config_from_args(parsed, job.FLAGS, reads=job.READS)
    raise ValueError(f"no parser known for {script}")


def _jobs(docs):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "RayJob"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rayjob_entrypoint_parses(rendered, kustomization):
    env = storage_values(rendered[kustomization])
    scripts = {}
    for name, job in _jobs(rendered[kustomization]).items():
        argv = expand(job["spec"]["entrypoint"], env)
        script, cfg = parse_entrypoint(argv)
        scripts[name] = script
        # outputs on S3 (the cluster, with its disks, goes when the job ends)
        outs = [argv[i + 1] for i, a in enumerate(argv) if a in ("--output", "--output-dir")]
        assert outs and all(o.startswith(f"s3://{env['DCGH_BUCKET']}/") for o in outs), (name, outs)
        if name == "dcgh-train":
            t = cfg.train
            assert t.storage_path.startswith("s3://") and t.run_name == env["DCGH_RUN"]
            assert cfg.data.s3_endpoint == env["DCGH_S3_ENDPOINT"]
            if kustomization != "overlays/dev":
                assert cfg.data.dataset == "coco" and t.use_gpu and t.num_workers >= 4 and t.engine == "deepspeed"
    assert scripts == {"dcgh-train": "jobs/train.py", "dcgh-encode": "jobs/encode.py",
                       "dcgh-build-index-image": "jobs/build_index.py", "dcgh-build-index-text": "jobs/build_index.py"}


def test_the_entrypoint_check_bites(rendered):
    docs = rendered["base"]
    env = storage_values(docs)
    train = _jobs(docs)["dcgh-train"]["spec"]["entrypoint"]
    encode = _jobs(docs)["dcgh-encode"]["spec"]["entrypoint"]
    index = _jobs(docs)["dcgh-build-index-image"]["spec"]["entrypoint"]
    with pytest.raises(SystemExit):  # a flag train.py does not have
        parse_entrypoint(expand(train.replace("--num-workers", "--num-wrkers"), env))
    with pytest.raises(ValueError, match="unknown config key"):  # a key the config tree does not have
        parse_entrypoint(expand(train.replace("train.zero_stage=", "train.zero_stag="), env))
    with pytest.raises(ValueError, match="deepspeed"):  # a value it refuses
        parse_entrypoint(expand(train.replace("train.engine=deepspeed", "train.engine=ddp")
                                .replace("precision=bf16", "precision=fp16"), env))
    with pytest.raises(SystemExit):
        parse_entrypoint(expand(encode.replace("--modality both", "--modality all"), env))
    with pytest.raises(SystemExit):
        parse_entrypoint(expand(index.replace("--index flat", "--index-type flat"), env))
    with pytest.raises(ValueError, match="ConfigMap"):
        expand(index.replace("${DCGH_BUCKET}", "${DCGH_BUCKT}"), env)
    with pytest.raises(ValueError, match="not in the repository"):
        parse_entrypoint(expand(index.replace("jobs/build_index.py", "jobs/build_indexes.py"), env))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rayjobs_clean_up_retry_and_time_out(rendered, kustomization):
    for name, job in _jobs(rendered[kustomization]).items():
        s = job["spec"]
        assert s["shutdownAfterJobFinishes"] is True, name
        assert 0 < s["ttlSecondsAfterFinished"] <= 3600, name
        assert s["backoffLimit"] >= 1 and s["activeDeadlineSeconds"] > 0, name
        # the submitter expands ${DCGH_*}: it must read the ConfigMap
        [sub] = s["submitterPodTemplate"]["spec"]["containers"]
        assert {"configMapRef": {"name": CONFIGMAP}} in sub["envFrom"], name


# --------------------------------------------------------------------------------------------
# The RayService and its serve config


def serve_config_v2(docs) -> dict[str, Any]:
    [svc] = [d for d in docs if d["kind"] == "RayService"]
    assert isinstance(svc["spec"]["serveConfigV2"], str), "serveConfigV2 must be a YAML string"
    return yaml.safe_load(svc["spec"]["serveConfigV2"])


def _leaves(node: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(node, dict):
        return {k: v for key, val in node.items() for k, v in _leaves(val, prefix + (key,)).items()}
    if isinstance(node, list) and node and all(isinstance(x, dict) and "name" in x for x in node):
        return {k: v for x in node for k, v in _leaves(x, prefix + (x["name"],)).items()}
    return {prefix: node}


def unknown_keys(model: type, data: Any, where: str) -> list[str]:
    """Keys a pydantic model does not define, at any depth of its nested models: Serve's schemas
    ignore unknown keys, so a misspelt one would silently do nothing."""
    import typing

    from pydantic import BaseModel

    if isinstance(data, list):
        return [p for i, x in enumerate(data) for p in unknown_keys(model, x, f"{where}[{i}]")]
    if not isinstance(data, dict):
        return []
    fields = {f.alias or n: f for n, f in model.model_fields.items()}
    problems = [f"{where}.{k}: not a field of {model.__name__}" for k in data if k not in fields]
    for key, f in fields.items():
        if key not in data:
            continue
        todo = [f.annotation]
        while todo:
            tp = todo.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                problems += unknown_keys(tp, data[key], f"{where}.{key}")
                break
            todo += list(typing.get_args(tp))
    return problems


def serve_problems(config: dict[str, Any]) -> list[str]:
    """Ray Serve's own schema (strict: no unknown keys), then the application's own argument
    model (AppArgs) and Serve's AutoscalingConfig for each deployment."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [f"ServeDeploySchema: {e}"]
    unknown = unknown_keys(ServeDeploySchema, config, "serveConfigV2")
    if unknown:
        return unknown
    from serve.app import AppArgs

    problems = []
    for app in config["applications"]:
        try:
            args = AppArgs.model_validate(app.get("args", {}))
        except ValidationError as e:
            problems.append(f"{app['name']}: AppArgs: {e}")
            continue
        for name in ("encoder", "index", "metadata", "frontend"):
            auto = getattr(args, name).autoscaling_config
            if auto is None:
                problems.append(f"{app['name']}.{name}: no autoscaling_config")
                continue
            try:
                AutoscalingConfig.model_validate(auto)
            except ValidationError as e:
                problems.append(f"{app['name']}.{name}.autoscaling_config: {e}")
    return problems


def test_serve_config_patches_are_generated_from_serve_config_yaml():
    assert serve_config.stale() == [], "run: python cluster/k8s/serve_config.py"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serve_config_v2_agrees_with_serve_config_yaml(rendered, kustomization):
    docs = rendered[kustomization]
    config = serve_config_v2(docs)
    assert config == serve_config.effective_config(kustomization)
    assert serve_problems(config) == []
    # one source: every setting the cluster overrides does not name is serve/config.yaml's
    source = _leaves(serve_config.source_config())
    overridden = set()
    for _, over in serve_config.override_layers(kustomization):
        over = {**over, "applications": [{"name": n, **v} for n, v in over.get("applications", {}).items()]}
        overridden |= set(_leaves(over))
    ours = _leaves(config)
    assert {k: v for k, v in source.items() if k not in overridden} == {
        k: ours[k] for k in source if k not in overridden}
    # it reads what the jobs write: the ConfigMap's bucket, endpoint and run
    env = storage_values(docs)
    [app] = config["applications"]
    uris = [app["args"]["checkpoint"], *app["args"]["indexes"].values()]
    assert all(u.startswith(f"s3://{env['DCGH_BUCKET']}/") and env["DCGH_RUN"] in u for u in uris), uris
    assert app["args"]["s3_endpoint"] == env["DCGH_S3_ENDPOINT"]
    assert config["http_options"]["host"] == "0.0.0.0"  # the proxies must be reachable from the Service
    [svc] = [d for d in docs if d["kind"] == "RayService"]
    meta = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]
    assert meta["annotations"][serve_config.RUN_ANNOTATION] == env["DCGH_RUN"]
    assert svc["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    # every node runs a proxy (proxy_location EveryNode): each hands requests to the ingress over
    # gRPC (docs/SERVE.md, "Latency"), which it reads from its container's environment
    cluster = svc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for c in group["template"]["spec"]["containers"]:
            assert {"name": "RAY_SERVE_PROXY_USE_GRPC", "value": "1"} in c.get("env", []), c["name"]


def test_the_serve_config_checks_bite(rendered, tmp_path, monkeypatch):
    config = serve_config_v2(rendered["overlays/gpu"])
    cases = {
        "unknown top-level key": lambda c: c.update({"proxy_locaton": "EveryNode"}),
        "misspelt http option": lambda c: c["http_options"].update({"hostt": "0.0.0.0"}),
        "bad enum": lambda c: c.update({"proxy_location": "Nowhere"}),
        "no import path": lambda c: c["applications"][0].pop("import_path"),
        "unknown app arg": lambda c: c["applications"][0]["args"].update({"max_kk": 5}),
        "bad autoscaling": lambda c: c["applications"][0]["args"]["index"]["autoscaling_config"].update(
            {"min_replicas": 9, "max_replicas": 2}),
        "no autoscaling": lambda c: c["applications"][0]["args"]["encoder"].pop("autoscaling_config"),
    }
    for what, breaker in cases.items():
        broken = copy.deepcopy(config)
        breaker(broken)
        assert serve_problems(broken), what
    # serve/config.yaml changed without regenerating: every patch is stale
    src = yaml.safe_load(serve_config.SOURCE.read_text())
    src["applications"][0]["args"]["max_k"] = 7
    edited = tmp_path / "config.yaml"
    edited.write_text(yaml.safe_dump(src))
    monkeypatch.setattr(serve_config, "SOURCE", edited)
    assert serve_config.stale() == list(serve_config.TARGETS)
    # an override for an application that serve/config.yaml does not have
    with pytest.raises(ValueError, match="not in"):
        serve_config.merge(src["applications"], {"search": {}}, "applications")


# --------------------------------------------------------------------------------------------
# Secrets and images


def secretish(name: str) -> bool:
    """AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN, MINIO_ROOT_PASSWORD, ... (not TOKENIZERS_PARALLELISM)."""
    parts = set(name.upper().split("_"))
    return bool(parts & {"SECRET", "PASSWORD", "TOKEN", "CREDENTIAL", "CREDENTIALS"}) or "ACCESS_KEY" in name.upper()


def secret_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Secret values in manifests: Secret objects, secret-looking env values, unreferenced
    credentials."""
    problems = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("env"), list):
                for e in node["env"]:
                    if secretish(e.get("name", "")) and "value" in e:
                        problems.append(f"{where}: env {e['name']} has a value; use valueFrom.secretKeyRef")
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Secret":
            problems.append(f"{name}: a Secret in the manifests (create it with kubectl instead)")
        if d["kind"] == "ConfigMap":
            problems += [f"{name}: key {k} looks secret" for k in d.get("data", {}) if secretish(k)]
        walk(d, name)
    for name, spec in cluster_specs(docs).items():
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            env_from = g["template"]["spec"]["containers"][0].get("envFrom", [])
            if {"secretRef": {"name": CREDENTIALS_SECRET}} not in env_from:
                problems.append(f"{name}: a Ray container without the S3 credentials Secret reference")
    return problems


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_secret_value_in_any_manifest(rendered, kustomization):
    assert secret_problems(rendered[kustomization]) == []


def test_no_secret_value_in_any_file():
    aws_key = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*\S", re.IGNORECASE)
    for path in [*K8S.rglob("*.yaml"), DOCKERFILE]:
        assert not aws_key.search(path.read_text()), path


def test_the_secret_check_bites(rendered):
    docs = rendered["overlays/dev"]
    leaked = copy.deepcopy(docs)
    cr = next(d for d in leaked if d["kind"] == "RayCluster")
    cr["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})
    assert secret_problems(leaked)
    assert secret_problems(docs + [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                                    "stringData": {"AWS_SECRET_ACCESS_KEY": "hunter2"}}])
    unreferenced = copy.deepcopy(docs)
    next(d for d in unreferenced if d["kind"] == "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0][
        "template"]["spec"]["containers"][0]["envFrom"] = []
    assert secret_problems(unreferenced)


def image_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    want = _project_version()

    def walk(node: Any, where: str, variant: str) -> None:
        if isinstance(node, dict):
            containers = [c for key in ("containers", "initContainers") if isinstance(node.get(key), list)
                          for c in node[key] if isinstance(c, dict)]
            for c in containers:
                image = c.get("image", "")
                name, tag, digest = render._split_image(image)
                if not (tag or digest) or tag == "latest":
                    problems.append(f"{where}: image {image!r} has no fixed tag")
                elif name.rsplit("/", 1)[-1] == "dcgh-dist" and tag != f"{want}-{variant}":
                    problems.append(f"{where}: {image!r}, expected tag {want}-{variant}")
            for k, v in node.items():
                walk(v, f"{where}.{k}", variant)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                gpu = isinstance(v, dict) and v.get("groupName") == "gpu"
                walk(v, f"{where}[{i}]", "gpu" if gpu else variant)

    for d in docs:
        walk(d, f"{d['kind']}/{d['metadata']['name']}", "cpu")
    return problems


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_image_has_a_fixed_tag(rendered, kustomization):
    assert image_problems(rendered[kustomization]) == []


def test_the_image_check_bites(rendered):
    for image in ("dcgh-dist:latest", "dcgh-dist", "registry.example.com:5000/dcgh/dcgh-dist", "dcgh-dist:0.0.9-cpu"):
        docs = copy.deepcopy(rendered["overlays/gpu"])
        next(d for d in docs if d["kind"] == "RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"][0][
            "image"] = image
        assert image_problems(docs), image
    docs = copy.deepcopy(rendered["overlays/gpu"])
    cr = next(d for d in docs if d["kind"] == "RayCluster")
    cr["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["image"] = f"dcgh-dist:{_project_version()}-cpu"
    assert image_problems(docs)  # a CPU image on the gpu group


# --------------------------------------------------------------------------------------------
# The Dockerfile


def dockerfile_problems(path: Path) -> list[str]:
    from dockerfile_parse import DockerfileParser

    problems = []
    ray, torch = _pinned("ray"), _pinned("torch")
    text = path.read_text()
    if re.search(r":latest\b", text):
        problems.append("a :latest tag")
    for variant in ("cpu", "gpu"):
        df = DockerfileParser(str(path), build_args={"VARIANT": variant})
        if df.parent_images != [f"rayproject/ray:{ray}-py311-{variant}"]:
            problems.append(f"{variant}: FROM {df.parent_images}, expected the official rayproject/ray:{ray}-py311-{variant}")
        args = df.args  # ARG defaults (after the last FROM)
        if args.get("TORCH_VERSION") != torch:
            problems.append(f"torch {args.get('TORCH_VERSION')} != the pinned {torch}")
        instructions = [(i["instruction"], i["value"]) for i in df.structure]
        runs = " ".join(v for k, v in instructions if k == "RUN")
        extras = "[s3,serve,deepspeed]" if variant == "cpu" else "[s3,serve,deepspeed,gpu]"
        if f'".{extras}"' not in runs or "-c requirements/constraints.txt" not in runs:
            problems.append(f"{variant}: the project is not installed with {extras} from the lock")
        if variant == "gpu" and "pip uninstall -y faiss-cpu" not in runs:
            problems.append("gpu: faiss-cpu is not removed (it shadows faiss-gpu)")
        if ("WORKDIR", APP_DIR) not in instructions:
            problems.append(f"WORKDIR is not {APP_DIR}, where the RayJob entrypoints look")
        if f"PYTHONPATH={APP_DIR}" not in " ".join(v for k, v in instructions if k == "ENV"):
            problems.append("serve.app is not importable (PYTHONPATH)")
        copied = {v.split()[-2] for k, v in instructions if k == "COPY"}
        missing = {"dcgh_dist", "jobs", "serve", "cluster"} - copied
        if missing:
            problems.append(f"not copied into the image: {sorted(missing)}")
    return problems


def test_dockerfile_builds_on_the_pinned_ray_image():
    assert dockerfile_problems(DOCKERFILE) == []


def test_the_dockerfile_check_bites(tmp_path):
    text = DOCKERFILE.read_text()
    ray = _pinned("ray")
    for what, edited in {
        "latest": text.replace("FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}", "FROM rayproject/ray:latest"),
        "old ray": text.replace(f"ARG RAY_VERSION={ray}", "ARG RAY_VERSION=2.59.0"),
        "no extras": text.replace('".[s3,serve,deepspeed,gpu]"', '"."'),
        "no lock": text.replace("-c requirements/constraints.txt", ""),
        "workdir": text.replace(f"WORKDIR {APP_DIR}", "WORKDIR /app"),
    }.items():
        assert edited != text, what
        (tmp_path / "Dockerfile").write_text(edited)
        assert dockerfile_problems(tmp_path / "Dockerfile"), what


# --------------------------------------------------------------------------------------------
# Autoscaling, shown


@pytest.mark.ray
@pytest.mark.timeout(540)
def test_dev_cluster_autoscales_for_a_training_job(rendered, tmp_path, record_property):
    """The dev RayCluster's worker groups, as KubeRay hands them to Ray's autoscaler (v2), with
    simulated nodes: a 2-worker training job grows the cpu group from 0, succeeds, and the group
    is back at its minimum after the idle timeout."""
    import psutil
    from simulate_autoscaling import SimulatedCluster, demo_entrypoint, measure

    cr = next(d for d in rendered["overlays/dev"] if d["kind"] == "RayCluster")
    [cpu] = cr["spec"]["workerGroupSpecs"]
    assert cpu["groupName"] == "cpu" and cpu["maxReplicas"] <= 2  # 2 cores: head + at most 2 nodes
    cluster = SimulatedCluster(cr)
    try:
        cluster.start()
        pids = {p.pid for p in cluster.processes()}
        listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids}
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        out = tmp_path / "run"
        timeline = measure(cluster, demo_entrypoint(str(out), str(tmp_path / "data")), group="cpu", job_timeout=360)
        recorded = list(cluster._procs)
    finally:
        cluster.stop()
    report = {k: v for k, v in timeline.items() if k not in ("samples", "logs_tail")}
    print("autoscaling timeline:", json.dumps(report))
    for k in ("first_worker_s", "peak_s", "job_end_s", "back_to_min_s", "scale_down_after_job_s", "peak_workers"):
        record_property(k, report[k])
    (tmp_path / "timeline.json").write_text(json.dumps(timeline, indent=2))
    assert timeline["status"] == "SUCCEEDED", timeline["logs_tail"]
    assert timeline["workers_at_submit"] == cpu["minReplicas"] == 0
    assert 1 <= timeline["peak_workers"] <= cpu["maxReplicas"]
    assert timeline["first_worker_s"] < timeline["job_end_s"]
    assert timeline["back_to_min_s"] is not None, "the cpu group did not shrink back to minReplicas"
    idle = cr["spec"]["autoscalerOptions"]["idleTimeoutSeconds"]
    assert timeline["scale_down_after_job_s"] <= idle + 60
    assert json.loads((out / "metrics.json").read_text())["history"]
    # stop() ended exactly what start() started
    assert not any(psutil.pid_exists(pid) and abs(psutil.Process(pid).create_time() - t) < 1e-3
                   for pid, t in recorded)
