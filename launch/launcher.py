"""Start a job's ranks through a real launcher and turn a failure into one line.

Two launchers, no process transport of our own:

* ``torchrun`` (default): torch's elastic agent, driven in this process through
  ``torch.distributed.run.parse_args``/``run``. In-process because the agent
  then hands us its structured result (``ChildFailedError.failures``: rank,
  exit code or signal, the rank's error file) instead of a text report to
  parse, and its own signal handlers stop every rank on SIGINT/SIGTERM.
* ``deepspeed``: the ``deepspeed`` runner as a subprocess
  (``python -m deepspeed.launcher.runner --num_gpus N --master_port P ...``).
  It reports only an exit code, never which rank failed, so each rank is
  started through :func:`_rank_entry`, which gives the rank its own
  ``TORCHELASTIC_ERROR_FILE`` and then ``exec``\\ s the script (same pid).

Environment every rank sees:

``ZEROMEGA_CONFIG``
    Absolute path of the ``--config`` file, set only when one was given (an
    inherited value is dropped, so a rank never reads a config the launcher
    did not check). Ranks read it with :func:`config_path_from_env`.
``OMP_NUM_THREADS``
    ``1`` when unset and more than one rank runs per node (torchrun's rule,
    applied to the deepspeed launcher too, so ranks do not oversubscribe).
``DS_ACCELERATOR``
    ``cpu`` when unset and torch sees no CUDA device (deepspeed launcher only).

Ranks that want their exception named in the launcher's failure line decorate
their entry point with ``torch.distributed.elastic.multiprocessing.errors.record``.

This module imports torch and deepspeed lazily: it also runs as every
deepspeed rank's entry (``python -m zeromega.launch.launcher``), which must
stay cheap.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

CONFIG_ENV = "ZEROMEGA_CONFIG"
# Seconds a stopped deepspeed job gets to exit after SIGTERM before SIGKILL
# (its launcher waits up to 30 s per rank itself).
STOP_GRACE_S = 35.0
_MESSAGE_LIMIT = 500
# The hostfile the deepspeed runner reads when given none (its DLTS_HOSTFILE).
DEEPSPEED_DEFAULT_HOSTFILE = "/job/hostfile"
# torchrun's and deepspeed's port when none is given (TORCH_DISTRIBUTED_DEFAULT_PORT).
DEFAULT_PORT = 29500


def config_path_from_env() -> Optional[str]:
    """The config path the launcher handed this rank, or None when it was given none."""
    return os.environ.get(CONFIG_ENV) or None


@dataclass(frozen=True)
class Job:
    """What to start; the CLI has already checked every field."""

    script: str
    script_args: list[str] = field(default_factory=list)
    nproc_per_node: Optional[int] = 1
    nnodes: int = 1
    """Nodes in the job (the largest count when elastic)."""
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    max_restarts: int = 0
    config: Optional[str] = None
    """Absolute path, exported to every rank as ZEROMEGA_CONFIG."""
    hostfile: Optional[str] = None
    include: str = ""
    exclude: str = ""
    min_nodes: Optional[int] = None
    """Elastic ``--nnodes MIN:MAX``: the fewest nodes the job runs on (None: exactly ``nnodes``)."""
    rdzv_backend: Optional[str] = None
    rdzv_endpoint: Optional[str] = None
    rdzv_id: Optional[str] = None
    rdzv_conf: str = ""
    torchrun_args: list[str] = field(default_factory=list)
    """Further torchrun flags, verbatim (``--log-dir``, ``-m``, ``--redirects``, ...)."""
    deepspeed_args: list[str] = field(default_factory=list)
    """Further deepspeed runner flags, verbatim in its spelling (``--launcher openmpi``, ``--no_ssh_check``, ...)."""
    rank_env: dict = field(default_factory=dict)
    """Variables every rank gets unless already set (the network interface)."""
    local_rank_flag: Optional[str] = None
    """``--local_rank`` (or ``--local-rank``): append ``FLAG=N`` to the script's arguments, as deepspeed does."""
    module: bool = False
    """Run SCRIPT as ``python -m SCRIPT`` (torchrun's ``-m``, deepspeed's ``--module``)."""
    no_python: bool = False
    """Run SCRIPT as an executable, without python (torchrun's and deepspeed's ``--no-python``)."""
    num_nodes: int = -1
    """deepspeed's ``--num_nodes``: the first N hosts of the hostfile (-1: all)."""


