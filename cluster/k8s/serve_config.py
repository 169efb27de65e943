"""Generate the RayService's serveConfigV2 from serve/config.yaml: one source of truth.

    python cluster/k8s/serve_config.py           # rewrite every serve-config.patch.yaml
    python cluster/k8s/serve_config.py --check   # exit 1 if one is stale (the tests do this too)

For each kustomization (``base``, ``overlays/dev``, ``overlays/gpu``) the application's settings
are those of ``serve/config.yaml``, with the cluster's own values laid over them: first
``base/serve-overrides.yaml``, then the overlay's ``serve-overrides.yaml`` if it has one. An
override names an application by its name (``applications: {dcgh: {...}}``); an override for an
application serve/config.yaml does not have is an error. ``${VAR}`` in an override is the value
of VAR in the ConfigMap dcgh-storage as that kustomization renders it (bucket, endpoint, run), so
the endpoint reads the same S3 prefixes the RayJobs write.

The result goes into ``<kustomization>/serve-config.patch.yaml``, an RFC 6902 patch on the
RayService that sets ``spec.serveConfigV2`` and stamps the model run (DCGH_RUN) on the head pod
template: a new model changes the cluster spec, which makes KubeRay bring the new model up on a
new cluster and switch traffic only once it serves (see docs/DEPLOY.md).
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parent
REPO = K8S_DIR.parents[1]
SOURCE = REPO / "serve" / "config.yaml"
CONFIGMAP = "dcgh-storage"
RUN_ANNOTATION = "dcgh.io/model-run"
PATCH_FILE = "serve-config.patch.yaml"
OVERRIDES_FILE = "serve-overrides.yaml"
# kustomization -> (override layers, the kustomization that renders its ConfigMap)
TARGETS: dict[str, tuple[tuple[str, ...], str]] = {
    "base": (("base",), "base/cluster"),
    "overlays/dev": (("base", "overlays/dev"), "overlays/dev/cluster"),
    "overlays/gpu": (("base", "overlays/gpu"), "overlays/gpu/cluster"),
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _shown(path: Path) -> str:
    """A path as the generated file names it: relative to the repository when inside it."""
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def source_config() -> dict[str, Any]:
    return yaml.safe_load(SOURCE.read_text())


def override_layers(target: str) -> list[tuple[Path, dict[str, Any]]]:
    """(file, overrides) for each layer of ``target`` that has a serve-overrides.yaml."""
    layers = []
    for layer in TARGETS[target][0]:
        path = K8S_DIR / layer / OVERRIDES_FILE
        if path.is_file():
            layers.append((path, yaml.safe_load(path.read_text()) or {}))
    return layers


def storage_values(target: str) -> dict[str, str]:
    """The data of the ConfigMap dcgh-storage as ``target`` renders it."""
    sys.path.insert(0, str(K8S_DIR))
    from render import render

    maps = [d for d in render(TARGETS[target][1]) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIGMAP]
    if len(maps) != 1:
        raise ValueError(f"{TARGETS[target][1]}: expected one ConfigMap {CONFIGMAP}, found {len(maps)}")
    return dict(maps[0].get("data") or {})


def substitute(value: Any, env: dict[str, str], where: str) -> Any:
    """``${VAR}`` in every string of ``value`` replaced from ``env``; an unknown VAR is an error."""
    if isinstance(value, dict):
        return {k: substitute(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def repl(m: re.Match) -> str:
            if m.group(1) not in env:
                raise ValueError(f"{where}: ${{{m.group(1)}}} is not a key of the ConfigMap {CONFIGMAP} ({sorted(env)})")
            return env[m.group(1)]
        return _VAR.sub(repl, value)
    return value


def merge(base: Any, over: Any, where: str = "") -> Any:
    """``over`` laid over ``base``: mappings merge key by key, anything else is replaced;
    ``applications`` (a list in Serve's schema) is overridden by application name."""
    if where == "applications":
        if not isinstance(over, dict):
            raise ValueError(f"{OVERRIDES_FILE}: applications must map an application name to its overrides")
        apps = copy.deepcopy(base)
        names = [a["name"] for a in apps]
        for name, app_over in over.items():
            if name not in names:
                raise ValueError(f"{OVERRIDES_FILE}: application {name!r} is not in {_shown(SOURCE)} "
                                 f"(it has {names})")
            i = names.index(name)
            apps[i] = merge(apps[i], app_over, f"applications.{name}")
        return apps
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            key = f"{where}.{k}" if where else k
            out[k] = merge(out[k], v, key) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def effective_config(target: str) -> dict[str, Any]:
    """serveConfigV2 of ``target``, as a dict."""
    env = storage_values(target)
    config = source_config()
    for path, overrides in override_layers(target):
        config = merge(config, substitute(overrides, env, path.relative_to(K8S_DIR).as_posix()))
    return config


class _Literal(str):
    pass


def _literal(dumper: yaml.SafeDumper, s: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(s), style="|")


def render_patch(target: str) -> str:
    layers = [_shown(p) for p in [SOURCE, *(p for p, _ in override_layers(target))]]
    serve = yaml.safe_dump(effective_config(target), sort_keys=False, width=1000)
    ops = [
        {"op": "add", "path": "/spec/serveConfigV2", "value": _Literal(serve)},
        {"op": "add", "path": "/spec/rayClusterConfig/headGroupSpec/template/metadata/annotations",
         "value": {RUN_ANNOTATION: storage_values(target)["DCGH_RUN"]}},
    ]
    dumper = type("D", (yaml.SafeDumper,), {})
    dumper.add_representer(_Literal, _literal)
    body = yaml.dump(ops, Dumper=dumper, sort_keys=False, width=1000)
    header = (
        "# Generated by cluster/k8s/serve_config.py: do not edit. Change the sources and rerun it:\n"
        + "".join(f"#   {layer}\n" for layer in layers)
        + f"#   ${{VAR}}: the ConfigMap {CONFIGMAP} of cluster/k8s/{TARGETS[target][1]}\n"
    )
    return header + body


def patch_path(target: str) -> Path:
    return K8S_DIR / target / PATCH_FILE


def stale() -> list[str]:
    """The generated patches that differ from what the sources give now."""
    return [t for t in TARGETS if not patch_path(t).is_file() or patch_path(t).read_text() != render_patch(t)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check; exit 1 if a patch is stale")
    args = p.parse_args(argv)
    if args.check:
        bad = stale()
        for t in bad:
            print(f"{patch_path(t).relative_to(REPO)} is stale: run python cluster/k8s/serve_config.py",
                  file=sys.stderr)
        return 1 if bad else 0
    for t in TARGETS:
        patch_path(t).write_text(render_patch(t))
        print(f"wrote {patch_path(t).relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
