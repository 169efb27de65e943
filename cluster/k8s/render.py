"""Render the kustomizations under cluster/k8s/ into a list of manifests, offline.

    python cluster/k8s/render.py overlays/gpu          # YAML on stdout, like `kubectl kustomize`
    python cluster/k8s/render.py overlays/dev --check  # and compare with `kubectl kustomize`

``kubectl kustomize DIR`` is the renderer of record (``kubectl apply -k`` uses it). This module
re-implements the few kustomize features the manifests here use, so that the tests and
``serve_config.py`` work on a machine without kubectl; where kubectl is installed the tests
check that both renderers agree on every overlay. Supported, in kustomize's order:

* ``resources`` (files and kustomization directories), then ``components`` (each applying its
  own transformers), then this kustomization's ``patches`` (RFC 6902 JSON patches only: add,
  remove, replace), ``namespace``, ``images`` (every ``containers``/``initContainers`` list, in
  any kind, as kustomize does), ``replacements`` (whole fields, dotted paths, ``create``).

Anything else (a strategic-merge patch, generators, labels) is an error, not silently ignored.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parent
KNOWN_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "namespace", "images", "replacements"}


class RenderError(ValueError):
    """A kustomization this renderer cannot render; the message names the file and the field."""


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The manifests ``kubectl kustomize DIRECTORY`` would print, as dicts, in resource order."""
    return _build(_resolve(directory), component=False)


def _resolve(directory: str | Path) -> Path:
    d = Path(directory)
    return (d if d.is_absolute() else K8S_DIR / d).resolve()


def _load_kustomization(d: Path) -> dict[str, Any]:
    path = d / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{d}: no kustomization.yaml")
    k = yaml.safe_load(path.read_text()) or {}
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise RenderError(f"{path}: fields {sorted(unknown)} are not supported by this renderer "
                          "(use kubectl kustomize, or extend render.py and its kubectl comparison)")
    return k


def _build(d: Path, component: bool) -> list[dict[str, Any]]:
    k = _load_kustomization(d)
    kind = k.get("kind", "Kustomization")
    if (kind == "Component") != component:
        raise RenderError(f"{d}/kustomization.yaml: kind {kind} used as a {'component' if component else 'kustomization'}")
    docs: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        p = (d / entry).resolve()
        if p.is_dir():
            docs += _build(p, component=False)
        else:
            docs += [doc for doc in yaml.safe_load_all(p.read_text()) if doc is not None]
    for entry in k.get("components", []):
        docs = _apply_component((d / entry).resolve(), docs)
    return _transform(d, k, docs)