@dataclass(frozen=True)
class RankFailure:
    """The failure a launcher reported, reduced to what a user needs first."""

    rank: Optional[int]
    """Global rank; None when the launcher does not say which rank failed."""
    exitcode: int
    """The rank's exit code; negative: killed by that signal."""
    error: Optional[str] = None
    """``Type: message`` of the exception the rank recorded, if it recorded one."""
    unresponsive: Optional[str] = None
    """``"stopped"`` (SIGSTOP) or ``"hung"``: alive when the job was being stopped, it did not exit on torchrun's
    SIGTERM, and torchrun's SIGKILL after its grace is what ended it (:func:`_note_unresponsive_ranks`)."""
    lost: Optional[str] = None
    """Another node this rank lost first (:func:`lost_node`): the line then leads with it."""

    def describe(self) -> str:
        who = "a rank" if self.rank is None else f"rank {self.rank}"
        if self.lost:
            how = f"killed by {_signal_name(-self.exitcode)}" if self.exitcode < 0 else f"exit code {self.exitcode}"
            return (f"{self.lost}; this node's {who} stopped because of it ({how})"
                    + (f": {self.error}" if self.error else ""))
        if self.unresponsive:
            state = "stopped (SIGSTOP)" if self.unresponsive == "stopped" else "not responding"
            return (f"{who} hung: it was {state} while the other ranks failed waiting for it, did not exit on "
                    "torchrun's SIGTERM and was killed by SIGKILL after the grace period")
        how = f"killed by {_signal_name(-self.exitcode)}" if self.exitcode < 0 else f"exit code {self.exitcode}"
        if -self.exitcode in _CRASH_SIGNALS:
            how = f"crashed: {_signal_name(-self.exitcode)}"
        if self.error:
            return f"{who} failed ({how}): {self.error}"
        if self.exitcode > 0:
            return (f"{who} failed ({how}); no exception recorded (decorate the script's entry point with "
                    "torch.distributed.elastic.multiprocessing.errors.record to see it here)")
        if self.rank is None:
            return f"{who} failed ({how}); the deepspeed launcher does not say which (torchrun does)"
        return f"{who} failed ({how})"

    @property
    def exit_status(self) -> int:
        """The launcher's own exit code: the rank's, or 128 + signal like a shell."""
        if self.exitcode < 0:
            return 128 + (-self.exitcode)
        return self.exitcode if 0 < self.exitcode < 256 else 1


class LaunchError(Exception):
    """The launcher itself could not run or was stopped; carries the exit code to use."""

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status


_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
"""Signals a process raises on itself when it crashes (as opposed to being killed)."""


def _proc_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat (``T``: stopped), or ``""``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@contextlib.contextmanager
def _note_unresponsive_ranks():
    """Meanwhile, note each rank (pid -> ``"stopped"`` / ``"hung"``) that torchrun's agent has to SIGKILL when it
    stops the job: alive at the start of ``SubprocessContext._close``, still alive after the SIGTERM grace.
    Without this a stopped or hung rank reads as "killed by SIGKILL", which is only torchrun's clean-up."""
    from torch.distributed.elastic.multiprocessing.api import SubprocessContext

    original = SubprocessContext._close
    noted: dict[int, str] = {}

    def _close(self, death_sig, timeout=30):
        alive = {h.proc.pid: _proc_state(h.proc.pid) for h in self.subprocess_handlers.values()
                 if h.proc.poll() is None}
        try:
            return original(self, death_sig, timeout)
        finally:
            if death_sig != signal.SIGKILL:
                for handler in self.subprocess_handlers.values():
                    pid = handler.proc.pid
                    if pid in alive and alive[pid] in ("T", "t"):
                        noted[pid] = "stopped"  # whichever signal ended it, it was frozen
                    elif pid in alive and handler.proc.poll() == -signal.SIGKILL:
                        noted[pid] = "hung"

    SubprocessContext._close = _close
    try:
        yield noted
    finally:
        SubprocessContext._close = original


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux ``PR_SET_PDEATHSIG``).

    Called in each child before it execs (it survives exec): the ranks of a
    launcher that is killed (SIGKILL, OOM killer) die with it instead of
    training on as orphans, holding ports, memory and checkpoint directories.
    A no-op where prctl does not exist.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _children_die_with_us():
    """torchrun's agent starts each rank with ``subprocess.Popen`` (``SubprocessHandler._popen``); meanwhile
    each such child also gets :func:`die_with_parent` (torch 2.13 offers no hook of its own)."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler as handler

    original = handler.SubprocessHandler._popen

    def _popen(self, args, env):
        real_popen = handler.Popen

        def popen(*a, **kw):
            return real_popen(*a, preexec_fn=die_with_parent, **kw)

        handler.Popen = popen
        try:
            return original(self, args, env)
        finally:
            handler.Popen = real_popen

    handler.SubprocessHandler._popen = _popen
    try:
        yield
    finally:
        handler.SubprocessHandler._popen = original


RDZV_CALL_DEADLINE_S = 10.0
"""Longest wait for one of the torchrun agent's rendezvous-store calls while it monitors or shuts down."""


