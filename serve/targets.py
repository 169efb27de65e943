"""Where an application takes HTTP traffic: the Serve proxies, or, under Ray Serve's direct
ingress, the ingress replicas' own ports (what a load balancer in front should target).

    python -m serve.targets                 # on a node of the cluster: one URL per line
    python -m serve.targets --app dcgh --address 127.0.0.1:6379

By default every request goes through the HTTP proxy (``http_options.port``, 8000). With
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (or ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``) in the
environment of every Ray node, each ``Frontend`` replica also serves HTTP itself, on a port the
controller allocates (30000 and up), and the proxy runs on the head node only: requests sent to
a replica's port skip the proxy hop and the second call for the request body (docs/SERVE.md,
"Latency"). The controller publishes these targets; this reads them.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def http_targets(app: str | None = None) -> list[str]:
    """``http://ip:port`` of every target of the HTTP routes of ``app`` (default: every
    application), from the Serve controller of the cluster ``ray.init`` joined. The proxies
    unless direct ingress is on; then the ingress replicas."""
    # The controller's instance details are what the dashboard's GET /api/serve/applications/
    # answers (its target_groups); the client call reads them without needing the dashboard.
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    # A target's ip is its node's address, but its server binds http_options.host: where that
    # names one address (127.0.0.1 on a local cluster), the target answers there and only there.
    bound = (details.get("http_options") or {}).get("host") or ""
    urls = []
    for group in details.get("target_groups", []):
        protocol = getattr(group.get("protocol"), "value", group.get("protocol"))
        if (app is not None and group.get("app_name") not in ("", app)) or str(protocol).upper() != "HTTP":
            continue
        for t in group["targets"]:
            ip = bound if bound not in ("", "0.0.0.0", "::") else t["ip"]
            urls.append(f"http://{f'[{ip}]' if ':' in ip else ip}:{t['port']}")
    return sorted(set(urls))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--app", help="one Serve application (default: all; serve/config.yaml's is dcgh)")
    p.add_argument("--address", default="auto", help="Ray cluster to join (default: the one on this node)")
    args = p.parse_args(argv)
    import ray

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    try:
        urls = http_targets(args.app)
    finally:
        ray.shutdown()
    if not urls:
        raise SystemExit(f"no HTTP targets for {f'application {args.app!r}' if args.app else 'any application'}: "
                         "is one running?")
    print("\n".join(urls))


if __name__ == "__main__":
    main()
