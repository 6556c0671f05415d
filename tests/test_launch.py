"""The ``zeromega launch`` command, run as users run it: a subprocess on 2 CPU ranks (gloo).

Each job gets a token in its environment, so the tests can find any process
of that job still alive after the launcher exited.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from distributed import launch_env, survivors
from zeromega.launch import launcher
from zeromega.launch.launcher import RankFailure

WORKER = str(Path(__file__).parent / "scripts" / "worker.py")
PRETRAIN = str(Path(__file__).parent.parent / "examples" / "pretrain_gpt.py")
FAILURE_DEADLINE_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def zeromega(*argv: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 150):
    """Run ``python -m zeromega ARGV``; returns (completed process, token, seconds, end time)."""
    token = uuid.uuid4().hex
    full_env = launch_env(token, env)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "zeromega", *argv], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    return proc, token, time.monotonic() - start, time.time()


def rank_lines(stdout: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^rank=(\d+) world=.*$", stdout, re.M)}


# ------------------------------------------------------------------ success


def test_torchrun_allreduce_and_config(tmp_path):
    config = tmp_path / "run.json"
    # a micro batch: next to Megatron flags, Megatron-LM requires one (and DeepSpeed a batch size)
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zeromega": {"tp": 2}}))
    proc, _, _, _ = zeromega("launch", "--nproc-per-node", "2", "--config", "run.json", WORKER,
                             "--tensor-model-parallel-size", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = rank_lines(proc.stdout)
    assert sorted(lines) == [0, 1], proc.stdout
    for line in lines.values():
        assert "world=2 sum=3 " in line  # (0 + 1) + (1 + 1): the all_reduce ran
        assert f"config={config}" in line  # absolute, though given relative to cwd
        assert "omp=1" in line  # set because it was unset
    for rank, line in lines.items():  # the worker declares --local_rank: passed as deepspeed passes it
        assert f"local_rank_arg={rank}" in line


def test_config_launch_section_sets_the_processes_per_node(tmp_path):
    """Without --nproc-per-node, the config's launch.nproc_per_node says how many ranks start."""
    (tmp_path / "run.json").write_text(json.dumps({"launch": {"nproc_per_node": 2}}))  # the unified dialect
    proc, _, _, _ = zeromega("launch", "--config", "run.json", WORKER, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = rank_lines(proc.stdout)
    assert sorted(lines) == [0, 1], proc.stdout
    assert all("world=2 sum=3 " in line for line in lines.values())


def test_deepspeed_launcher_runs_the_script(tmp_path):
    proc, token, _, _ = zeromega(
        "launch", "--launcher", "deepspeed", "--nproc-per-node", "2", "--master-port", str(free_port()), WORKER,
        env={"OMP_NUM_THREADS": "2", launcher.CONFIG_ENV: "/stale/config.json"})
    assert proc.returncode == 0, proc.stderr
    lines = rank_lines(proc.stdout)
    assert sorted(lines) == [0, 1], proc.stdout
    for rank, line in lines.items():
        assert f"local_rank_arg={rank}" in line  # the deepspeed launcher appended --local_rank
        assert "world=2 sum=3 " in line
        assert "omp=2" in line  # left as the user set it
        assert "config=None" in line  # an inherited ZEROMEGA_CONFIG is not passed on
    assert survivors(token) == []


# ------------------------------------------------------------------ failures


def test_rank_exception_is_named_and_every_rank_stops():
    proc, token, seconds, ended = zeromega("launch", "--nproc-per-node", "2", WORKER, "--mode", "raise")
    assert proc.returncode == 1
    assert seconds < FAILURE_DEADLINE_S
    failing_at = float(re.search(r"failing_at=([\d.]+)", proc.stdout).group(1))
    print(f"rank failure -> launcher exit: {ended - failing_at:.2f} s (whole run {seconds:.1f} s)")
    assert ended - failing_at < FAILURE_DEADLINE_S
    assert proc.stderr.splitlines()[-1] == "zeromega launch: rank 1 failed (exit code 1): RuntimeError: boom"
    assert survivors(token) == []


def test_rank_killed_by_signal_is_named():
    # Rank 0 sleeps outside any collective: only the launcher can end it.
    proc, token, seconds, ended = zeromega("launch", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                           "--master-port", str(free_port()), WORKER,
                                           "--mode", "sigkill", "--wait", "sleep")
    failing_at = float(re.search(r"failing_at=([\d.]+)", proc.stdout).group(1))
    print(f"rank SIGKILL -> launcher exit: {ended - failing_at:.2f} s (whole run {seconds:.1f} s)")
    assert proc.returncode == 128 + signal.SIGKILL
    assert ended - failing_at < FAILURE_DEADLINE_S
    assert proc.stderr.splitlines()[-1] == "zeromega launch: rank 1 failed (killed by SIGKILL)"
    assert survivors(token) == []


def test_sigterm_stops_every_rank(tmp_path):
    marker = tmp_path / "started"
    token = uuid.uuid4().hex
    env = dict(os.environ, ZEROMEGA_TEST_TOKEN=token, ZEROMEGA_TEST_MARKER=str(marker))
    cli = subprocess.Popen([sys.executable, "-m", "zeromega", "launch", "--nproc-per-node", "2", WORKER,
                            "--mode", "raise", "--fail-rank", "9", "--wait", "sleep"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "no rank started"
        cli.send_signal(signal.SIGTERM)
        _, stderr = cli.communicate(timeout=FAILURE_DEADLINE_S)
    finally:
        cli.kill()
    assert cli.returncode == 128 + signal.SIGTERM
    assert stderr.splitlines()[-1].startswith("zeromega launch: stopped by SIGTERM")
    assert survivors(token) == []


def test_survivors_finds_a_live_process():
    token = uuid.uuid4().hex
    sleeper = subprocess.Popen(["sleep", "30"], env=dict(os.environ, ZEROMEGA_TEST_TOKEN=token))
    try:
        # until the child has exec'd, /proc/PID/environ is still the parent's (no token): wait for it
        deadline = time.monotonic() + 10
        while not survivors(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.pid for p in survivors(token)] == [sleeper.pid]
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------ bad input

BAD_INPUTS = {
    "missing script": (["--nproc-per-node", "2", "no_such_script.py"], "script 'no_such_script.py' not found"),
    "missing config": (["--nproc-per-node", "2", "--config", "nope.json", WORKER], "no such file"),
    "malformed config": (["--nproc-per-node", "2", "--config", "bad.json", WORKER], "not valid JSON"),
    "config of the wrong shape": (["--nproc-per-node", "2", "--config", "betas.json", WORKER], "cannot read it"),
    "world size": (["--nproc-per-node", "3", WORKER, "--tensor-model-parallel-size", "2"],
                   "world_size=3: not divisible by tp x pp x cp"),
    "config and flag disagree": (["--nproc-per-node", "2", "--config", "tp4.json", WORKER,
                                  "--tensor-model-parallel-size", "2"], "parallel.tp=2"),
    "bad Megatron value": (["--nproc-per-node", "2", WORKER, "--tensor-model-parallel-size", "x"],
                           "invalid int value: 'x'"),
    "unknown option": (["--nproc-per-node", "2", "--bogus", WORKER], "unrecognized arguments: --bogus"),
    "bad number": (["--nproc-per-node", "0", WORKER], "must be >= 1"),
    "hostfile with torchrun": (["--launcher", "torchrun", "--nproc-per-node", "2", "--hostfile", "hosts", WORKER],
                               "deepspeed launcher flags"),
    "hostfile with nnodes": (["--launcher", "deepspeed", "--hostfile", "hosts", "--nnodes", "2",
                              "--nproc-per-node", "1", WORKER], "--hostfile is given together with --nnodes"),
    "node rank": (["--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1",
                   WORKER], "--node-rank 2 is not below --nnodes 2"),
    "nvme path missing": (["--nproc-per-node", "2", "--config", "nvme.json", WORKER],
                          "zero_optimization.offload_optimizer.nvme_path='/nonexistent/zeromega-nvme': does not exist"),
    "config and --nproc-per-node disagree": (["--nproc-per-node", "2", "--config", "nproc3.json", WORKER],
                                             "launch.nproc_per_node=3: --config nproc3.json says 3 processes per "
                                             "node but --nproc-per-node says 2"),
    "no processes per node anywhere": (["--config", "tp4.json", WORKER], "--nproc-per-node is missing"),
    "config nproc with --include": (["--launcher", "deepspeed", "--hostfile", "hosts", "--include", "localhost:0",
                                     "--config", "nproc3.json", WORKER], "launch.nproc_per_node=3: set in --config"),
    "restarts with deepspeed": (["--launcher", "deepspeed", "--nproc-per-node", "2", "--max-restarts", "1", WORKER],
                                "cannot restart"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_starts_nothing(tmp_path, case):
    argv, problem = BAD_INPUTS[case]
    (tmp_path / "bad.json").write_text('{"zero_optimization": ')
    (tmp_path / "betas.json").write_text('{"optimizer": {"type": "AdamW", "params": {"betas": 0.9}}}')
    (tmp_path / "tp4.json").write_text('{"zeromega": {"tp": 4}}')
    (tmp_path / "nproc3.json").write_text('{"zeromega": {"launch": {"nproc_per_node": 3}}}')
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    nvme = {"device": "nvme", "nvme_path": "/nonexistent/zeromega-nvme"}
    (tmp_path / "nvme.json").write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "offload_optimizer": nvme, "offload_param": nvme}}))
    marker = tmp_path / "a-rank-started"
    proc, token, _, _ = zeromega("launch", *argv, cwd=tmp_path, env={"ZEROMEGA_TEST_MARKER": str(marker)})
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("zeromega launch: error: ") and "; fix: " in lines[0]
    assert problem in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not marker.exists()
    assert survivors(token) == []


def test_python_m_zeromega_help():
    top = subprocess.run([sys.executable, "-m", "zeromega", "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and "launch" in top.stdout
    sub = subprocess.run([sys.executable, "-m", "zeromega", "launch", "--help"], capture_output=True, text=True)
    assert sub.returncode == 0
    for flag in ("--nproc-per-node", "--nproc_per_node", "--max-restarts", "--hostfile", "--config", "SCRIPT"):
        assert flag in sub.stdout


def test_a_command_line_refusal_imports_neither_engine():
    """Reading the command line must not import Megatron-Core or DeepSpeed (each costs seconds on 2 cores):
    a typo is answered at once. The parser of every subcommand is built, as ``zeromega`` builds it."""
    code = ("import sys; from zeromega.launch import cli\n"
            "try:\n    cli.main(['launch', '--nproc-per-node', '0', 'x.py'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('megatron.core', 'deepspeed', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--nproc-per-node 0: must be >= 1" in proc.stderr, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


# ------------------------------------------------------------------ units


def _failure(exitcode: int, error_file: str = "<N/A>") -> SimpleNamespace:
    return SimpleNamespace(exitcode=exitcode, error_file=error_file)


def test_root_cause_prefers_the_rank_that_started_it(tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text("{}")
    second.write_text("{}")
    os.utime(first, ns=(1_000, 1_000))
    os.utime(second, ns=(2_000, 2_000))
    # The agent SIGTERMed rank 0 while stopping the job: rank 1 started it.
    assert launcher.root_cause({0: _failure(-15, str(first)), 1: _failure(3)})[0] == 1
    # Both recorded an exception: the one written first.
    assert launcher.root_cause({0: _failure(1, str(second)), 1: _failure(1, str(first))})[0] == 1
    # A signal death without a record beats the peer's "connection closed" record.
    assert launcher.root_cause({0: _failure(1, str(first)), 1: _failure(-9)})[0] == 1


def test_failure_line_and_exit_status():
    assert RankFailure(1, 1, "RuntimeError: boom").describe() == "rank 1 failed (exit code 1): RuntimeError: boom"
    assert RankFailure(1, -9).describe() == "rank 1 failed (killed by SIGKILL)"
    assert RankFailure(1, -9).exit_status == 137
    assert RankFailure(0, 3).exit_status == 3
    assert RankFailure(0, 300).exit_status == 1
    # The deepspeed launcher exits with sys.exit(-9) for a SIGKILLed rank: the shell sees 247.
    assert launcher._decode_deepspeed_status(256 - 9) == -9
    assert launcher._decode_deepspeed_status(1) == 1


def test_torchrun_argv_uses_standalone_rendezvous_on_one_node():
    job = launcher.Job(script="s.py", script_args=["--x"], nproc_per_node=2, max_restarts=2)
    argv = launcher.torchrun_argv(job)
    assert "--standalone" in argv and argv[-2:] == ["s.py", "--x"]
    assert argv[argv.index("--max-restarts") + 1] == "2"
    fixed = launcher.torchrun_argv(launcher.Job(script="s.py", nproc_per_node=2, master_port=1234))
    assert "--standalone" not in fixed and fixed[fixed.index("--master-port") + 1] == "1234"


def test_config_path_from_env(monkeypatch):
    monkeypatch.delenv(launcher.CONFIG_ENV, raising=False)
    assert launcher.config_path_from_env() is None
    monkeypatch.setenv(launcher.CONFIG_ENV, "/abs/run.json")
    assert launcher.config_path_from_env() == "/abs/run.json"


def test_deepspeed_rank_entry_gives_each_rank_its_error_file(tmp_path):
    # What the deepspeed launcher runs per rank:
    #   python -u -m zeromega.launch.launcher --local_rank=N SETTINGS SCRIPT ARGS
    script = tmp_path / "show.py"
    script.write_text("import json, os, sys\n"
                      "print(json.dumps({'argv': sys.argv, 'pid': os.getpid(), 'env': {k: os.environ.get(k) for k in "
                      "('TORCHELASTIC_ERROR_FILE', 'ZEROMEGA_CONFIG', 'OMP_NUM_THREADS')}}))\n")
    settings = {"set": {launcher.CONFIG_ENV: "/abs/run.json"}, "default": {"OMP_NUM_THREADS": "1"},
                "drop": [], "error_dir": str(tmp_path)}
    blob = base64.urlsafe_b64encode(json.dumps(settings).encode()).decode()
    env = dict(os.environ, RANK="3", OMP_NUM_THREADS="4")
    entry = subprocess.Popen([sys.executable, "-u", "-m", "zeromega.launch.launcher", "--local_rank=1", blob,
                              str(script), "--x", "y"], env=env, stdout=subprocess.PIPE, text=True)
    shown = json.loads(entry.communicate(timeout=60)[0])
    assert shown["pid"] == entry.pid  # exec'd in place: the launcher still sees the script's status
    assert shown["argv"] == [str(script), "--local_rank=1", "--x", "y"]  # deepspeed's own order
    assert shown["env"] == {"TORCHELASTIC_ERROR_FILE": str(tmp_path / "rank3.json"),
                            "ZEROMEGA_CONFIG": "/abs/run.json", "OMP_NUM_THREADS": "4"}


def test_deepspeed_failure_is_read_from_the_error_files(tmp_path):
    def record(rank: int, message: str, mtime_ns: int) -> None:
        path = tmp_path / f"rank{rank}.json"
        path.write_text(json.dumps({"message": {"message": message, "extraInfo": {"timestamp": "0"}}}))
        os.utime(path, ns=(mtime_ns, mtime_ns))

    record(0, "RuntimeError: Connection closed by peer", 2_000)
    record(1, "RuntimeError: boom", 1_000)
    assert launcher._deepspeed_failure(1, str(tmp_path)) == RankFailure(1, 1, "RuntimeError: boom")
    # A signal death writes no file: the files are the peers', so no rank is named.
    assert launcher._deepspeed_failure(256 - 9, str(tmp_path)) == RankFailure(None, -9)


def test_default_hostfile_matches_deepspeed():
    from deepspeed.launcher.runner import DLTS_HOSTFILE

    assert launcher.DEEPSPEED_DEFAULT_HOSTFILE == DLTS_HOSTFILE


@pytest.mark.parametrize("runner", ["torchrun", "deepspeed"])
def test_ranks_die_with_a_killed_launcher(tmp_path, runner):
    """SIGKILL of `zeromega launch` (no chance to stop its ranks) still ends every rank within seconds:
    each rank asked the kernel for a signal when its parent exits (PR_SET_PDEATHSIG)."""
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", launcher.CONFIG_ENV)}
    env.update(ZEROMEGA_TEST_TOKEN=token)
    extra = ["--launcher", "deepspeed", "--master-port", str(free_port())] if runner == "deepspeed" else []
    proc = subprocess.Popen([sys.executable, "-m", "zeromega", "launch", "--nproc-per-node", "2", *extra, WORKER,
                             "--mode", "sleep"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while len([p for p in survivors(token) if WORKER in " ".join(p.cmdline())]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.5)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while survivors(token) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = survivors(token)
        assert not left, f"alive 15 s after the launcher was killed: {[p.cmdline() for p in left]}"
    finally:
        for p in survivors(token):
            p.kill()


def test_output_cut_short_by_a_pipe_ends_quietly(tmp_path):
    """`zeromega check ... | head -1`: the reader leaves early; no BrokenPipeError traceback, exit 141."""
    config = tmp_path / "big.yaml"
    config.write_text("parallel: {tp: 2}\nbatch: {micro: 1}\n")
    proc = subprocess.run(f"{sys.executable} -m zeromega check {config} --world-size 65536 | head -1; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.startswith("world 65536"), proc.stdout
    assert "Traceback" not in proc.stderr and proc.returncode == 141, (proc.returncode, proc.stderr[-500:])


# ------------------------------------------------------------------ torchrun's and deepspeed's flags (issue 17)


@pytest.fixture
def started(monkeypatch):
    """Run `zeromega launch` in this process with the launch itself replaced: returns (exit code, Job, kind)."""
    from zeromega.launch import cli

    seen = {}

    def fake_launch(job, kind="torchrun"):
        seen.update(job=job, kind=kind)
        return None

    monkeypatch.setattr(launcher, "launch", fake_launch)
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "SLURM_JOB_ID", "SLURM_NNODES", "SLURM_NODEID",
                 "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NODELIST"):
        monkeypatch.delenv(name, raising=False)

    def run(*argv):
        seen.clear()
        code = cli.main(["launch", *argv])
        return code, seen.get("job"), seen.get("kind")

    return run


def test_torchrun_flags_are_read_by_torchruns_parser(started, tmp_path):
    from torch.distributed.run import config_from_args, parse_args

    code, job, kind = started("--nnodes", "1:2", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "job7", "--rdzv-conf",
                              "join_timeout=30", "--log-dir", str(tmp_path / "logs"), "--redirects", "3",
                              "--monitor-interval", "0.5", WORKER, "--x")
    assert code == 0 and kind == "torchrun"
    assert (job.min_nodes, job.nnodes, job.nproc_per_node) == (1, 2, 2)
    assert job.torchrun_args == ["--log-dir", str(tmp_path / "logs"), "--redirects", "3", "--monitor-interval", "0.5"]
    config, entry, args = config_from_args(parse_args(launcher.torchrun_argv(job)))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 2, 2)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "10.0.0.1:29400", "job7")
    assert config.rdzv_configs["join_timeout"] == "30" and config.monitor_interval == 0.5
    assert args[-1] == "--x" and WORKER in args  # the worker declares --local_rank: through the rank entry
    assert config.logs_specs.root_log_dir == str(tmp_path / "logs")


def test_multi_node_uses_c10d_rendezvous_not_static(started):
    code, job, _ = started("--nnodes", "2", "--node-rank", "1", "--master-addr", "10.9.8.7", "--master-port", "2345",
                           "--nproc-per-node", "1", WORKER)
    assert code == 0
    argv = launcher.torchrun_argv(job)
    from torch.distributed.run import parse_args

    ns = parse_args(argv)
    assert (ns.rdzv_backend, ns.rdzv_endpoint) == ("c10d", "10.9.8.7:2345")
    assert ns.rdzv_id == "zeromega-10.9.8.7-2345"  # the same on every node
    assert "is_host=1" not in ns.rdzv_conf  # 10.9.8.7 is not this machine's


def test_module_and_no_python_and_standalone(started):
    code, job, _ = started("--nproc-per-node", "1", "-m", "json.tool", "--help")
    assert code == 0 and job.module and job.script == "json.tool" and job.script_args == ["--help"]
    argv = launcher.torchrun_argv(job)
    assert argv[-3:] == ["-m", "json.tool", "--help"]


def test_deepspeed_flags_are_read_by_deepspeeds_parser(started, tmp_path):
    from deepspeed.launcher.runner import parse_args as deepspeed_parse

    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=3\n")
    code, job, kind = started("-H", str(hosts), "--launcher", "openmpi", "--no_ssh_check", "--enable_each_rank_log",
                              str(tmp_path / "logs"), "--master_port", "29511", WORKER, "--y")
    assert code == 0 and kind == "deepspeed"
    assert job.hostfile == str(hosts) and job.master_port == 29511
    assert launcher.deepspeed_world_size(job) == 3  # the hostfile's slots
    cmd = launcher.deepspeed_command(job, 29511, {})
    ns = deepspeed_parse(cmd[cmd.index("deepspeed.launcher.runner") + 1:])
    assert (ns.launcher, ns.no_ssh_check, ns.enable_each_rank_log) == ("openmpi", True, str(tmp_path / "logs"))
    assert ns.hostfile == str(hosts) and ns.module and ns.user_script == "zeromega.launch.launcher"
    assert ns.user_args[-2:] == [WORKER, "--y"]


def test_hostfile_slots_include_exclude_and_num_nodes(started, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=4\n")
    for flags, world in ((["-i", "localhost:1,3"], 2), (["-e", "localhost:0"], 3), (["--num_gpus", "2"], 2),
                         (["--num_nodes", "1"], 4)):
        code, job, kind = started("--hostfile", str(hosts), *flags, WORKER)
        assert code == 0 and kind == "deepspeed", flags
        assert launcher.deepspeed_world_size(job) == world, flags


def test_a_scripts_own_arguments_are_left_alone(started, tmp_path, capsys):
    """Megatron pre-flight reads the arguments of zeromega's own scripts only: a plain script's --lr or
    --tensor-model-parallel-size is its own business."""
    plain = tmp_path / "train.py"
    plain.write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--lr')\n")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1,
                                  "optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}))
    code, job, _ = started("--nproc-per-node", "2", "--config", str(config), str(plain), "--lr", "0.5",
                           "--tensor-model-parallel-size", "4")
    assert code == 0 and job.script_args == ["--lr", "0.5", "--tensor-model-parallel-size", "4"]
    assert job.local_rank_flag is None  # it declares no --local_rank
    code, job, _ = started("--nproc-per-node", "2", WORKER, "--tensor-model-parallel-size", "4")  # zeromega's
    assert code == 2 and job is None
    assert "not divisible by tp" in capsys.readouterr().err


def test_local_rank_is_passed_the_way_the_script_declares_it(tmp_path):
    from zeromega.launch import launch_flags

    assert launch_flags.local_rank_flag('p.add_argument("--local_rank", type=int)') == "--local_rank"
    assert launch_flags.local_rank_flag("p.add_argument('--local-rank', type=int)") == "--local-rank"
    assert launch_flags.local_rank_flag("p.add_argument('--lr')") is None
    script = tmp_path / "show.py"
    script.write_text("import sys; print(sys.argv[1:])\n")
    blob = launcher._settings_blob({"local_rank_flag": "--local-rank"})
    out = subprocess.run([sys.executable, "-m", "zeromega.launch.launcher", "--local_rank=env", blob, str(script),
                          "--a"], env=dict(os.environ, LOCAL_RANK="3"), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "['--local-rank=3', '--a']", out.stderr


def test_slurm_variables_give_nodes_rank_and_master(started, monkeypatch):
    from zeromega.launch import launch_flags

    monkeypatch.setattr(launch_flags.shutil, "which", lambda name: None)  # the small parser, not scontrol
    assert launch_flags.expand_nodelist("gpu[01-03,7],login5,x[2]") == ["gpu01", "gpu02", "gpu03", "gpu7",
                                                                         "login5", "x2"]
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[07-08]")
    code, job, _ = started("--nproc-per-node", "1", WORKER)
    assert code == 0
    assert (job.nnodes, job.node_rank, job.master_addr, job.rdzv_id) == (2, 1, "node07", "4242")
    from torch.distributed.run import parse_args

    ns = parse_args(launcher.torchrun_argv(job))
    assert (ns.rdzv_backend, ns.rdzv_endpoint, ns.rdzv_id) == ("c10d", "node07:29500", "4242")


def test_version(capsys):
    from zeromega.launch import cli
    from zeromega.version import __version__

    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"zeromega {__version__} (torch 2.13") and "deepspeed 0.19" in out, out


def test_network_interface_choice(monkeypatch):
    from zeromega.launch import network

    assert network.socket_ifname_settings("127.0.0.1", None, {}) == ({}, None)  # one machine
    assert network.socket_ifname_settings("127.0.0.1", "eth9", {})[0] == {"GLOO_SOCKET_IFNAME": "eth9",
                                                                          "NCCL_SOCKET_IFNAME": "eth9"}
    # the interface routing to an address of this machine's is the one that owns it
    lo = network.interface_to("127.0.0.1")
    assert lo is not None and "127.0.0.1" in network.interface_addresses()[lo]
    monkeypatch.setattr(network, "interface_to", lambda host: "ib0")
    monkeypatch.setattr(network, "is_loopback", lambda host: False)
    assert network.socket_ifname_settings("10.1.1.1", None, {"GLOO_SOCKET_IFNAME": "mine"})[0] == {
        "NCCL_SOCKET_IFNAME": "ib0"}  # the user's own setting stays


def test_topology_warnings_name_groups_that_span_nodes():
    from zeromega.config.groups import rank_groups
    from zeromega.config.schema import Layout  # noqa: F401
    from zeromega.launch import cli_common, translate

    cfg = translate.build(None, megatron_argv=["--tensor-model-parallel-size", "4", "--micro-batch-size", "1"])
    groups = rank_groups(cfg.layout(8))
    warned = cli_common.topology_warnings(groups, per_node=2)
    assert any(line.startswith("2 of 2 tp groups (size 4) span nodes") for line in warned), warned
    assert cli_common.topology_warnings(groups, per_node=4) == []  # tp 4 inside each 4-process node
    lines = cli_common.node_map(groups, per_node=4, nodes=2)
    assert lines[:2] == ["node 0: ranks 0-3", "node 1: ranks 4-7"]
    assert any(line.split()[:3] == ["tp", "inside", "nodes"] for line in lines), lines


def test_heartbeat_store_read_has_a_deadline():
    """A store that never answers (a partition: TCP waits minutes) ends the read at the deadline."""
    from zeromega.integrations import heartbeat

    start = time.monotonic()
    with pytest.raises(heartbeat.StoreUnreachable):
        heartbeat.bounded(lambda: time.sleep(30), 0.5)
    assert time.monotonic() - start < 5
    assert heartbeat.bounded(lambda: 7, 0.5) == 7


@pytest.mark.parametrize("runner", ["torchrun", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_unmodified_deepspeed_script_runs_under_zeromega_launch(tmp_path, runner):
    """A DeepSpeed tutorial-style train.py (--local_rank, its own --lr, --deepspeed_config) runs as it is,
    under torchrun (zeromega appends --local_rank) and under the deepspeed runner (which does)."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
                                  "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "torch_adam": True}}}))
    # torch_adam: without it DeepSpeed JIT-builds its fused Adam op for the CPU (minutes on a fresh machine)
    script = str(Path(__file__).parent / "scripts" / "ds_style_train.py")
    extra = ["--launcher", "deepspeed", "--master_port", str(free_port())] if runner == "deepspeed" else []
    proc, token, _, _ = zeromega("launch", "--nproc-per-node", "2", *extra, "--config", str(config), script,
                                 "--deepspeed_config", str(config), "--lr", "0.5", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"rank"')),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in shown] == [0, 1], proc.stdout
    for r in shown:
        assert r["local_rank_arg"] == r["LOCAL_RANK"] == r["rank"]
        assert r["lr"] == 0.5 and r["optimizer_lr"] == 0.001  # its own --lr, the JSON's optimizer
    assert survivors(token) == []


def test_rendezvous_failure_is_reported_as_such():
    """A node alone where two are expected: the rendezvous times out, and the line says so (no rank 'failed')."""
    proc, token, seconds, _ = zeromega("launch", "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1",
                                       "--master-port", str(free_port()), "--rdzv-conf", "join_timeout=3",
                                       "--nproc-per-node", "1", WORKER)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("zeromega launch: rendezvous at 127.0.0.1:"), last
    assert "RendezvousTimeoutError" in last and "not a rank's failure" in last, last
    assert survivors(token) == []


def test_deepspeed_runner_failure_is_not_a_rank_failure(tmp_path):
    """The deepspeed runner cannot reach a host (its ssh check): no rank started, and the line says so, naming
    the host."""
    hosts = tmp_path / "hosts"
    hosts.write_text("zeromega-no-such-host.invalid slots=1\n")
    marker = tmp_path / "a-rank-started"
    proc, token, _, _ = zeromega("launch", "--hostfile", str(hosts), "--master_addr", "127.0.0.1", WORKER,
                                 env={"ZEROMEGA_TEST_MARKER": str(marker)})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and not marker.exists()
    assert last.startswith("zeromega launch: the deepspeed runner cannot reach zeromega-no-such-host.invalid over "
                           "ssh (`ssh zeromega-no-such-host.invalid hostname`: exit code 255"), last
    assert "not a rank's failure, no rank was started" in last, last
    assert survivors(token) == []


def test_check_prints_the_group_map_per_node(tmp_path, capsys):
    from zeromega.launch import cli

    config = tmp_path / "tp4.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zeromega": {"tp": 4}}))
    assert cli.main(["check", str(config), "--nodes", "2", "--nproc-per-node", "2"]) == 0
    out, err = capsys.readouterr()
    assert "nodes: 2 x 2 processes\nnode 0: ranks 0-1\nnode 1: ranks 2-3\n" in out
    assert "  tp         1 of 1 span nodes      n0:0,1+n1:2,3" in out
    assert "warning: 1 of 1 tp groups (size 4) span nodes" in err
    assert cli.main(["check", str(config), "--nodes", "1", "--nproc-per-node", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == {"count": 1, "nproc_per_node": 4, "spanning": {}}
    assert cli.main(["check", str(config), "--nodes", "3"]) == 2  # processes per node unknown


# Launcher-flag refusals, checked in this process (no rank could start: the launch itself is replaced).
FLAG_REFUSALS = {
    "deepspeed flag with torchrun": (["--launcher", "torchrun", "--num_gpus", "2", WORKER], "--num_gpus: deepspeed"),
    "elastic nodes backwards": (["--nproc-per-node", "1", "--nnodes", "3:2", "--master-addr", "127.0.0.1", WORKER],
                                "--nnodes 3:2"),
    "no such interface": (["--nproc-per-node", "1", "--network-interface", "nosuch0", WORKER],
                          "--network-interface nosuch0: no such interface"),
    "torchrun flag with deepspeed": (["--launcher", "deepspeed", "--nproc-per-node", "1", "--log-dir", "d", WORKER],
                                     "--log-dir is a torchrun flag"),
    "nproc and num_gpus disagree": (["--nproc-per-node", "2", "--num_gpus", "1", WORKER], "disagree"),
    "misspelt deepspeed flag": (["--num_gpu", "2", WORKER], "unrecognized arguments: --num_gpu"),
    # zeromega's own scripts: what the script would refuse in every rank is refused before any rank starts
    "misspelt flag of pretrain_gpt.py": (["--nproc-per-node", "2", PRETRAIN, "--num-layer", "2", "--lr", "1e-3"],
                                         "did you mean --num-layers?"),
    "pretrain_gpt.py without a learning rate": (["--nproc-per-node", "2", PRETRAIN, "--num-layers", "2"],
                                                "optimizer.lr=None"),
}


@pytest.mark.parametrize("case", list(FLAG_REFUSALS))
def test_launcher_flag_refusals_are_one_line(started, capsys, case):
    argv, problem = FLAG_REFUSALS[case]
    code, job, _ = started(*argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and job is None
    assert len(lines) == 1 and lines[0].startswith("zeromega launch: error: ") and "; fix: " in lines[0], lines
    assert problem in lines[0], lines