@contextlib.contextmanager
def _rendezvous_calls_bounded():
    """Give the agent's periodic and final rendezvous calls a deadline (torch 2.13 gives them none that holds).

    While its ranks run, torchrun's agent asks the c10d rendezvous store every monitor interval how many
    nodes wait to join (``DynamicRendezvousHandler.num_nodes_waiting``), and closes the rendezvous on the way
    out (``shutdown``). Across a network partition a store request waits in the socket until the link
    returns or TCP gives up (minutes; the store's timeout does not bound it), so the node cut off from the
    store never notices that its ranks failed: measured on the two-node test bed, its agent was still
    blocked 2 min after its rank had exited, until the link came back, and then reported a rendezvous
    error instead of its rank's failure. Here each call runs on a helper thread; after
    :data:`RDZV_CALL_DEADLINE_S` (or on a store error, for ``num_nodes_waiting``) the agent goes on as if
    no node waits (or the close failed), and while that call is still blocked later calls return at once.
    """
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler as handler

    originals = {"num_nodes_waiting": (handler.num_nodes_waiting, 0), "shutdown": (handler.shutdown, False)}
    blocked: dict = {}

    def bounded(name):
        original, fallback = originals[name]

        def call(self, *args, **kwargs):
            if blocked.get(name) is not None and blocked[name].is_alive():
                return fallback
            box: dict = {}

            def run():
                try:
                    box["value"] = original(self, *args, **kwargs)
                except BaseException as err:  # handed to the agent
                    box["error"] = err

            thread = threading.Thread(target=run, name=f"zeromega-rdzv-{name}", daemon=True)
            thread.start()
            thread.join(RDZV_CALL_DEADLINE_S)
            if thread.is_alive():
                blocked[name] = thread
                if not blocked.get("said"):
                    blocked["said"] = True
                    print(f"zeromega launch: the rendezvous store did not answer within {RDZV_CALL_DEADLINE_S:g} s "
                          "(this node lost node 0: network partition, or node 0 is down)", file=sys.stderr)
                return fallback
            if "error" in box:
                if name == "num_nodes_waiting" and isinstance(box["error"], Exception):
                    return fallback  # the store is gone: this node's ranks end by their own timeouts
                raise box["error"]
            return box.get("value")

        return call

    for name in originals:
        setattr(handler, name, bounded(name))
    try:
        yield
    finally:
        for name, (original, _) in originals.items():
            setattr(handler, name, original)


