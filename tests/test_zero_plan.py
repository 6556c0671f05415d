"""The memory plan, the pre-flight checks and ``zeromega plan``: pure functions, no process group."""

from __future__ import annotations

import json
import os

import pytest

from zeromega.config.errors import ConfigError
from zeromega.plugins.zero import defaults, preflight
from zeromega.plugins.zero import plan as zplan

P = 1_000_000


def _ds(stage, precision="bf16", optimizer="none", param="none", path="/tmp", **zero):
    ds = {"zero_optimization": {"stage": stage, **zero}, "bf16": {"enabled": precision == "bf16"},
          "fp16": {"enabled": precision == "fp16"}}
    if optimizer != "none":
        ds["zero_optimization"]["offload_optimizer"] = {"device": optimizer, "nvme_path": path}
    if param != "none":
        ds["zero_optimization"]["offload_param"] = {"device": param, "nvme_path": path}
    return ds


def _model(params=P):
    return zplan.ModelSize(params=params, total_params=params, largest_tensor=params // 10,
                           largest_layer=params // 5)


@pytest.mark.parametrize("stage,expected", [(0, 16 * P), (1, 4 * P + 12 * P // 4), (2, 2 * P + 14 * P // 4),
                                            (3, 16 * P // 4)])
def test_paper_arithmetic_mixed_precision(stage, expected):
    """16 bytes/param mixed-precision Adam: 2+2+12/N, 2+14/N, 16/N (ZeRO paper, Rajbhandari et al. 2020)."""
    plan = zplan.plan_memory(_ds(stage), _model(), dp=4)
    assert plan.paper_bytes() == expected


def test_engine_rows_follow_deepspeed():
    """Every stage clones an fp32 master, also for fp32 models (ZeRO-3's reuse branch never matches);
    ZeRO-3 keeps its reduce bucket at full size and flattens one sub-group's fp32 gradients per step."""
    z2 = {r.name: r.bytes for r in zplan.plan_memory(_ds(2, "fp32"), _model(), dp=2).rows}
    assert z2["optimizer states (master, m, v)"] == 12 * P // 2
    z3 = {r.name: r for r in zplan.plan_memory(_ds(3, "fp32", sub_group_size=P // 4), _model(), dp=2).rows}
    assert z3["optimizer states (master, m, v)"].bytes == 12 * P // 2
    assert not z3["reduce bucket (kept)"].transient
    assert z3["fp32 gradients of the sub-group stepped"].bytes == 4 * (P // 4)
    assert z3["fp32 gradients of the sub-group stepped"].phase == "step"
    z3bf = {r.name: r.bytes for r in zplan.plan_memory(_ds(3, "bf16"), _model(), dp=2).rows}
    assert z3bf["optimizer states (master, m, v)"] == 12 * P // 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero1_gradients_live_as_deepspeed_holds_them(precision):
    """ZeRO-1 (no offload): the full gradients only while micro-batches accumulate, the reduced partition
    from the boundary to the end of the update, its flattened fp32 copy beside AdamW's temporaries during
    the step; what stays between steps is parameters + master, m, v (measured: 4 P + 12 P/N, fp32)."""
    lp = 4 if precision == "fp32" else 2
    plan = zplan.plan_memory(_ds(1, precision, reduce_bucket_size=P // 10), _model(), dp=2)
    rows = {(r.name, r.phase if r.transient else "resident"): r.bytes for r in plan.rows}
    assert sum(b for (_, ph), b in rows.items() if ph == "resident") == lp * P + 12 * P // 2
    assert rows[("gradients (accumulated)", "backward")] == lp * P
    assert rows[("reduced gradient partition", "backward")] == rows[("reduced gradient partition", "step")] \
        == lp * P // 2
    assert rows[("flattened fp32 gradient partition", "step")] == 4 * P // 2
    backward = lp * P + lp * P // 2 + 4 * P // 10  # + the reduce bucket (no activation shape here)
    step = lp * P // 2 + 4 * P // 2 + 8 * P // 2
    assert plan.peak("cpu") == plan.baseline + lp * P + 12 * P // 2 + max(backward, step, lp * P)
    # ZeRO-1 with the optimizer offloaded keeps the rows it had (not measured here)
    offload = {r.name for r in zplan.plan_memory(_ds(1, precision, optimizer="cpu"), _model(), dp=2).rows}
    assert "gradients" in offload and "reduced gradient partition" not in offload


def test_nvme_offload_moves_states_to_disk_and_adds_locked_buffers():
    ds = _ds(3, optimizer="nvme", param="nvme", sub_group_size=2e7)
    ds["zero_optimization"]["offload_param"].update(max_in_cpu=0, buffer_count=16, buffer_size=1e6)
    plan = zplan.plan_memory(ds, _model(8 * P), dp=2)
    # per rank (8P/2 each): master, m, v + fp32 gradient swap (16 B) and bf16 params (2 B)
    assert plan.nvme_bytes == pytest.approx(16 * 4 * P + 2 * 4 * P, rel=1e-3)
    # optimizer: 4 buffers x min(2e7, 4e6) fp32; params: 16 x 1e6 bf16, and the swap-out buffer
    # DeepSpeed sizes by the whole tensors of the largest sub-group: N x min(2e7, 4e6) bf16
    assert plan.pinned_bytes == pytest.approx(4 * 4 * 4 * P + 16 * 2 * P + 2 * 2 * 4 * P, rel=1e-3)
    assert plan.total("device") < zplan.plan_memory(_ds(3), _model(8 * P), dp=2).total("device")


def test_activation_formula_variants():
    shape = dict(num_layers=2, hidden_size=1024, num_attention_heads=16)
    act = zplan.Activations(seq_length=2048, micro_batch=1)
    s, b, h, a = 2048, 1, 1024, 16
    full, _ = zplan.activation_bytes(shape, act)
    assert full == int(2 * s * b * h * (34 + 5 * a * s / h))
    tp2, _ = zplan.activation_bytes(shape, act, tp=2)
    assert tp2 == int(2 * s * b * h * (10 + 24 / 2 + 5 * a * s / h / 2))
    sp2, _ = zplan.activation_bytes(shape, zplan.Activations(2048, 1, sequence_parallel=True), tp=2)
    assert sp2 == full // 2
    sel, _ = zplan.activation_bytes(shape, zplan.Activations(2048, 1, recompute="selective"))
    assert sel == int(2 * s * b * h * 34)
    assert zplan.activation_bytes(shape, zplan.Activations(2048, 1, recompute="full"))[0] < full


def test_activations_under_cp_and_fused_attention():
    """cp (Ulysses or ring) gives each rank s/cp of the sequence: every term divides by cp (the scores too:
    Ulysses holds a/cp heads of the whole sequence); fused / flash attention keeps no s x s scores, the bytes
    of selective recomputation (Korthikanti et al. 2022)."""
    shape = dict(num_layers=4, hidden_size=1024, num_attention_heads=16)
    s, h, a, L = 131072, 1024, 16, 4
    whole, _ = zplan.activation_bytes(shape, zplan.Activations(s, 1))
    cp16, text = zplan.activation_bytes(shape, zplan.Activations(s, 1, cp=16))
    assert cp16 == pytest.approx(whole / 16, rel=1e-9) and "(s/cp)bh" in text
    flash, text = zplan.activation_bytes(shape, zplan.Activations(s, 1, cp=16, flash=True))
    assert flash == pytest.approx(L * s / 16 * h * 34, rel=1e-9) and "5as" not in text
    assert flash == zplan.activation_bytes(shape, zplan.Activations(s, 1, cp=16, recompute="selective"))[0]
    assert whole / flash > 1000  # 128K tokens: the s^2 term was 5as/h = 10,240 x sbh per layer


def test_pipeline_stage_activations_full_recompute_and_interleaving():
    """Full recompute on a stage: 2sbh per layer-micro-batch in flight plus one layer rebuilt once; interleaved:
    the first stage holds p (1 + (p-1)/(p v)) micro-batches' worth of its L/p layers."""
    from types import SimpleNamespace

    shape = dict(num_layers=16, hidden_size=1024, num_attention_heads=16, seq_length=2048, vocab_size=32000)
    s, b, h = 2048, 1, 1024

    def first_stage(**kw):
        layout = SimpleNamespace(pp=4, tp=1, dp=1, cp=1, ep=1, etp=None, micro=1, accumulation=16, **kw)
        plan = zplan.plan_pipeline("bf16", layout, shape, recompute=kw.pop("recompute", None))
        return {r.name: r.bytes for r in plan.stages[0].rows}["activations"]

    one_layer, _ = zplan.activation_bytes({**shape, "num_layers": 1}, zplan.Activations(s, b))
    layout = SimpleNamespace(pp=4, tp=1, dp=1, cp=1, ep=1, etp=None, vpp=None, micro=1, accumulation=16)
    full = {r.name: r.bytes for r in zplan.plan_pipeline("bf16", layout, shape, recompute="full").stages[0].rows}
    assert full["activations"] == 4 * 4 * 2 * s * b * h + one_layer  # 4 micro-batches x 4 layers x 2sbh + 1 layer
    plain = first_stage(vpp=None)
    inter = first_stage(vpp=2)
    p, v = 4, 2
    assert inter / plain == pytest.approx((1 + (p - 1) / (p * v)), rel=1e-9)


def test_gpt_size_counts_megatron_core_parameters():
    """Counted against the built models (tests/zero_workers.count_params, tp 1 and 2): exact."""
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=257)
    assert zplan.gpt_size(**shape).params == 128768
    assert zplan.gpt_size(tp=2, **shape).params == 66880
    gqa = dict(num_layers=3, hidden_size=96, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=200,
               seq_length=32, vocab_size=1000)
    assert zplan.gpt_size(**gqa).params == 288648
    assert zplan.gpt_size(tp=2, **gqa).params == 146820


# ------------------------------------------------------------------ pre-flight


def _machine(**kw):
    base = dict(available_ram=20 * 2**30, memlock_limit=8 * 2**20, can_lock_any=False, fp16_supported=False)
    return preflight.Machine(**{**base, **kw})


@pytest.mark.parametrize("ds,field,fix", [
    (_ds(2, optimizer="nvme"), "zero_optimization.offload_optimizer.device", "stage to 3"),
    (_ds(1, optimizer="nvme"), "zero_optimization.offload_optimizer.device", "stage to 3"),
    (_ds(2, param="cpu"), "zero_optimization.offload_param.device", "stage to 3"),
    (_ds(0, optimizer="cpu"), "zero_optimization.offload_optimizer.device", "stage to 1"),
    (_ds(3, precision="fp16"), "fp16.enabled", "use bf16"),
    (_ds(3, optimizer="nvme", path=None), "zero_optimization.offload_optimizer.nvme_path", "directory"),
])
def test_refuses_what_deepspeed_silently_ignores(ds, field, fix):
    with pytest.raises(ConfigError) as err:
        preflight.check_combinations(ds, "cpu", fp16_supported=False)
    assert err.value.field == field and fix in err.value.fix


def test_fp16_allowed_where_supported():
    preflight.check_combinations(_ds(3, precision="fp16"), "cuda", fp16_supported=True)


def test_nvme_param_offload_is_corrected_out_loud():
    plan = zplan.plan_memory(_ds(3, param="nvme"), _model(8 * P), dp=2)
    ds, changes = preflight.correct(_ds(3, param="nvme"), plan)
    fields = {c.field: c.new for c in changes}
    assert fields["zero_optimization.offload_param.max_in_cpu"] == 0
    assert fields["zero_optimization.stage3_prefetch_bucket_size"] == 0
    assert fields["zero_optimization.offload_param.buffer_size"] >= 8 * P // 10 // 2
    assert ds["zero_optimization"]["offload_param"]["buffer_count"] >= 8
    assert all(str(c) for c in changes)
    again, none = preflight.correct(ds, plan)
    assert none == [] and again == ds


def test_nvme_optimizer_default_sub_group_is_corrected():
    ds = _ds(3, optimizer="nvme", sub_group_size=1e9)
    _, changes = preflight.correct(ds, zplan.plan_memory(ds, _model(), dp=2))
    assert [c.field for c in changes] == ["zero_optimization.sub_group_size"]


def test_nvme_path_checks(tmp_path):
    preflight.check_nvme_path(str(tmp_path), "x.nvme_path", 1024)
    with pytest.raises(ConfigError, match="does not exist; fix: create it"):
        preflight.check_nvme_path(str(tmp_path / "missing"), "x.nvme_path", 1)
    with pytest.raises(ConfigError, match="GiB free, the run writes"):
        preflight.check_nvme_path(str(tmp_path), "x.nvme_path", 10**18)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        preflight.check_nvme_path(str(tmp_path / "file"), "x.nvme_path", 1)


def test_nvme_path_read_only(tmp_path):
    """A read-only directory (root ignores mode bits, so as root use procfs, which refuses writes to all)."""
    path = tmp_path
    if os.geteuid() == 0:
        path = "/proc/self"
    else:
        tmp_path.chmod(0o500)
    with pytest.raises(ConfigError, match="not writable"):
        preflight.check_nvme_path(str(path), "x.nvme_path", 1)


def test_nvme_path_without_o_direct_is_refused(tmp_path, monkeypatch):
    """Filesystems that refuse O_DIRECT (older tmpfs, some network mounts) fail aio's first swap."""
    import errno

    def refuse(path):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(preflight, "_probe_direct_io", refuse)
    with pytest.raises(ConfigError, match="O_DIRECT"):
        preflight.check_nvme_path(str(tmp_path), "x.nvme_path", 1)
    assert list(tmp_path.iterdir()) == []


def test_locked_and_host_memory():
    ds = _ds(3, optimizer="nvme", sub_group_size=1e8)
    plan = zplan.plan_memory(ds, _model(400 * P), dp=1)
    with pytest.raises(ConfigError, match="ulimit -l"):
        preflight.check_host_memory(plan, _machine())
    preflight.check_host_memory(plan, _machine(can_lock_any=True))
    with pytest.raises(ConfigError, match="GiB is available"):
        preflight.check_host_memory(zplan.plan_memory(_ds(0, "fp32"), _model(2000 * P), dp=1),
                                    _machine(can_lock_any=True))


def test_missing_libaio_is_refused_with_the_fix():
    m = _machine(ops={"async_io": preflight.OpStatus("async_io", False, False, "libaio headers/library not found")})
    with pytest.raises(ConfigError, match="apt-get install -y libaio-dev"):
        preflight.check_ops(("async_io",), m)
    preflight.check_ops(("cpu_adam",), m)


def test_op_status_sees_this_machine():
    """cpu_adam needs only a compiler; async_io needs libaio (the Makefile installs libaio-dev)."""
    status = preflight.op_status("cpu_adam")
    assert status.ready or status.buildable, status.reason


def test_preflight_end_to_end(tmp_path):
    ds = _ds(3, optimizer="nvme", param="nvme", path=str(tmp_path))
    machine = _machine(can_lock_any=True, ops={})
    report = preflight.preflight(ds, lambda d: zplan.plan_memory(d, _model(), dp=2), machine)
    assert report.plan.nvme_bytes > 0 and report.corrections
    with pytest.raises(ConfigError, match="does not exist"):
        preflight.preflight(_ds(3, optimizer="nvme", path=str(tmp_path / "nope")),
                            lambda d: zplan.plan_memory(d, _model(), dp=2), machine)


def test_tuned_defaults_fill_only_what_is_missing():
    ds, filled = defaults.tuned(_ds(3, optimizer="nvme", reduce_bucket_size=1e6), "cpu")
    z = ds["zero_optimization"]
    assert z["reduce_bucket_size"] == 1e6 and z["sub_group_size"] == defaults.CPU_BUCKET_SIZE
    assert ds["aio"]["block_size"] == 1048576 and "zero_optimization.reduce_bucket_size" not in filled
    gpu, _ = defaults.tuned(_ds(3), "cuda")
    assert "sub_group_size" not in gpu["zero_optimization"]


# ------------------------------------------------------------------ zeromega plan


def _cli(argv, capsys):
    from zeromega.launch import cli
    from zeromega.launch.plan_cli import _add_plan

    parser = cli._Parser(prog="zeromega")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_plan(sub)
    try:
        args = parser.parse_args(argv)
        code = args.handler(args)
    except cli.UsageError as err:
        print(f"error: {err.problem}; fix: {err.fix}")
        code = 2
    out = capsys.readouterr()
    return code, out.out + out.err


def test_plan_cli_prints_the_table(tmp_path, capsys):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}}))
    code, out = _cli(["plan", str(cfg), "--world-size", "2", "--num-layers", "4", "--hidden-size", "256",
                      "--num-attention-heads", "4", "--seq-length", "128", "--vocab-size", "1000"], capsys)
    assert code == 0, out
    assert "optimizer states (master, m, v)    nvme" in out and "peak resident" in out
    code, out = _cli(["plan", str(cfg), "--world-size", "2", "--params", "1e9"], capsys)
    assert code == 0 and "1,000.0M params" in out
    code, out = _cli(["plan", str(cfg), "--world-size", "2"], capsys)
    assert code == 2 and "--num-layers" in out


def test_plan_cli_refuses_nvme_below_stage3(tmp_path, capsys):
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"train_micro_batch_size_per_gpu": 1, '
                   '"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}}}')
    code, out = _cli(["plan", str(cfg), "--world-size", "2", "--params", "1e8"], capsys)
    assert code == 2 and "set zero_optimization.stage to 3" in out
