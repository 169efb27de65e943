"""The torch process group of a training run, with its rendezvous store bound to the node's
address instead of every interface.

Ray Train's own torch backend lets rank 0's ``TCPStore`` open its server socket, and torch binds
that socket to all interfaces (``*:PORT``). A store anyone on the network can reach accepts
arbitrary keys from anyone: on a laptop or a shared machine that is an open port for no reason.
Here rank 0 binds the socket itself, to the address Ray knows the node by (127.0.0.1 on the local
clusters this project starts; the pod's address on a real cluster), and hands it to a
``TCPStore`` server. ``init_process_group`` then reuses that server: torch's ``env://`` store is
multi-tenant, and a multi-tenant store finds the server already running on its port in the same
process.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

# Rank 0's store server and its socket: alive for as long as the worker process.
_SERVER: tuple | None = None


def _start_store() -> tuple[str, int]:
    import ray
    import torch.distributed as dist

    global _SERVER
    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((addr, 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    store = dist.TCPStore(addr, port, is_master=True, multi_tenant=True, master_listen_fd=sock.fileno(),
                          use_libuv=True, wait_for_workers=False)
    _SERVER = (sock, store)
    return addr, port


def _join(backend: str, world_rank: int, world_size: int, addr: str, port: int, timeout_s: int) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    dist.init_process_group(backend=backend, init_method="env://", rank=world_rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


class _NodeBoundBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "NodeBoundTorchConfig") -> None:
        import ray
        from ray.train.torch.config import _set_torch_distributed_env_vars

        addr, port = worker_group.execute_single(0, _start_store)
        # RANK, LOCAL_RANK, WORLD_SIZE, ... as Ray Train's own backend sets them
        worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        # (execute_single_async's own first parameter is called rank: hence world_rank)
        ray.get([worker_group.execute_single_async(i, _join, backend=backend_config.backend, world_rank=i,
                                                   world_size=n, addr=addr, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(n)])


class NodeBoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on the node's address only."""

    @property
    def backend_cls(self):
        return _NodeBoundBackend