def free_port() -> int:
    """A TCP port free right now (the deepspeed launcher needs one named up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _recorded_error(path: Optional[str]) -> Optional[str]:
    """``Type: message`` from an error file written by ``@record``, as one bounded line."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as fp:
            message = json.load(fp).get("message")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(message, dict):
        message = message.get("message")
    if not message:
        return None
    text = " ".join(str(message).split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


EVIDENCE_SUFFIX = ".evidence.json"  # zeromega.integrations.heartbeat.EVIDENCE_SUFFIX (not imported: it imports torch)


def _evidence(error_file: Optional[str]) -> Optional[dict]:
    """What a rank's collective-timeout explanation saw (written beside its error file), or None."""
    try:
        with open(f"{error_file}{EVIDENCE_SUFFIX}") as fp:
            facts = json.load(fp)
    except (OSError, ValueError, TypeError):
        return None
    return facts if isinstance(facts, dict) else None


def _ranks_text(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


def lost_node(facts: dict, answers=None) -> Optional[str]:
    """The other node a rank lost first, as the failure line's lead (``lost node 1 (ADDR) with rank 1: why``), from
    what the rank's heartbeat saw when its collective failed; None when the evidence names no other node.

    In order: node 0's store did not answer (this node is cut off from node 0); the connection to a peer's
    address closed (a node that died); ranks of another node never reached the step (that node is asked whether
    it answers at all, ``answers(addr)``: a partition may cut it off before it posts); every rank reached it, so
    the other nodes' addresses are asked (a partition).
    Ranks are numbered node by node, ``local_world_size`` per node.
    """
    per, world, step = facts.get("local_world_size") or 0, facts.get("world") or 0, facts.get("step")
    if per <= 0 or world <= per or not isinstance(facts.get("rank"), int):
        return None
    mine = facts["rank"] // per
    posts = {int(r): p for r, p in (facts.get("posts") or {}).items()}
    hosts = {r: p[2] for r, p in posts.items() if p and len(p) > 2 and p[2]}

    def ranks_on(node: int) -> list[int]:
        return list(range(node * per, min(world, (node + 1) * per)))

    def address(node: int) -> str:
        found = [hosts[r] for r in ranks_on(node) if r in hosts]
        return found[0] if found else (facts.get("master_addr") or "" if node == 0 else "")

    def node_text(node: int, ranks: Optional[list[int]] = None) -> str:
        where = address(node)
        return f"node {node}" + (f" ({where})" if where else "") + f" with {_ranks_text(ranks or ranks_on(node))}"

    if facts.get("store_unreachable") and mine != 0:
        return (f"lost {node_text(0)}: the job's store there did not answer this node (a network partition, "
                "or node 0 is down)")
    peer = facts.get("peer")
    if facts.get("lost_peer") and peer:
        nodes = sorted({r // per for r, host in hosts.items() if host == peer} - {mine})
        if nodes:
            return f"lost {node_text(nodes[0])}: the connection to {peer} closed (that node died or its ranks did)"
        if peer == facts.get("node_addr") or any(host == peer for host in hosts.values()):
            return None  # a rank of this node
    if not posts or step is None:
        return None
    behind = sorted(r for r, p in posts.items() if p is None or p[0] < step)
    if behind:
        nodes = sorted({r // per for r in behind})
        if mine in nodes or len(nodes) > 1:
            return None
        if facts.get("lost_peer"):  # a connection broke and only that node is behind: it died
            return (f"lost {node_text(nodes[0], behind)}: its connection closed and it never reached step {step} "
                    "(that node died or its ranks did)")
    if answers is None:
        from zeromega.launch.network import answers
    if behind:  # behind, or cut off before it could post (a partition): ask its address
        if address(nodes[0]) and not answers(address(nodes[0])):
            return (f"lost {node_text(nodes[0])}: it does not answer from this node (a network partition, or that "
                    f"node is down); its {_ranks_text(behind)} never reached step {step}")
        return f"{node_text(nodes[0], behind)} held the job up: never reached step {step} (hung, dead or far slower)"
    silent = [node for node in range(world // per) if node != mine and address(node) and not answers(address(node))]
    if silent:
        return (f"lost {node_text(silent[0])}: it does not answer from this node (a network partition, or that "
                "node is down)")
    return None


def attribute(failure: "RankFailure", error_files: list[Optional[str]], answers=None) -> "RankFailure":
    """``failure`` led by the node its rank lost (:func:`lost_node`), from the evidence beside the root cause's
    error file (``error_files[0]``) or, when it wrote none, beside another of this node's ranks' files; unchanged
    when a rank of this node died by itself (a signal, a hang), or nothing names another node."""
    own = _evidence(error_files[0]) if error_files else None
    if failure.unresponsive or (own is None and (failure.error or failure.exitcode < 0)):
        return failure  # the root cause is this node's own rank
    for path in error_files:
        facts = _evidence(path)
        lost = lost_node(facts, answers) if facts else None
        if lost:
            return RankFailure(failure.rank, failure.exitcode, failure.error, failure.unresponsive, lost)
    return failure


def _mtime_ns(path: Optional[str]) -> Optional[int]:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


def rank_settings(job: Job, base: dict[str, str]) -> dict:
    """What every rank's environment needs: ``set`` (always), ``default`` (only where
    unset) and ``drop`` (removed), applied with :func:`apply_settings`."""
    settings: dict = {"set": {}, "default": {}, "drop": []}
    if job.config:
        settings["set"][CONFIG_ENV] = job.config
    elif CONFIG_ENV in base:
        settings["drop"].append(CONFIG_ENV)
    if (job.nproc_per_node or 1) > 1:
        settings["default"]["OMP_NUM_THREADS"] = "1"
    settings["default"].update(job.rank_env)
    return settings


def apply_settings(env, settings: dict) -> None:
    """Apply :func:`rank_settings` to ``env`` (a dict or ``os.environ``)."""
    for name in settings.get("drop", []):
        env.pop(name, None)
    env.update(settings.get("set", {}))
    for name, value in settings.get("default", {}).items():
        env.setdefault(name, value)


# ----------------------------------------------------------------- torchrun


def rendezvous_id(job: Job) -> str:
    """The same id on every node without anyone choosing one: SLURM's job id, else the master's address and port."""
    return os.environ.get("SLURM_JOB_ID") or f"zeromega-{job.master_addr}-{job.master_port or DEFAULT_PORT}"


def _is_rendezvous_host(job: Job, host: str) -> bool:
    """Whether this machine owns ``host``'s address, so it serves the c10d rendezvous store.

    Otherwise torch decides (its hostname match, then trying to serve and falling back to a client).
    """
    from .network import interface_addresses, resolve

    address = resolve(host)
    return address is not None and any(address in found for found in interface_addresses().values())


def torchrun_argv(job: Job) -> list[str]:
    """torchrun's own command line for this job (parsed by torchrun's parser, so its defaults hold).

    One node without an address: ``--standalone`` (the agent's store picks a free port).
    More nodes: torch's c10d rendezvous, not its static one: a static rendezvous keeps one
    store across restarts, so ``--max-restarts`` never recovers across nodes. The endpoint is
    ``--master-addr:--master-port``; node 0 (or the machine owning that address) serves it.
    """
    nnodes = f"{job.min_nodes}:{job.nnodes}" if job.min_nodes is not None else str(job.nnodes)
    argv = ["--nnodes", nnodes, "--nproc-per-node", str(job.nproc_per_node),
            "--max-restarts", str(job.max_restarts)]
    backend = job.rdzv_backend
    if backend is None and job.nnodes == 1 and job.master_addr is None and job.master_port is None \
            and job.rdzv_endpoint is None:
        # Rendezvous on a port the agent's store picks itself: no port races.
        argv.append("--standalone")
    elif backend is None and job.nnodes == 1 and job.rdzv_endpoint is None:
        argv += ["--node-rank", str(job.node_rank)]
        if job.master_addr is not None:
            argv += ["--master-addr", job.master_addr]
        if job.master_port is not None:
            argv += ["--master-port", str(job.master_port)]
    else:
        backend = backend or "c10d"
        endpoint = job.rdzv_endpoint or f"{job.master_addr}:{job.master_port or DEFAULT_PORT}"
        argv += ["--rdzv-backend", backend, "--rdzv-endpoint", endpoint, "--rdzv-id", job.rdzv_id or rendezvous_id(job)]
        conf = job.rdzv_conf
        host = endpoint.rsplit(":", 1)[0].strip("[]") if ":" in endpoint else endpoint
        if backend == "c10d" and "is_host" not in conf and _is_rendezvous_host(job, host):
            conf = ",".join(filter(None, [conf, "is_host=1"]))
        if conf:
            argv += ["--rdzv-conf", conf]
        if not {"--local-addr", "--local_addr"} & {a.split("=", 1)[0] for a in job.torchrun_args}:
            # What this node tells the others to reach it (its store, rank 0's MASTER_ADDR): by default
            # torch's getfqdn(), which is 127.0.0.1 where the hostname resolves to it.
            from .network import local_address_to

            local = local_address_to(host)
            if local is not None and not local.startswith("127."):
                argv += ["--local-addr", local]
    argv += list(job.torchrun_args)
    if job.local_rank_flag:
        # torchrun gives LOCAL_RANK only in the environment; the rank entry appends it as deepspeed does.
        blob = _settings_blob({"local_rank_flag": job.local_rank_flag, "module": job.module,
                               "no_python": job.no_python})
        return argv + ["-m", __name__, "--local_rank=env", blob, job.script, *job.script_args]
    if job.module:
        argv.append("-m")
    if job.no_python:
        argv.append("--no-python")
    return argv + [job.script, *job.script_args]


def _settings_blob(settings: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(settings).encode()).decode()


def root_cause(failures: dict) -> tuple[int, object]:
    """The (rank, ProcessFailure) that most likely started the failure.

    torchrun's own pick (earliest timestamp, in whole seconds) often names a
    rank that only died because a peer did. So: ranks the agent SIGTERMed
    while shutting down come last; a rank that died without recording an
    exception (a signal, an exit code) comes before ranks whose recorded
    exception is typically the lost peer; recorded exceptions go in the order
    their error files were written.
    """
    def key(item):
        rank, failure = item
        written = _mtime_ns(failure.error_file)
        return (failure.exitcode == -signal.SIGTERM, written is not None, written or 0, rank)

    return min(failures.items(), key=key)


def run_torchrun(job: Job) -> Optional[RankFailure]:
    """Run the job under torchrun's elastic agent; None when every rank succeeded."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    apply_settings(os.environ, rank_settings(job, dict(os.environ)))  # the agent passes it on
    if job.max_restarts > 0:
        # torch 2.13's agent otherwise shares one TCP store across restarts with no per-attempt
        # prefix: restarted ranks read the dead attempt's gloo addresses ("Connection refused").
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        with _children_die_with_us(), _rendezvous_calls_bounded(), _note_unresponsive_ranks() as unresponsive:
            run(parse_args(torchrun_argv(job)))
    except ChildFailedError as err:
        rank, failure = root_cause(err.failures)
        frozen = [(r, f) for r, f in sorted(err.failures.items()) if unresponsive.get(f.pid) == "stopped"]
        if frozen:  # the others failed waiting for it
            rank, failure = frozen[0]
        elif unresponsive.get(failure.pid) == "hung":  # it only outlived SIGTERM: a rank that died first started it
            others = {r: f for r, f in err.failures.items() if not unresponsive.get(f.pid)}
            if others:
                rank, failure = root_cause(others)
        found = RankFailure(rank, failure.exitcode, _recorded_error(failure.error_file), unresponsive.get(failure.pid))
        return attribute(found, [failure.error_file] + [f.error_file for _, f in sorted(err.failures.items())])
    except SignalException as err:
        raise LaunchError(f"stopped by {_signal_name(err.sigval)}; torchrun stopped every rank",
                          128 + int(err.sigval)) from None
    except RendezvousError as err:
        where = job.rdzv_endpoint or (f"{job.master_addr}:{job.master_port or DEFAULT_PORT}" if job.master_addr else "")
        raise LaunchError(f"rendezvous{' at ' + where if where else ''} failed: {type(err).__name__}: {err} "
                          "(not a rank's failure; every node must reach it and give the same --nnodes, "
                          "--master-addr/--master-port or --rdzv-endpoint and --rdzv-id)") from None
    except Exception as err:  # ports in use, ...
        raise LaunchError(f"torchrun could not run the job: {type(err).__name__}: {err}") from None
    return None


# ---------------------------------------------------------------- deepspeed


def _deepspeed_resources(job: Job) -> dict:
    """Host -> slots the deepspeed runner will use, computed with its own functions."""
    from deepspeed.launcher.runner import (DLTS_HOSTFILE, apply_num_nodes_and_gpus, fetch_hostfile,
                                           parse_inclusion_exclusion)

    path = job.hostfile or DLTS_HOSTFILE
    pool = fetch_hostfile(path) if os.path.isfile(path) else None
    if not pool:
        from deepspeed.accelerator import get_accelerator

        pool = {"localhost": get_accelerator().device_count()}
    active = parse_inclusion_exclusion(pool, job.include, job.exclude)
    return apply_num_nodes_and_gpus(active, job.num_nodes, job.nproc_per_node or -1)


def deepspeed_world_size(job: Job) -> int:
    """Ranks the deepspeed launcher will start (hostfile, include/exclude and --num_gpus applied).

    Only a hostfile or a slot filter needs deepspeed's own parsing (and its slow import);
    otherwise the runner starts ``--num_gpus`` ranks on this node.
    """
    if not (job.hostfile or job.include or job.exclude or job.num_nodes > 0
            or os.path.isfile(DEEPSPEED_DEFAULT_HOSTFILE)):
        return job.nproc_per_node or 0
    _default_accelerator(os.environ)
    return sum(len(slots) for slots in _deepspeed_resources(job).values())


def _default_accelerator(env: dict) -> None:
    """On a machine without CUDA, tell deepspeed to use its CPU accelerator (unless told otherwise)."""
    if "DS_ACCELERATOR" not in env:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"


def deepspeed_command(job: Job, port: int, rank_settings: dict) -> list[str]:
    """The deepspeed runner's command line; each rank starts as ``-m zeromega.launch.launcher``."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--master_port", str(port)]
    if job.master_addr is not None:
        cmd += ["--master_addr", job.master_addr]
    if job.hostfile:
        cmd += ["--hostfile", job.hostfile]
    if job.include:
        cmd += ["--include", job.include]
    if job.exclude:
        cmd += ["--exclude", job.exclude]
    if job.nproc_per_node:
        cmd += ["--num_gpus", str(job.nproc_per_node)]
    if job.num_nodes > 0:
        cmd += ["--num_nodes", str(job.num_nodes)]
    cmd += list(job.deepspeed_args)
    settings = dict(rank_settings, module=job.module, no_python=job.no_python, local_rank_flag=job.local_rank_flag)
    return cmd + ["--module", __name__, _settings_blob(settings), job.script, *job.script_args]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop_group(pgid: int, sig: int = signal.SIGTERM, grace_s: float = STOP_GRACE_S) -> None:
    """Signal the launcher's process group, then SIGKILL whatever is left after ``grace_s``."""
    if not _group_alive(pgid):
        return
    _signal_group(pgid, sig)
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)


def _run_group(cmd: list[str], env: dict) -> tuple[int, Optional[int]]:
    """Run ``cmd`` in its own process group and wait; SIGINT/SIGTERM/SIGHUP stop the
    whole group (the single-node deepspeed runner forwards none of them to its
    ranks). Returns (exit code, the signal received or None)."""
    received: list[int] = []
    procs: list[subprocess.Popen] = []

    def forward(signum, _frame):
        received.append(signum)
        if procs:
            _signal_group(procs[0].pid, signal.SIGTERM)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        # the runner gets SIGTERM (its own handler stops its ranks), each rank SIGKILL (_rank_entry)
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True,
                                      preexec_fn=lambda: die_with_parent(signal.SIGTERM)))
        if received:  # a signal came before the group existed
            _signal_group(procs[0].pid, signal.SIGTERM)
        returncode = procs[0].wait()
        # The runner is gone, but its launcher may still be stopping the ranks.
        _stop_group(procs[0].pid, grace_s=STOP_GRACE_S if received else 5.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return returncode, (received[0] if received else None)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _decode_deepspeed_status(returncode: int) -> int:
    """The failed rank's exit code as the deepspeed launcher passed it on.

    Its launch.py calls ``sys.exit(rank's returncode)``; a rank killed by a
    signal has a negative returncode, which the shell sees as 256 - signal.
    """
    signum = 256 - returncode
    if 128 < returncode < 256 and signum in {s.value for s in signal.Signals}:
        return -signum
    return returncode


def _deepspeed_failure(returncode: int, error_dir: str) -> RankFailure:
    """Name the rank from the error files the ranks wrote; the launcher itself does not say.

    A signal death leaves no error file, and the files that do exist then come
    from peers that lost the killed rank: naming one of those would mislead,
    so a signal is reported without a rank.
    """
    exitcode = _decode_deepspeed_status(returncode)
    written = []
    for name in os.listdir(error_dir):
        if name.startswith("rank") and name.endswith(".json") and name[4:-5].isdigit():
            path = os.path.join(error_dir, name)
            written.append((_mtime_ns(path) or 0, int(name[4:-5]), path))
    if not written:
        return RankFailure(None, exitcode)
    _, rank, path = min(written)
    if exitcode < 0:  # a signal, maybe on another node: only the evidence of this node's ranks can name it
        found = attribute(RankFailure(rank, 1, _recorded_error(path)), [path for _, _, path in sorted(written)])
        return found if found.lost else RankFailure(None, exitcode)
    return attribute(RankFailure(rank, exitcode, _recorded_error(path)), [path for _, _, path in sorted(written)])


SSH_CHECK_TIMEOUT_S = 20.0


def _flag_value(args: list[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def unreachable_hosts(job: Job) -> list[tuple[str, str]]:
    """(host, why) for each host of a deepspeed job with a hostfile that ``ssh`` does not reach.

    The deepspeed runner checks only the hostfile's first host (``ssh -o PasswordAuthentication=no HOST
    hostname``, skipped under ``--no_ssh_check`` / ``--no_ssh``); a later host that ssh cannot reach leaves
    the ranks that did start waiting for it until their timeout. This runs the same check on every host, at
    once, each with a deadline, before anything starts.
    """
    from deepspeed.launcher.runner import DLTS_HOSTFILE, fetch_hostfile

    args = job.deepspeed_args
    path = job.hostfile or DLTS_HOSTFILE
    if "--no_ssh_check" in args or "--no_ssh" in args or not os.path.isfile(path) or not fetch_hostfile(path):
        return []  # no hostfile: the runner starts this machine's ranks itself, without ssh
    hosts = list(_deepspeed_resources(job))
    port = _flag_value(args, "--ssh_port")

    def check(host: str) -> Optional[str]:
        cmd = ["ssh", "-o", "PasswordAuthentication=no", "-o", "BatchMode=yes", "-o",
               f"ConnectTimeout={int(SSH_CHECK_TIMEOUT_S // 2)}", *(["-p", port] if port else []), host, "hostname"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=SSH_CHECK_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return "no ssh on this machine"
        except subprocess.TimeoutExpired:
            return f"no answer within {SSH_CHECK_TIMEOUT_S:g} s"
        if done.returncode == 0:
            return None
        said = done.stderr.strip().splitlines()
        return f"`ssh {host} hostname`: exit code {done.returncode}" + (f": {said[-1][:200]}" if said else "")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        found = list(zip(hosts, pool.map(check, hosts)))
    return [(host, why) for host, why in found if why]


def run_deepspeed(job: Job) -> Optional[RankFailure]:
    """Run the job under the deepspeed launcher; None when every rank succeeded."""
    lost = unreachable_hosts(job)
    if lost:
        names = ", ".join(host for host, _ in lost)
        raise LaunchError(f"the deepspeed runner cannot reach {names} over ssh ({lost[0][1]}): not a rank's "
                          "failure, no rank was started; make `ssh HOST hostname` work without a password from "
                          f"this machine, or leave {'it' if len(lost) == 1 else 'them'} out (--exclude "
                          f"{','.join(host for host, _ in lost)})")
    env = dict(os.environ)
    settings = rank_settings(job, env)
    apply_settings(env, settings)
    _default_accelerator(env)
    if "DS_ACCELERATOR" in env:
        settings["default"]["DS_ACCELERATOR"] = env["DS_ACCELERATOR"]
    port = job.master_port or free_port()
    with tempfile.TemporaryDirectory(prefix="zeromega-errors-") as error_dir:
        # Remote nodes (pdsh) do not inherit our environment: the settings ride in each rank's argv.
        settings["error_dir"] = error_dir
        returncode, stopped_by = _run_group(deepspeed_command(job, port, settings), env)
        if stopped_by is not None:
            raise LaunchError(f"stopped by {_signal_name(stopped_by)}; every rank was stopped",
                              128 + stopped_by)
        if returncode == 0:
            return None
        if not any(name.startswith("started") for name in os.listdir(error_dir)):
            remote = " on this machine" if job.hostfile or job.num_nodes > 0 else ""
            raise LaunchError(f"the deepspeed runner failed (exit code {returncode}) before any rank started{remote}: "
                              "not a rank's failure; its ssh check, pdsh / mpirun / srun, or the hostfile (see its "
                              "output above)", returncode if 0 < returncode < 256 else 1)
        return _deepspeed_failure(returncode, error_dir)


def launch(job: Job, launcher: str = "torchrun") -> Optional[RankFailure]:
    """Run ``job`` with the named launcher; None on success, the root-cause failure otherwise."""
    if launcher == "deepspeed":
        return run_deepspeed(job)
    return run_torchrun(job)


# ------------------------------------------------------ deepspeed rank entry


def _this_node(env) -> None:
    """What the torchrun path sets per node, for a deepspeed rank (whose settings are the same on every node):
    the processes per node, this node's address toward the master (heartbeat posts name it) and, unless set,
    gloo's / NCCL's interface toward the master (the hostname may resolve to 127.0.0.1)."""
    if "LOCAL_SIZE" in env:
        env.setdefault("LOCAL_WORLD_SIZE", env["LOCAL_SIZE"])
    master = env.get("MASTER_ADDR")
    if not master or int(env.get("CROSS_SIZE", "1") or 1) <= 1:
        return
    from zeromega.launch import network

    if network.is_loopback(master):
        return
    local = network.local_address_to(master)
    if local:
        env.setdefault("ZEROMEGA_NODE_ADDR", local)
    settings, _ = network.socket_ifname_settings(master, None, dict(env))
    for name, value in settings.items():
        env.setdefault(name, value)


def _rank_entry(argv: list[str]) -> None:
    """Become the user's script as the deepspeed launcher would have run it.

    The deepspeed runner runs ``python -u -m zeromega.launch.launcher --local_rank=N SETTINGS
    SCRIPT ARGS...`` (without ``--local_rank=N`` under its ``--no_local_rank``); torchrun runs
    the same with ``--local_rank=env`` when the script expects the flag (N is then torchrun's
    ``LOCAL_RANK``). This sets the rank's environment (with its own error file), then execs
    ``python -u SCRIPT --local_rank=N ARGS...`` in the same process, so the launcher still sees
    the script's exit status and signals. SETTINGS may ask for ``python -u -m SCRIPT``
    (``module``), SCRIPT run directly (``no_python``) or the flag's other spelling
    (``local_rank_flag``: ``--local-rank``).
    """
    local_rank = None
    if argv and argv[0].startswith("--local_rank="):
        local_rank, argv = argv[0].split("=", 1)[1], argv[1:]
    if len(argv) < 2:
        sys.exit("zeromega.launch.launcher is the per-rank entry of `zeromega launch`; run that instead")
    blob, script, *args = argv
    settings = json.loads(base64.urlsafe_b64decode(blob.encode()))
    apply_settings(os.environ, settings)
    _this_node(os.environ)
    error_dir = settings.get("error_dir")
    if error_dir and os.path.isdir(error_dir):  # not on a remote node without this machine's /tmp
        os.environ["TORCHELASTIC_ERROR_FILE"] = os.path.join(error_dir, f"rank{os.environ.get('RANK', '0')}.json")
        with contextlib.suppress(OSError):  # so the launcher can tell a runner failure from a rank's
            open(os.path.join(error_dir, f"started{os.environ.get('RANK', '0')}"), "w").close()
    if local_rank == "env":
        local_rank = os.environ.get("LOCAL_RANK", "0")
    flag = settings.get("local_rank_flag") or "--local_rank"
    extra = [f"{flag}={local_rank}"] if local_rank is not None else []
    die_with_parent()  # the launcher that started this rank
    if settings.get("no_python"):
        os.execv(script, [script, *extra, *args])
    python = [sys.executable, "-u", *(["-m"] if settings.get("module") else [])]
    os.execv(sys.executable, [*python, script, *extra, *args])


if __name__ == "__main__":
    _rank_entry(sys.argv[1:])
