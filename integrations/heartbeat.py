"""Name the rank that held a collective up when one times out.

A collective that times out fails on the ranks that waited, and their error
("Timed out waiting 6000ms for recv operation") names neither the rank that
never arrived nor why. The launcher then reports a waiting rank as the
failure, and the hung rank, stopped by the launcher, looks like a victim.

So every rank posts the step it begins to the job's key-value store (the
``c10d`` store torch.distributed rendezvoused on; one small ``set`` per
step). A rank whose collective times out reads every rank's post and raises
:class:`CollectiveTimeout`: which ranks never began this step (hung, or far
slower), or, when all did, that they are stuck inside it. The store is
served by a thread of rank 0 or of the torchrun agent, so it answers while a
rank's Python is blocked.

Every store call here has a deadline of its own (:data:`STORE_DEADLINE_S`),
enforced by waiting on a helper thread, not by the store's timeout: a
``TCPStore`` client's timeout bounds how long the *server* waits for a key,
but a request whose peer is unreachable (a network partition: no reset, no
answer) waits in the socket until TCP gives up, minutes later. A rank on
the far side of a partition then says that node 0's store did not answer,
instead of hanging in its explanation.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Callable, Optional

import torch.distributed as dist

KEY = "zeromega/heartbeat/{rank}"
NODE_ADDR_ENV = "ZEROMEGA_NODE_ADDR"
"""This node's address, set by ``zeromega launch`` for multi-node jobs: posted with each step, so a peer that
closed its connection (an address in gloo's error) is named as its ranks and node."""
STORE_DEADLINE_S = 10.0
"""Longest wait for one store call (a healthy store answers in milliseconds)."""


class StoreUnreachable(RuntimeError):
    """The job's store did not answer within the deadline."""


class CollectiveTimeout(RuntimeError):
    """A collective outlived the configured timeout; the message names the ranks that held it up."""


def _store():
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def bounded(call: Callable, seconds: float = STORE_DEADLINE_S):
    """``call()``'s result, or :class:`StoreUnreachable` when it has not returned after ``seconds``.

    The call runs on a daemon thread (store calls release the GIL), which is left behind if it hangs.
    """
    result: dict = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as err:  # handed to the caller
            result["error"] = err

    thread = threading.Thread(target=run, name="zeromega-store-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise StoreUnreachable(f"the store did not answer within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


_unreachable = threading.Event()  # set once a call timed out: later posts do not wait again


def post(step: int) -> None:
    """Record that this rank begins ``step`` (best effort: a store that is gone must not fail the step)."""
    store = _store()
    if store is None or dist.get_world_size() == 1 or _unreachable.is_set():
        return
    try:
        host = os.environ.get(NODE_ADDR_ENV, "")
        bounded(lambda: store.set(KEY.format(rank=dist.get_rank()), f"{step} {time.time():.3f} {host}".rstrip()))
    except StoreUnreachable:
        _unreachable.set()
    except (RuntimeError, OSError):
        pass


def posts(deadline_s: float = STORE_DEADLINE_S) -> dict[int, Optional[tuple]]:
    """rank -> (last step begun, seconds since, node address or ""), None for a rank that posted nothing.

    Raises :class:`StoreUnreachable` when the store does not answer within ``deadline_s`` in all.
    """
    store, now, world = _store(), time.time(), dist.get_world_size()
    if store is None:
        return {rank: None for rank in range(world)}

    def read_all():
        seen = {}
        for rank in range(world):
            key = KEY.format(rank=rank)
            try:
                if not store.check([key]):
                    seen[rank] = None
                    continue
                step, stamp, *host = store.get(key).decode().split()
                seen[rank] = (int(step), now - float(stamp), host[0] if host else "")
            except (RuntimeError, OSError, ValueError):
                seen[rank] = None
        return seen

    return bounded(read_all, deadline_s)


def _node(rank: int) -> Optional[int]:
    """The node a rank runs on (launchers number ranks node by node), when the launcher said how many per node."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return rank // per_node if per_node > 0 else None


def _who(rank: int) -> str:
    node = _node(rank)
    return f"rank {rank}" + (f" on node {node}" if node is not None and _node(dist.get_world_size() - 1) else "")


_PEER_LOST = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe")


def is_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed for want of a peer: it timed out, or a peer's
    connection closed or reset (a node that died; gloo and NCCL word these differently)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(words in text for words in _PEER_LOST)


EVIDENCE_SUFFIX = ".evidence.json"
"""Beside the rank's ``TORCHELASTIC_ERROR_FILE``: what :func:`explain` saw, for the launcher to name the lost node."""


def _write_evidence(step: int, seen: Optional[dict], peer: Optional[str], store_unreachable: bool,
                    lost: bool) -> None:
    """Leave the launcher the facts behind the explanation (best effort): every rank's last post with its node's
    address, the peer whose connection closed, whether the store answered."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return
    facts = {"rank": dist.get_rank(), "world": dist.get_world_size(), "step": step,
             "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0),
             "node_addr": os.environ.get(NODE_ADDR_ENV, ""), "master_addr": os.environ.get("MASTER_ADDR", ""),
             "peer": peer, "lost_peer": lost, "store_unreachable": store_unreachable,
             "posts": None if seen is None else {str(r): (list(p) if p else None) for r, p in seen.items()}}
    try:
        with open(error_file + EVIDENCE_SUFFIX, "w") as fp:
            json.dump(facts, fp)
    except OSError:
        pass


def explain(err: BaseException, step: int, timeout_minutes: Optional[float] = None) -> CollectiveTimeout:
    """The :class:`CollectiveTimeout` for ``err``, raised by this rank during ``step``."""
    lost = "timed out" not in str(err).lower() and "timeout" not in str(err).lower()
    what = "lost a peer" if lost else "timed out"
    limit = "" if lost or not timeout_minutes else f" after {timeout_minutes * 60:g} s (launch.distributed_timeout_minutes)"
    seen = None
    try:
        seen = posts()
    except StoreUnreachable as unreachable:
        where = os.environ.get("MASTER_ADDR")
        node0 = "node 0" + (f" ({where})" if where else "")
        cause = (f"{unreachable}: this node lost {node0}, which holds rank 0 and the job's store "
                 "(network partition, or node 0 is down)")
    else:
        behind = {r: p for r, p in seen.items() if p is None or p[0] < step}
        if behind:
            who = "; ".join(f"{_who(r)} " + ("never began a step" if p is None else
                                            f"last began step {p[0]}, {p[1]:.0f} s ago")
                            for r, p in sorted(behind.items()))
            cause = (f"rank(s) {', '.join(map(str, sorted(behind)))} never reached step {step}: {who} "
                     "(hung, dead or far slower)")
        else:
            cause = f"every rank began step {step}, so one is stuck inside it or the ranks called different collectives"
            if _node(dist.get_world_size() - 1):
                cause += ", or the network between the nodes is cut"
    # gloo: "Connection closed by peer [ADDR]:PORT", "Read error [ADDR]:PORT: Connection reset by peer"
    peer = (re.search(r"peer \[?([0-9A-Za-z_.:-]+?)\]?:\d+", str(err))
            or re.search(r"\[([0-9A-Za-z_.:-]+?)\]:\d+", str(err)))
    if lost and peer:
        there = sorted(r for r, p in (seen or {}).items() if p and p[2] == peer.group(1))
        ranks = f" ({', '.join(_who(r) for r in there)})" if there else ""
        lost_line = f"the connection to {peer.group(1)}{ranks} closed: that node died or its ranks did"
        cause = lost_line if cause.startswith("every rank began") else f"{lost_line}; {cause}"
    _write_evidence(step, seen, peer.group(1) if lost and peer else None, seen is None, lost)
    first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return CollectiveTimeout(f"{_who(dist.get_rank())}: a collective of step {step} {what}{limit}; {cause}. "
                             f"({first_line})")
