"""Two nodes on one machine: ``zeromega launch --nnodes 2`` in two network namespaces joined by a veth pair.

The fixture :func:`two_nodes` makes the namespaces, each with its own
private address on the pair (10.231.N.1 and .2; nothing outside the test
can reach them), and removes them afterwards, also when a test fails. Each
"node" runs a real ``zeromega launch`` through ``ip netns exec``. Where the
machine does not allow namespaces (not root, no ``ip``, a kernel or sandbox
that refuses them) the tests are skipped, saying so.

Nothing here sets ``GLOO_SOCKET_IFNAME``: finding the interface that reaches
the master is the launcher's job. On a machine whose hostname resolves to
127.0.0.1 (this one's /etc/hosts) gloo would otherwise advertise 127.0.0.1
to the other node.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from distributed import launch_env, survivors

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(Path(__file__).parent / "scripts" / "worker.py")
GPT = str(ROOT / "examples" / "pretrain_gpt.py")
CKPT_WORKER = str(Path(__file__).resolve().parent / "ckpt_workers.py")
JOB_DEADLINE_S = 240


@dataclass
class Bed:
    """Two namespaces ``ns[0]``, ``ns[1]`` with addresses ``addr[0]``, ``addr[1]`` on a veth pair."""

    ns: tuple[str, str]
    addr: tuple[str, str]
    link: tuple[str, str]

    def link_down(self) -> None:
        for node in (0, 1):
            subprocess.run(["ip", "-n", self.ns[node], "link", "set", self.link[node], "down"], check=False)

    def link_up(self) -> None:
        for node in (0, 1):
            subprocess.run(["ip", "-n", self.ns[node], "link", "set", self.link[node], "up"], check=False)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_nodes():
    """Two network namespaces joined by a veth pair; skipped where the machine forbids them."""
    if sys.platform != "linux" or shutil.which("ip") is None:
        pytest.skip("two-node test bed: needs Linux and iproute2's `ip`")
    if os.geteuid() != 0:
        pytest.skip("two-node test bed: creating network namespaces needs root")
    tag = f"{os.getpid() % 10000}{uuid.uuid4().hex[:3]}"
    net = random.Random(tag).randrange(1, 254)
    bed = Bed(ns=(f"zmn{tag}a", f"zmn{tag}b"), addr=(f"10.231.{net}.1", f"10.231.{net}.2"),
              link=(f"zmv{tag}a", f"zmv{tag}b"))
    made = []
    try:
        for name in bed.ns:
            done = _ip("netns", "add", name)
            if done.returncode:
                pytest.skip(f"two-node test bed: this machine forbids network namespaces (`ip netns add`: "
                            f"{done.stderr.strip()})")
            made.append(name)
        steps = [("link", "add", bed.link[0], "type", "veth", "peer", "name", bed.link[1])]
        for node in (0, 1):
            steps += [("link", "set", bed.link[node], "netns", bed.ns[node]),
                      ("-n", bed.ns[node], "addr", "add", f"{bed.addr[node]}/24", "dev", bed.link[node]),
                      ("-n", bed.ns[node], "link", "set", bed.link[node], "up"),
                      ("-n", bed.ns[node], "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode:
                pytest.skip(f"two-node test bed: `ip {' '.join(step)}` failed: {done.stderr.strip()}")
        yield bed
    finally:
        for name in made:  # removing a namespace removes its end of the pair, and so the pair
            _ip("netns", "del", name)


@dataclass
class Node:
    proc: subprocess.Popen
    token: str
    out: str = ""
    err: str = ""
    seconds: float = 0.0

    @property
    def last(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


NODE_ENV_DROPPED = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "MASTER_ADDR",
                    "MASTER_PORT")


# Run as `bash -c MOUNT node DIR CMD...` inside a new mount namespace: a tmpfs of its own over DIR, then CMD.
MOUNT = 'mount -t tmpfs zeromega-node "$1" && mkdir -p "$1/tmp" "$1/data" && shift && exec "$@"'


def on_node(bed: Bed, node: int, argv: list[str], private: Path | None = None) -> list[str]:
    """``argv`` run on ``node``: in its network namespace and, with ``private``, in a mount namespace of its own
    where ``private`` is a fresh tmpfs (the node's own /tmp and data cache: ``private/tmp``, ``private/data``).
    Only that directory is covered, not /tmp itself: the checkout and the test's other files may live under it."""
    cmd = ["ip", "netns", "exec", bed.ns[node]]
    if private is None:
        return cmd + argv
    return cmd + ["unshare", "--mount", "--propagation", "private", "bash", "-c", MOUNT, "node", str(private), *argv]


def private_env(private: Path | None) -> dict:
    return {} if private is None else {"TMPDIR": str(private / "tmp"), "ZEROMEGA_DATA": str(private / "data")}


def start_node(bed: Bed, node: int, port: int, launch_args: list[str], script: str, args: list[str],
               env: dict | None = None, private: Path | None = None) -> Node:
    token = uuid.uuid4().hex
    full_env = launch_env(token, {**private_env(private), **(env or {})}, drop=NODE_ENV_DROPPED)
    cmd = on_node(bed, node, [sys.executable, "-m", "zeromega", "launch", "--nnodes", "2", "--node-rank", str(node),
                              "--master-addr", bed.addr[0], "--master-port", str(port), *launch_args, script, *args],
                  private)
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return Node(proc, token)


@pytest.fixture
def per_node_fs(two_nodes, tmp_path):
    """A directory each node sees as its own empty tmpfs (see :func:`on_node`); skipped where mount namespaces
    cannot be made."""
    if shutil.which("unshare") is None:
        pytest.skip("per-node filesystems: needs util-linux's `unshare`")
    private = tmp_path / "node-private"
    private.mkdir()
    probe = subprocess.run(on_node(two_nodes, 0, ["touch", str(private / "probe")], private),
                           capture_output=True, text=True, timeout=30)
    if probe.returncode:
        pytest.skip(f"per-node filesystems: this machine forbids a mount namespace with a tmpfs "
                    f"(`unshare --mount` + `mount -t tmpfs`: {probe.stderr.strip()})")
    assert not (private / "probe").exists(), "the node's tmpfs leaked into the shared filesystem"
    return private


def finish(nodes: list[Node], started: float, timeout: float = JOB_DEADLINE_S) -> list[Node]:
    """Wait for every node; kill what is left at ``timeout`` (and fail)."""
    try:
        for node in nodes:
            left = max(1.0, timeout - (time.monotonic() - started))
            node.out, node.err = node.proc.communicate(timeout=left)
            node.seconds = time.monotonic() - started
    except subprocess.TimeoutExpired:
        for node in nodes:
            kill_node(node)
        pytest.fail(f"a node still ran after {timeout:.0f} s")
    return nodes


def kill_node(node: Node) -> None:
    """SIGKILL everything of this node: the launcher's session and any process carrying its token."""
    try:
        os.killpg(node.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for proc in survivors(node.token):
        proc.kill()


def port() -> int:
    return random.randrange(20000, 40000)


# ------------------------------------------------------------------ fast: in CI


def test_two_nodes_allreduce_without_an_interface_named(two_nodes):
    """`zeromega launch --nnodes 2` on two hosts whose hostname resolves to 127.0.0.1: the launcher picks
    the interface that routes to the master (the veth), so gloo connects; c10d rendezvous."""
    started = time.monotonic()
    p = port()
    nodes = [start_node(two_nodes, n, p, ["--nproc-per-node", "1"], WORKER, []) for n in (0, 1)]
    finish(nodes, started, timeout=120)
    for n, node in enumerate(nodes):
        assert node.proc.returncode == 0, f"node {n}: {node.err[-3000:]}"
        assert f"network interface {two_nodes.link[n]} (the route to {two_nodes.addr[0]})" in node.err, node.err
    lines = sorted(line for node in nodes for line in node.out.splitlines() if line.startswith("rank="))
    assert [line.split()[0] for line in lines] == ["rank=0", "rank=1"], lines
    assert all("world=2 sum=3 " in line for line in lines), lines
    print(f"two nodes x 1 rank, allreduce: {max(n.seconds for n in nodes):.1f} s")


# ------------------------------------------------------------------ fast: who is blamed (in process)


def _torchrun_failure(monkeypatch, tmp_path, rank: int, exitcode: int, error: str | None, evidence: dict | None):
    """Run ``launcher.run_torchrun`` with torchrun's agent replaced by one that reports ``rank`` failed as the
    agent does (ChildFailedError with the rank's error file and, beside it, what its heartbeat saw)."""
    import torch.distributed.run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from zeromega.launch import launcher

    error_file = tmp_path / f"rank{rank}" / "error.json"
    error_file.parent.mkdir()
    if error is not None:
        error_file.write_text(json.dumps({"message": {"message": error, "extraInfo": {"timestamp": "1"}}}))
    if evidence is not None:
        Path(f"{error_file}{launcher.EVIDENCE_SUFFIX}").write_text(json.dumps(evidence))

    def agent(_args):
        raise ChildFailedError("script", {rank: ProcessFailure(rank, 4242, exitcode, str(error_file))})

    monkeypatch.setattr(torch_run, "run", agent)
    monkeypatch.setattr(launcher, "_rendezvous_calls_bounded", contextlib.nullcontext)
    return launcher.run_torchrun(launcher.Job(script="train.py", nnodes=2, master_addr="10.0.0.1"))


def _posts(world: int, step: int, per_node: int, late: tuple = ()) -> dict:
    return {str(r): [step - 1 if r in late else step, 1.0, f"10.0.0.{r // per_node + 1}"] for r in range(world)}


TIMEOUT_ERROR = "CollectiveTimeout: rank 0 on node 0: a collective of step 5 lost a peer; ..."


def test_lost_node_leads_the_survivors_line(monkeypatch, tmp_path):
    """A killed node seen from node 0: torchrun reports rank 0 (the survivor) failed; the line leads with node 1,
    its address and ranks, and says this node's rank stopped because of it."""
    facts = {"rank": 0, "world": 4, "step": 5, "local_world_size": 2, "node_addr": "10.0.0.1",
             "master_addr": "10.0.0.1", "peer": "10.0.0.2", "lost_peer": True, "store_unreachable": False,
             "posts": _posts(4, 5, 2)}
    line = _torchrun_failure(monkeypatch, tmp_path, 0, 1, TIMEOUT_ERROR, facts).describe()
    assert line.startswith("lost node 1 (10.0.0.2) with ranks 2-3: the connection to 10.0.0.2 closed"), line
    assert "; this node's rank 0 stopped because of it (exit code 1): CollectiveTimeout: rank 0 on node 0" in line
    from zeromega.launch import launcher

    unnamed = dict(facts, peer=None, posts=_posts(4, 5, 2, late=(2, 3)))  # a reset whose address was not read
    assert launcher.lost_node(unnamed).startswith("lost node 1 (10.0.0.2) with ranks 2-3: its connection closed and "
                                                  "it never reached step 5")


def test_partition_blames_the_node_across_it(monkeypatch, tmp_path):
    """A partition: node 1 cannot reach node 0's store (names node 0); node 0 sees every rank in the step and
    asks node 1's address, which does not answer (names node 1)."""
    from zeromega.launch import launcher, network

    far = {"rank": 1, "world": 2, "step": 7, "local_world_size": 1, "node_addr": "10.0.0.2",
           "master_addr": "10.0.0.1", "peer": None, "lost_peer": False, "store_unreachable": True, "posts": None}
    line = _torchrun_failure(monkeypatch, tmp_path, 1, 1, "CollectiveTimeout: ...", far).describe()
    assert line.startswith("lost node 0 (10.0.0.1) with rank 0: the job's store there did not answer"), line
    assert "this node's rank 1 stopped because of it" in line

    asked = []
    monkeypatch.setattr(network, "answers", lambda host, timeout_s=3.0: asked.append(host) or False)
    near = dict(far, rank=0, node_addr="10.0.0.1", store_unreachable=False, posts=_posts(2, 7, 1))
    line = launcher.lost_node(near)
    assert asked == ["10.0.0.2"] and line.startswith("lost node 1 (10.0.0.2) with rank 1: it does not answer"), line
    monkeypatch.setattr(network, "answers", lambda host, timeout_s=3.0: True)
    assert launcher.lost_node(near) is None  # both nodes up: nothing to blame on node 1
    behind = dict(near, posts=_posts(2, 7, 1, late=(1,)))
    assert launcher.lost_node(behind).startswith("node 1 (10.0.0.2) with rank 1 held the job up: never reached step 7")
    monkeypatch.setattr(network, "answers", lambda host, timeout_s=3.0: False)  # cut off before it posted step 7
    assert launcher.lost_node(behind).startswith("lost node 1 (10.0.0.2) with rank 1: it does not answer from this "
                                                 "node (a network partition, or that node is down); its rank 1 never "
                                                 "reached step 7"), launcher.lost_node(behind)


def test_own_rank_dying_is_not_blamed_on_another_node(monkeypatch, tmp_path):
    """A rank of this node killed by a signal (no evidence beside its error file) stays the cause; so does a
    one-node job's timeout."""
    line = _torchrun_failure(monkeypatch, tmp_path, 1, -9, None, None).describe()
    assert line.startswith("rank 1 failed (killed by SIGKILL)"), line
    from zeromega.launch import launcher

    one_node = {"rank": 0, "world": 2, "step": 5, "local_world_size": 2, "peer": "127.0.0.1", "lost_peer": True,
                "posts": _posts(2, 5, 2)}
    assert launcher.lost_node(one_node) is None


def _check_shared(directory: str, private_on_rank1: bool) -> str:
    """On one of two gloo ranks posing as two nodes (LOCAL_WORLD_SIZE=1): rank 1 may first cover ``directory``
    with a tmpfs of its own (a mount namespace of its own, as another node's disk); then zeromega's check."""
    import ctypes
    from types import SimpleNamespace

    import torch.distributed as dist

    from zeromega.config import ConfigError
    from zeromega.run import shared_fs

    os.environ["LOCAL_WORLD_SIZE"] = "1"
    refused = ""
    if private_on_rank1 and os.environ["RANK"] == "1":
        libc = ctypes.CDLL(None, use_errno=True)
        ms_rec, ms_private = 16384, 1 << 18
        if (libc.unshare(0x00020000) or libc.mount(None, b"/", None, ms_rec | ms_private, None)
                or libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0, None)):
            refused = f"skip: {os.strerror(ctypes.get_errno())}"
    dist.init_process_group("gloo")
    cfg = SimpleNamespace(data=SimpleNamespace(cache_path=None), checkpoint=SimpleNamespace(save=directory,
                                                                                          load=directory))
    try:
        said: list = [None, None]
        dist.all_gather_object(said, refused)  # both ranks skip, neither waits for the other
        if any(said):
            return next(x for x in said if x)
        shared_fs.check(cfg, [])
        return "ok"
    except ConfigError as err:
        return str(err)
    finally:
        dist.destroy_process_group()


def test_directory_not_shared_by_every_node_is_refused(tmp_path):
    """--save that node 1 sees as a directory of its own: every rank refuses in one line naming node 1, the field
    and the fix; the same directory shared by both passes."""
    if os.geteuid() != 0:
        pytest.skip("a mount namespace of one rank's own needs root")
    from distributed import run_world

    shared = str(tmp_path / "ck")
    assert run_world(2, _check_shared, shared, False, timeout=120) == ["ok", "ok"]
    apart = run_world(2, _check_shared, str(tmp_path), True, timeout=120)
    if apart[0].startswith("skip:"):
        pytest.skip(f"this machine forbids a mount namespace with a tmpfs ({apart[0]})")
    want = (f"checkpoint.save='{tmp_path}': node 1 does not see the files rank 0 writes there (no filesystem shared "
            "by every node): each rank writes its shard there and resumes from the 'latest' rank 0 writes; fix: put "
            "--save on a filesystem every node mounts")
    assert apart == [want, want]
    assert not list(tmp_path.glob(".zeromega-shared-*"))


# ------------------------------------------------------------------ slow: GPT runs

GPT_ARGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--no-progress",
            "--split", "1,0,0", "--hidden-dropout", "0.0", "--attention-dropout", "0.0"]


