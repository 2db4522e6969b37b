"""Where the recipe's Ray cluster is, checked before anything is started on it (no Ray import here).

`ray.init(address=...)` on an address where no Ray cluster answers retries for ever (every ~30 s)
while its C++ client blocks the main thread, so neither Ctrl-C nor SIGTERM gets through. So the
address is checked first, before the first stage runs (`r1pipe run`) and again when a stage joins
(r1pipe.workers.cluster.ray_init): the bootstrap host:port (`cluster.address`, else RAY_ADDRESS) must
accept a TCP connection within CONNECT_TIMEOUT_S, or a ClusterError names the address.
"""
from __future__ import annotations

import os
import socket
from typing import Any

from r1pipe.errors import ClusterError

CONNECT_TIMEOUT_S = 5.0  # one TCP connection attempt to the cluster's bootstrap address
HINT = "start one with `ray start --head`, or leave cluster.address unset for a local instance"


def split_host_port(address: str) -> tuple[str, int] | None:
    """('host', port) of 'host:port', 'ray://host:port' or '[v6]:port'; None when there is no port."""
    text = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def explicit_address(cluster: Any) -> tuple[str, str] | None:
    """(address, the setting that gave it) when Ray would join a given host:port: `cluster.address`
    (not "auto" / "local"), else RAY_ADDRESS when cluster.address is unset or "auto"; else None."""
    address = (cluster or {}).get("address")
    if address == "local":
        return None
    if address and address != "auto":
        return str(address), "cluster.address"
    env = os.environ.get("RAY_ADDRESS")
    return (env, "RAY_ADDRESS") if env else None


def check_reachable(address: str, key: str = "cluster.address", timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A ClusterError naming `key` and the address unless its host:port accepts a TCP connection."""
    hp = split_host_port(address)
    if hp is None:
        raise ClusterError(f"{key}={address}: not a host:port address (or 'auto' for the cluster of `ray start`)")
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except socket.timeout:
        raise ClusterError(f"{key}={address}: no Ray cluster answers there (no reply within {timeout_s:g}s); {HINT}") from None
    except OSError as e:
        why = (e.strerror or type(e).__name__).lower()
        raise ClusterError(f"{key}={address}: no Ray cluster answers there ({why}); {HINT}") from None


def check_cluster(cluster: Any) -> None:
    """check_reachable for the address Ray would join (nothing to check for a local instance, or for
    "auto" without RAY_ADDRESS: ray_init resolves that one through Ray)."""
    given = explicit_address(cluster)
    if given is not None:
        check_reachable(*given)