def _apply_component(d: Path, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    k = _load_kustomization(d)
    if k.get("kind") != "Component":
        raise RenderError(f"{d}/kustomization.yaml: not a Component")
    if k.get("resources") or k.get("components"):
        raise RenderError(f"{d}/kustomization.yaml: components with resources are not supported")
    return _transform(d, k, docs)


def _transform(d: Path, k: dict[str, Any], docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    docs = copy.deepcopy(docs)
    for patch in k.get("patches", []):
        ops = _patch_ops(d, patch)
        target = patch.get("target") or {}
        hits = [doc for doc in docs if _matches(doc, target)]
        if not hits:
            raise RenderError(f"{d}/kustomization.yaml: patch target {target} matches no resource")
        for doc in hits:
            _json_patch(doc, ops, where=f"{d.name}: patch on {doc['kind']}/{doc['metadata']['name']}")
    if "namespace" in k:
        for doc in docs:
            doc.setdefault("metadata", {})["namespace"] = k["namespace"]
    for image in k.get("images", []):
        for doc in docs:
            _retag(doc, image)
    for rep in k.get("replacements", []):
        _replace(docs, rep, where=f"{d}/kustomization.yaml")
    return docs


def _patch_ops(d: Path, patch: dict[str, Any]) -> list[dict[str, Any]]:
    text = (d / patch["path"]).read_text() if "path" in patch else patch.get("patch", "")
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise RenderError(f"{d}: only RFC 6902 (list of operations) patches are supported, got {patch}")
    return ops


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    unknown = set(target) - {"kind", "name"}
    if unknown:
        raise RenderError(f"patch/replacement selector fields {sorted(unknown)} are not supported")
    if "kind" in target and doc.get("kind") != target["kind"]:
        return False
    return "name" not in target or doc.get("metadata", {}).get("name") == target["name"]


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json_patch(doc: dict[str, Any], ops: list[dict[str, Any]], where: str) -> None:
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
            if node is None:
                raise RenderError(f"{where}: {op['op']} {op['path']}: parent does not exist")
        kind = op["op"]
        if kind not in ("add", "remove", "replace"):
            raise RenderError(f"{where}: op {kind!r} is not supported")
        if isinstance(node, list):
            if kind == "add":
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            elif kind == "remove":
                del node[int(last)]
            else:
                node[int(last)] = copy.deepcopy(op["value"])
        else:
            if kind in ("remove", "replace") and last not in node:
                raise RenderError(f"{where}: {kind} {op['path']}: no such member")
            if kind == "remove":
                del node[last]
            else:
                node[last] = copy.deepcopy(op["value"])


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    name, tag = image, None
    if ":" in image.rsplit("/", 1)[-1]:
        name, tag = image.rsplit(":", 1)
    return name, tag, digest


def _retag(node: Any, image: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and isinstance(c.get("image"), str):
                        name, tag, digest = _split_image(c["image"])
                        if name == image["name"]:
                            name = image.get("newName", name)
                            if "digest" in image:
                                c["image"] = f"{name}@{image['digest']}"
                            else:
                                tag = image.get("newTag", tag)
                                c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
            _retag(value, image)
    elif isinstance(node, list):
        for v in node:
            _retag(v, image)


def _get(doc: dict[str, Any], dotted: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise RenderError(f"{doc['kind']}/{doc['metadata']['name']}: no field {dotted}")
        node = node[part]
    return node


def _set(doc: dict[str, Any], dotted: str, value: Any, create: bool) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for part in parents:
        if part not in node:
            if not create:
                raise RenderError(f"{doc['kind']}/{doc['metadata']['name']}: no field {dotted}")
            node[part] = {}
        node = node[part]
    if last not in node and not create:
        raise RenderError(f"{doc['kind']}/{doc['metadata']['name']}: no field {dotted} (set options.create)")
    node[last] = copy.deepcopy(value)


def _replace(docs: list[dict[str, Any]], rep: dict[str, Any], where: str) -> None:
    src = rep["source"]
    sources = [doc for doc in docs if _matches(doc, {k: src[k] for k in ("kind", "name") if k in src})]
    if len(sources) != 1:
        raise RenderError(f"{where}: replacement source {src} matches {len(sources)} resources, not 1")
    value = _get(sources[0], src.get("fieldPath", "metadata.name"))
    for target in rep["targets"]:
        hits = [doc for doc in docs if _matches(doc, target["select"])]
        for doc in hits:
            for path in target["fieldPaths"]:
                _set(doc, path, value, bool(target.get("options", {}).get("create")))


def kubectl_available() -> bool:
    return shutil.which("kubectl") is not None


def render_kubectl(directory: str | Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY``, parsed (FileNotFoundError without kubectl)."""
    if not kubectl_available():
        raise FileNotFoundError("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(_resolve(directory))], capture_output=True, check=False,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory} failed: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]


def by_key(docs: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Manifests keyed by (kind, name): kustomize sorts its output, this renderer keeps file order."""
    out = {}
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        if key in out:
            raise RenderError(f"two resources {key}")
        out[key] = doc
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="a kustomization directory, relative to cluster/k8s/ or absolute")
    p.add_argument("--check", action="store_true", help="also render with kubectl and compare")
    args = p.parse_args(argv)
    docs = render(args.directory)
    if args.check:
        theirs = by_key(render_kubectl(args.directory))
        if by_key(docs) != theirs:
            print(json.dumps({"render.py": sorted(map(list, by_key(docs))), "kubectl": sorted(map(list, theirs))}),
                  file=sys.stderr)
            print("render.py and kubectl kustomize disagree", file=sys.stderr)
            return 1
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
