"""Where an application takes HTTP traffic: the Serve proxies, or, under Ray Serve's direct
ingress, the ingress replicas' own ports (what a load balancer in front should target).

    python -m serve.targets                 # on a node of the cluster: one URL per line
    python -m serve.targets --app dcgh --address 127.0.0.1:6379

By default every request goes through the HTTP proxy (``http_options.port``, 8000). With
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (or ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``) in the
environment of every Ray node, each ``Frontend`` replica also serves HTTP itself, on a port the
controller allocates (30000-31000), and the proxy runs on the head node only: requests sent to
a replica's port skip the proxy hop and the second call for the request body (docs/SERVE.md,
"Latency"). The controller publishes these targets; this reads them.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def http_targets(app: str | None = None, details: dict | None = None) -> list[str]:
    """``http://host:port[/prefix]`` of every target of the HTTP routes of ``app`` (default:
    every application), from the Serve controller of the cluster ``ray.init`` joined (or from
    ``details``, its instance details). The proxies unless direct ingress is on; then the
    ingress replicas. Empty if ``app`` is not running."""
    if details is None:
        # What the dashboard's GET /api/serve/applications/ answers (its target_groups), read
        # from the controller without needing the dashboard.
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
    if app is not None and app not in details.get("applications", {}):
        return []
    # A target's ip is its node's address, but its server binds http_options.host: where that
    # names one address (127.0.0.1 on a local cluster), the target answers there and only there.
    # The controller leaves out options nobody set, so an absent host is Serve's default.
    from ray.serve.config import HTTPOptions

    bound = (details.get("http_options") or {}).get("host") or HTTPOptions.model_fields["host"].default
    urls = []
    for group in details.get("target_groups", []):
        protocol = getattr(group.get("protocol"), "value", group.get("protocol"))
        if (app is not None and group.get("app_name") not in ("", app)) or str(protocol).upper() != "HTTP":
            continue
        prefix = (group.get("route_prefix") or "/").rstrip("/")
        for t in group["targets"]:
            ip = t["ip"] if bound in ("0.0.0.0", "::") else bound
            urls.append(f"http://{f'[{ip}]' if ':' in ip else ip}:{t['port']}{prefix}")
    return sorted(set(urls))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--app", help="one Serve application (default: all; serve/config.yaml's is dcgh)")
    p.add_argument("--address", default="auto", help="Ray cluster to join (default: the one on this node)")
    args = p.parse_args(argv)
    import ray

    from ray.serve.exceptions import RayServeException

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    try:
        urls = http_targets(args.app)
    except RayServeException as e:  # no Serve controller in this cluster
        raise SystemExit(f"Ray Serve is not running in this cluster ({e})") from e
    finally:
        ray.shutdown()
    if not urls:
        raise SystemExit(f"no HTTP targets for {f'application {args.app!r}' if args.app else 'any application'}: "
                         "is one running?")
    print("\n".join(urls))


if __name__ == "__main__":
    main()