def curve(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def one_node(tmp: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ZEROMEGA_CONFIG")}
    return subprocess.run([sys.executable, "-m", "zeromega", "launch", "--nproc-per-node", "2", GPT, *args],
                          env=env, capture_output=True, text=True, timeout=JOB_DEADLINE_S, cwd=tmp)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [[], ["--tensor-model-parallel-size", "2"]], ids=["dp2", "tp2"])
def test_gpt_across_two_nodes_matches_one_node(two_nodes, tmp_path, small_corpus, layout):
    args = GPT_ARGS + ["--data-path", small_corpus, "--train-iters", "4", *layout]
    one = one_node(tmp_path, args + ["--metrics-out", str(tmp_path / "one.jsonl")])
    assert one.returncode == 0, one.stderr[-3000:]
    started, p = time.monotonic(), port()
    # One thread per rank on both sides: with one process per node torchrun leaves OMP_NUM_THREADS unset, and
    # two threads sum a matmul in another order than one (losses then differ in the 7th digit).
    nodes = [start_node(two_nodes, n, p, ["--nproc-per-node", "1"], GPT,
                        args + ["--metrics-out", str(tmp_path / "two.jsonl")], env={"OMP_NUM_THREADS": "1"})
             for n in (0, 1)]
    finish(nodes, started)
    for n, node in enumerate(nodes):
        assert node.proc.returncode == 0, f"node {n}: {node.err[-3000:]}"
    if layout:
        assert "tp groups (size 2) span nodes" in nodes[0].err, nodes[0].err[-2000:]
    want, got = curve(tmp_path / "one.jsonl"), curve(tmp_path / "two.jsonl")
    assert sorted(got) == [1, 2, 3, 4] and got == want, (got, want)


def _train(bed, tmp_path, corpus, iters, extra=(), env=None, launch_args=("--nproc-per-node", "1")):
    args = GPT_ARGS + ["--data-path", corpus, "--train-iters", str(iters), "--distributed-timeout-minutes", "0.25",
                       "--metrics-out", str(tmp_path / "run.jsonl"), *extra]
    p = port()
    return [start_node(bed, n, p, list(launch_args), GPT if env is None else CKPT_WORKER, args, env=env)
            for n in (0, 1)], time.monotonic()


TIMEOUT_S = 15  # --distributed-timeout-minutes 0.25
GRACE_S = 60  # the store's deadline (10 s), the agent's stop, interpreter exit: measured well under this


def _wait_for(path: Path, deadline_s: float = 150) -> None:
    end = time.monotonic() + deadline_s
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_node_ends_the_job_naming_it(two_nodes, tmp_path, small_corpus):
    """SIGKILL of node 1's launcher and ranks mid-run: node 0 ends within the timeout plus a grace; its line leads
    with node 1 (address, rank 1 on it) and says its own rank stopped because of it."""
    nodes, started = _train(two_nodes, tmp_path, small_corpus, 200)
    _wait_for(tmp_path / "run.jsonl")
    kill_node(nodes[1])
    killed = time.monotonic()
    finish(nodes, started)
    took = nodes[0].seconds - (killed - started)
    print(f"node killed -> node 0 over in {took:.1f} s: {nodes[0].last}")
    assert nodes[0].proc.returncode not in (0, None)
    assert took < TIMEOUT_S + GRACE_S, took
    far = two_nodes.addr[1]
    lead = f"zeromega launch: lost node 1 ({far}) with rank 1: the connection to {far} closed"
    assert nodes[0].last.startswith(lead), nodes[0].err[-3000:]
    assert "; this node's rank 0 stopped because of it (exit code 1): CollectiveTimeout" in nodes[0].last
    assert survivors(nodes[0].token) == []


@pytest.mark.slow
def test_partition_ends_both_nodes(two_nodes, tmp_path, small_corpus):
    """The link goes down mid-run: both nodes end within the timeout plus a grace, each line leading with the node
    across the cut: node 0's with node 1 (its address does not answer), node 1's with node 0 (its store did not)."""
    nodes, started = _train(two_nodes, tmp_path, small_corpus, 200)
    _wait_for(tmp_path / "run.jsonl")
    two_nodes.link_down()
    cut = time.monotonic()
    try:
        finish(nodes, started)
    finally:
        two_nodes.link_up()
    for n, node in enumerate(nodes):
        took = node.seconds - (cut - started)
        print(f"partition -> node {n} over in {took:.1f} s: {node.last}")
        assert node.proc.returncode not in (0, None)
        assert took < TIMEOUT_S + GRACE_S, (n, took, node.err[-3000:])
        assert survivors(node.token) == []
    near = f"zeromega launch: lost node 1 ({two_nodes.addr[1]}) with rank 1: it does not answer from this node"
    assert nodes[0].last.startswith(near), nodes[0].err[-3000:]
    far = f"zeromega launch: lost node 0 ({two_nodes.addr[0]}) with rank 0: the job's store there did not answer"
    assert nodes[1].last.startswith(far), nodes[1].err[-3000:]
    for n in (0, 1):
        assert f"this node's rank {n} stopped because of it" in nodes[n].last


@pytest.mark.slow
def test_killed_rank_restarts_across_nodes_to_the_same_curve(two_nodes, tmp_path, small_corpus):
    """--max-restarts 1 with --save/--load: rank 1 (node 1) is SIGKILLed after step 3; both nodes re-rendezvous
    (c10d), resume from step 2's checkpoint and end with the uninterrupted run's curve."""
    steps = ["--save-interval", "2"]
    clean_dir, faulty_dir = tmp_path / "clean", tmp_path / "faulty"
    clean_dir.mkdir()
    faulty_dir.mkdir()
    nodes, started = _train(two_nodes, clean_dir, small_corpus, 6,
                            extra=steps + ["--save", str(clean_dir / "ck"), "--load", str(clean_dir / "ck")],
                            launch_args=("--nproc-per-node", "1", "--max-restarts", "1"))
    finish(nodes, started)
    assert all(n.proc.returncode == 0 for n in nodes), nodes[0].err[-3000:] + nodes[1].err[-3000:]
    mark = faulty_dir / "killed"
    nodes, started = _train(two_nodes, faulty_dir, small_corpus, 6,
                            extra=steps + ["--save", str(faulty_dir / "ck"), "--load", str(faulty_dir / "ck")],
                            env={"ZEROMEGA_TEST_KILL": "1:3", "ZEROMEGA_TEST_KILL_MARK": str(mark)},
                            launch_args=("--nproc-per-node", "1", "--max-restarts", "1"))
    finish(nodes, started)
    assert all(n.proc.returncode == 0 for n in nodes), nodes[0].err[-3000:] + nodes[1].err[-3000:]
    assert mark.read_text().startswith("1:3:")
    assert curve(faulty_dir / "run.jsonl") == curve(clean_dir / "run.jsonl")


@pytest.mark.slow
def test_node_that_dies_and_comes_back_resumes_to_the_same_curve(two_nodes, tmp_path, small_corpus):
    """--max-restarts 1: node 1 (launcher and ranks) is SIGKILLed after a checkpoint, then started again; node 0's
    agent waits in a new c10d round, both resume from the checkpoint and the curve equals one node's."""
    args = GPT_ARGS + ["--data-path", small_corpus, "--train-iters", "8", "--save-interval", "2",
                       "--distributed-timeout-minutes", "0.5"]
    one = one_node(tmp_path, args + ["--metrics-out", str(tmp_path / "one.jsonl")])
    assert one.returncode == 0, one.stderr[-3000:]
    ck, metrics = tmp_path / "ck", tmp_path / "two.jsonl"
    run_args = args + ["--save", str(ck), "--load", str(ck), "--metrics-out", str(metrics)]
    launch = ["--nproc-per-node", "1", "--max-restarts", "1"]
    env = {"OMP_NUM_THREADS": "1"}  # as the one-node run's ranks (see test_gpt_across_two_nodes_matches_one_node)
    p, started = port(), time.monotonic()
    nodes = [start_node(two_nodes, n, p, launch, GPT, run_args, env=env) for n in (0, 1)]
    end = time.monotonic() + 200
    while not (ck / "latest").exists() or len(metrics.read_text().splitlines()) < 3:
        assert time.monotonic() < end and nodes[0].proc.poll() is None, "no checkpoint was written"
        time.sleep(0.2)
    kill_node(nodes[1])
    nodes[1].proc.wait()
    nodes[1] = start_node(two_nodes, 1, p, launch, GPT, run_args, env=env)
    finish(nodes, started, timeout=JOB_DEADLINE_S + 120)
    for n, node in enumerate(nodes):
        assert node.proc.returncode == 0, f"node {n}: {node.err[-3000:]}"
    assert curve(metrics) == curve(tmp_path / "one.jsonl")


# ------------------------------------------------------------------ slow: per-node filesystems


@pytest.mark.slow
def test_per_node_data_builds_the_corpus_on_each_node(two_nodes, per_node_fs, tmp_path):
    """Each node has its own ZEROMEGA_DATA (nothing shared): each node's first rank builds the project's corpus
    there; with --data-cache-path on the shared filesystem the losses equal one node x 2 processes (whose corpus is
    shared). Without it, Megatron's index cache (rank 0 builds, every rank reads) would be beside each node's data:
    refused on every node in one line, naming the directory and --data-cache-path, instead of a missing-file error."""
    shared = tmp_path / "shared-data"
    args = GPT_ARGS + ["--train-iters", "3", "--distributed-timeout-minutes", "0.5"]
    env = {"OMP_NUM_THREADS": "1"}  # as the one-node run's ranks (see test_gpt_across_two_nodes_matches_one_node)
    one = subprocess.run([sys.executable, "-m", "zeromega", "launch", "--nproc-per-node", "2", GPT, *args,
                          "--metrics-out", str(tmp_path / "one.jsonl")],
                         env=launch_env("one", {"ZEROMEGA_DATA": str(shared)}), capture_output=True, text=True,
                         timeout=JOB_DEADLINE_S, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]

    started, p = time.monotonic(), port()
    nodes = [start_node(two_nodes, n, p, ["--nproc-per-node", "1"], GPT, args, env=env, private=per_node_fs)
             for n in (0, 1)]
    finish(nodes, started)
    print(f"per-node data, index cache per node -> refused in {max(n.seconds for n in nodes):.1f} s: {nodes[0].last}")
    for node in nodes:
        assert node.proc.returncode not in (0, None)
        assert "does not see the files rank 0 writes there (no filesystem shared by every node)" in node.err, \
            node.err[-3000:]
        assert "--data-cache-path on a filesystem every node mounts" in node.err
        assert survivors(node.token) == []

    started, p = time.monotonic(), port()
    cache = ["--data-cache-path", str(tmp_path / "index-cache"), "--metrics-out", str(tmp_path / "two.jsonl")]
    nodes = [start_node(two_nodes, n, p, ["--nproc-per-node", "1"], GPT, args + cache, env=env, private=per_node_fs)
             for n in (0, 1)]
    finish(nodes, started)
    for n, node in enumerate(nodes):
        assert node.proc.returncode == 0, f"node {n}: {node.err[-3000:]}"
    assert not list(per_node_fs.iterdir()), "a node's corpus landed on the shared filesystem"
    want, got = curve(tmp_path / "one.jsonl"), curve(tmp_path / "two.jsonl")
    assert sorted(got) == [1, 2, 3] and got == want, (got, want)


@pytest.mark.slow
def test_checkpoint_on_per_node_filesystems_is_refused(two_nodes, per_node_fs, tmp_path, small_corpus):
    """--save on a directory each node has its own copy of: each rank would write its shard on its own node and
    only node 0 would hold 'latest', so a resume would start the nodes from different steps. Refused on every node
    before training, in one line naming the directory and the fix; no node hangs."""
    ck = per_node_fs / "data" / "ck"
    started, p = time.monotonic(), port()
    nodes = [start_node(two_nodes, n, p, ["--nproc-per-node", "1"], GPT,
                        GPT_ARGS + ["--data-path", small_corpus, "--train-iters", "4", "--save", str(ck), "--load",
                                    str(ck), "--save-interval", "2", "--distributed-timeout-minutes", "0.25"],
                        private=per_node_fs) for n in (0, 1)]
    finish(nodes, started, timeout=TIMEOUT_S + GRACE_S + 120)
    print(f"checkpoint on per-node filesystems -> refused in {max(n.seconds for n in nodes):.1f} s: {nodes[0].last}")
    for node in nodes:
        assert node.proc.returncode not in (0, None)
        assert f"checkpoint.save='{ck}': node 1 does not see the files rank 0 writes there" in node.err, \
            node.err[-3000:]
        assert "fix: put --save on a filesystem every node mounts" in node.err
        assert survivors(node.token) == []


# ------------------------------------------------------------------ slow: the deepspeed runner across nodes

REMOTE = '''#!{python}
"""Stand-in for ssh and pdsh on the two-node test bed (which one: this file's name).

Hosts are the test's nodes, read from $ZEROMEGA_TEST_HOSTS: {{host: {{"ns", "env", "private", "down"}}}}. A remote
command runs as a login would: in the host's network namespace (and, with "private", its own tmpfs over that
directory), with a fresh environment (PATH, HOME, the test's token, plus the host's "env"), through bash -c.
The caller's own host ($ZEROMEGA_TEST_NODE) runs it in the caller's namespaces, as ssh to itself would.
"""
import json, os, shlex, signal, subprocess, sys

HOSTS = json.load(open(os.environ["ZEROMEGA_TEST_HOSTS"]))
MOUNT = "mount -t tmpfs zeromega-node {{d}} && mkdir -p {{d}}/tmp {{d}}/data && "


def start(host, command):
    node = HOSTS[host]
    env = {{k: os.environ[k] for k in ("PATH", "HOME", "LANG", "ZEROMEGA_TEST_TOKEN", "ZEROMEGA_TEST_HOSTS")
           if k in os.environ}}
    env.update(node.get("env", {{}}), ZEROMEGA_TEST_NODE=host)
    if host == os.environ.get("ZEROMEGA_TEST_NODE"):
        argv = ["bash", "-c", command]
    elif node.get("private"):
        argv = ["ip", "netns", "exec", node["ns"], "unshare", "--mount", "--propagation", "private", "bash", "-c",
                MOUNT.format(d=shlex.quote(node["private"])) + command]
    else:
        argv = ["ip", "netns", "exec", node["ns"], "bash", "-c", command]
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def refused(host):
    if host not in HOSTS:
        return f"ssh: Could not resolve hostname {{host}}: Name or service not known"
    if HOSTS[host].get("down"):
        return f"ssh: connect to host {{host}} port 22: No route to host"
    return None


def wait_all(procs):
    def stop(signum, _frame):
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return [proc.wait() for proc in procs]


args = sys.argv[1:]
if os.path.basename(sys.argv[0]) == "ssh":
    while args and args[0].startswith("-"):
        args = args[2:] if args[0] in ("-o", "-p", "-i", "-l", "-F") else args[1:]
    host, command = args[0], " ".join(args[1:])
    if refused(host):
        sys.exit(print(refused(host), file=sys.stderr) or 255)
    sys.exit(wait_all([start(host, command)])[0])
# pdsh -S -f FANOUT -w host1,host2 COMMAND...: %n is the host's index in the list
hosts = []
while args and args[0].startswith("-"):
    if args[0] == "-w":
        hosts = args[1].split(",")
    args = args[2:] if args[0] in ("-w", "-f", "-R", "-l", "-u") else args[1:]
command, procs, codes = " ".join(args), [], []
for index, host in enumerate(hosts):
    if refused(host):
        print(f"pdsh@stand-in: {{host}}: ssh exited with exit code 255", file=sys.stderr)
        codes.append(255)
        continue
    procs.append(start(host, command.replace("%n", str(index))))
codes += wait_all(procs)
sys.exit(max([c if c >= 0 else 128 - c for c in codes] or [0]))
'''


@pytest.fixture
def remote_shell(two_nodes, tmp_path):
    """Stand-in ``ssh`` and ``pdsh`` (a bin directory to put first on PATH) that reach the test bed's nodes by the
    host names node0 and node1; ``write(**per_host)`` writes the host map (a host's env, its private directory,
    ``down``) and returns the environment a deepspeed runner on node0 needs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ssh", "pdsh"):
        (bin_dir / name).write_text(REMOTE.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    hosts_file = tmp_path / "hosts.json"

    def write(**per_host) -> dict:
        hosts = {f"node{n}": {"ns": two_nodes.ns[n], "env": {}} for n in (0, 1)}
        for host, extra in per_host.items():
            hosts.setdefault(host, {"ns": two_nodes.ns[0], "env": {}}).update(extra)
        hosts_file.write_text(json.dumps({h: dict(v, private=str(v["private"]) if v.get("private") else None)
                                          for h, v in hosts.items()}))
        return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ZEROMEGA_TEST_HOSTS": str(hosts_file),
                "ZEROMEGA_TEST_NODE": "node0"}

    return write


def start_deepspeed(bed: Bed, hostfile: Path, script: str, args: list[str], env: dict, port: int,
                    private: Path | None = None, cwd: Path | None = None) -> Node:
    """``zeromega launch --hostfile`` (the deepspeed runner, through the stand-in pdsh) on node 0."""
    token = uuid.uuid4().hex
    full_env = launch_env(token, {**private_env(private), **env}, drop=NODE_ENV_DROPPED)
    cmd = on_node(bed, 0, [sys.executable, "-m", "zeromega", "launch", "--hostfile", str(hostfile), "--master_addr",
                           bed.addr[0], "--master_port", str(port), script, *args], private)
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd)
    return Node(proc, token)


@pytest.mark.slow
def test_deepspeed_runner_across_nodes_matches_one_node(two_nodes, remote_shell, tmp_path, small_corpus):
    """`zeromega launch --hostfile` with node0 and node1 (1 slot each): the deepspeed runner's pdsh backend starts
    node 1's rank in the other namespace (environment not inherited: the settings ride in the rank's argv, the
    rank finds its interface toward the master itself); the losses equal one node x 2 processes."""
    args = GPT_ARGS + ["--data-path", small_corpus, "--train-iters", "4"]
    one = one_node(tmp_path, args + ["--metrics-out", str(tmp_path / "one.jsonl")])
    assert one.returncode == 0, one.stderr[-3000:]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    one_thread = {"env": {"OMP_NUM_THREADS": "1"}}
    env = remote_shell(node0=one_thread, node1=one_thread)
    started = time.monotonic()
    node = start_deepspeed(two_nodes, hostfile, GPT, args + ["--metrics-out", str(tmp_path / "two.jsonl")], env,
                           port(), cwd=tmp_path)
    finish([node], started)
    print(f"deepspeed runner, 2 nodes x 1 rank: {node.seconds:.1f} s")
    assert node.proc.returncode == 0, node.err[-3000:] + node.out[-2000:]
    want, got = curve(tmp_path / "one.jsonl"), curve(tmp_path / "two.jsonl")
    assert sorted(got) == [1, 2, 3, 4] and got == want, (got, want)


@pytest.mark.slow
def test_deepspeed_runner_unreachable_host_is_named(two_nodes, remote_shell, tmp_path):
    """A hostfile whose second host ssh cannot reach (the runner's own check asks only the first): one line naming
    the host, as the runner's failure, before any rank starts (none waits for the missing one)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = remote_shell(node1={"down": True})
    marker = tmp_path / "a-rank-started"
    started = time.monotonic()
    node = start_deepspeed(two_nodes, hostfile, WORKER, [], {**env, "ZEROMEGA_TEST_MARKER": str(marker)}, port())
    finish([node], started, timeout=120)
    print(f"unreachable host -> over in {node.seconds:.1f} s: {node.last}")
    assert node.proc.returncode not in (0, None) and not marker.exists()
    assert node.last.startswith("zeromega launch: the deepspeed runner cannot reach node1 over ssh (`ssh node1 "
                                "hostname`: exit code 255: ssh: connect to host node1 port 22: No route to host): "
                                "not a rank's failure, no rank was started"), node.err[-3000:]
    assert survivors(node.token) == []


@pytest.mark.slow
def test_deepspeed_runner_blames_the_lost_node_without_a_shared_tmp(two_nodes, per_node_fs, remote_shell, tmp_path,
                                                                    small_corpus):
    """Per-node /tmp (TMPDIR on each node's own tmpfs): node 1's rank cannot write into the launcher's error
    directory, so only rank 0's error (it lost its peer) reaches the launcher. Rank 1 is SIGKILLed after step 2:
    the line leads with node 1 and rank 1, and says rank 0 stopped because of it (was: rank 0 blamed)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    mark = tmp_path / "killed"  # on the shared filesystem: written by rank 1 just before its SIGKILL
    fault = {"ZEROMEGA_TEST_KILL": "1:2", "ZEROMEGA_TEST_KILL_MARK": str(mark), "OMP_NUM_THREADS": "1",
             **private_env(per_node_fs)}
    env = remote_shell(node0={"env": fault, "private": per_node_fs}, node1={"env": fault, "private": per_node_fs})
    args = GPT_ARGS + ["--data-path", small_corpus, "--train-iters", "200", "--distributed-timeout-minutes", "0.25"]
    started = time.monotonic()
    node = start_deepspeed(two_nodes, hostfile, CKPT_WORKER, args, {**env, **fault}, port(), private=per_node_fs,
                           cwd=tmp_path)
    _wait_for(mark)
    killed = time.monotonic()
    finish([node], started)
    took = node.seconds - (killed - started)
    print(f"deepspeed runner, rank 1 killed on node 1 -> over in {took:.1f} s: {node.last}")
    assert node.proc.returncode not in (0, None)
    assert took < TIMEOUT_S + GRACE_S, took
    lead = f"zeromega launch: lost node 1 ({two_nodes.addr[1]}) with rank 1: the connection to {two_nodes.addr[1]}"
    assert node.last.startswith(lead), node.err[-3000:] + node.out[-3000:]
    assert "this node's rank 0 stopped because of it" in node.last
    assert survivors(node.token) == []
