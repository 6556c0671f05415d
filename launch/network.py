"""Which network interface a node's ranks talk on, and where node 0 is.

gloo (and NCCL's bootstrap) pick the address each rank advertises to its
peers from the machine's hostname unless ``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME`` name an interface. Where the hostname resolves to
``127.0.0.1`` (many images and clusters: an ``/etc/hosts`` line for it), a
rank on another node is told to connect to 127.0.0.1: it fails in seconds
("Connection refused, remote=[127.0.0.1]") while the rank it tried to reach
waits for the full timeout. The interface that matters is the one that
reaches the master address, so :func:`interface_to` asks the kernel's
routing for it: a UDP socket "connected" to the master (no packet is sent)
has the local address the route chose, and that address belongs to one
interface.

Linux only (``SIOCGIFADDR`` and ``/proc/net/if_inet6``); elsewhere it
finds nothing and the environment is left as it was.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from typing import Optional

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915


def resolve(host: str) -> Optional[str]:
    """The first address ``host`` resolves to, or None."""
    try:
        return socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except (socket.gaierror, UnicodeError, IndexError, ValueError):
        return None


def is_loopback(host: str) -> bool:
    address = resolve(host)
    return address is None or ipaddress.ip_address(address.split("%")[0]).is_loopback


def local_address_to(host: str) -> Optional[str]:
    """The local address the kernel would send from to reach ``host``; None when there is no route."""
    address = resolve(host)
    if address is None:
        return None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 9))  # UDP: picks the route and source address, sends nothing
        except OSError:
            return None
        return sock.getsockname()[0]


def interface_addresses() -> dict[str, list[str]]:
    """Interface name -> its IPv4 and IPv6 addresses."""
    found: dict[str, list[str]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                found.setdefault(name, []).append(socket.inet_ntoa(packed[20:24]))
            except OSError:
                found.setdefault(name, [])
    try:
        with open("/proc/net/if_inet6") as fp:
            for line in fp:
                fields = line.split()
                if len(fields) >= 6:
                    raw = fields[0]
                    text = str(ipaddress.IPv6Address(int(raw, 16)))
                    found.setdefault(fields[5], []).append(text)
    except (OSError, ValueError):
        pass
    return found


def interface_to(host: str) -> Optional[str]:
    """The name of the interface whose address this machine uses to reach ``host`` (None if unknown)."""
    local = local_address_to(host)
    if local is None:
        return None
    local = str(ipaddress.ip_address(local.split("%")[0]))
    for name, addresses in interface_addresses().items():
        if local in addresses:
            return name
    return None


def interface_exists(name: str) -> bool:
    return any(known == name for _, known in socket.if_nameindex())


def socket_ifname_settings(master_addr: Optional[str], chosen: Optional[str], env: dict) -> tuple[dict, Optional[str]]:
    """(variables to set, a note for the user) for the ranks of a multi-node job.

    ``chosen`` (``--network-interface``) wins; else a variable the user set
    is kept; else the interface that reaches ``master_addr``. A master on
    loopback (one machine) needs nothing.
    """
    if chosen:
        return {name: chosen for name in SOCKET_IFNAME_VARS}, None
    missing = [name for name in SOCKET_IFNAME_VARS if not env.get(name)]
    if not missing or not master_addr or is_loopback(master_addr):
        return {}, None
    name = interface_to(master_addr)
    if name is None:
        return {}, (f"no interface found that reaches --master-addr {master_addr}; gloo will advertise the address "
                    "the hostname resolves to (pass --network-interface IFACE if ranks cannot connect)")
    return {var: name for var in missing}, f"network interface {name} (the route to {master_addr})"


def answers(host: str, timeout_s: float = 3.0) -> bool:
    """Whether ``host`` answers a TCP connection attempt from this machine within ``timeout_s``.

    Any answer counts, a refusal included (a host up with nothing on the port sends a reset); silence (the
    attempt times out) or no route (a link that is down) does not. Port 9 (discard) is used, normally closed.
    A firewall that drops such packets makes a live host look silent, so callers say "does not answer", not
    "is down".
    """
    address = resolve(host)
    if address is None:
        return False
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect((address, 9))
        except (ConnectionRefusedError, ConnectionResetError):
            return True
        except OSError:  # timed out, no route to host, network unreachable
            return False
    return True
