"""benchmarks/registers.py: every kernel variant of an op's dry run found and compiled for sm_90 on the CPU, with
ptxas's register and spill counts; bad arguments give a clear error."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import registers
from src.kernels import fused, triton_scan

ROOT = Path(__file__).resolve().parent.parent


def _has_ptxas() -> bool:
    import triton

    return bool(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")))


def test_dry_run_captures_every_candidate_tile_and_restores_the_modules(monkeypatch):
    for module in (fused, triton_scan):  # the tiles of a GPU, not the interpreter's one
        monkeypatch.setattr(module, "triton_interpreted", lambda: False)
    before = (fused.pick_config, triton_scan.pick_config, dict(triton_scan._SMS))
    launches = registers.capture(registers.dry_runs(["fused"], torch.bfloat16, [4]))
    names = {getattr(kernel, "__name__", None) or kernel.fn.__name__ for kernel, *_ in launches}
    assert {"_scan_fwd_kernel", "_scan_bwd_kernel", "_fusion_fwd_kernel", "_fusion_bwd_param_kernel",
            "_fusion_bwd_state_kernel", "_weight_grad_kernel"} <= names
    # every forward tile that fits 7×7 maps (BLOCK_C ≤ 8) is launched
    fwd = {(kw["BLOCK_C"], kw["BLOCK_D"], kw["num_warps"]) + ((1,) if kw["HOISTED"] else ())
           for kernel, args, kw in launches if kernel is fused._fusion_fwd_kernel}
    assert fwd == {cfg for cfg in fused.FWD_CONFIGS if cfg[0] <= 8}
    assert (fused.pick_config, triton_scan.pick_config, dict(triton_scan._SMS)) == before


def test_signature_specialises_as_the_launcher_does():
    def kernel_params():
        class P:
            def __init__(self, name, constexpr=False):
                self.name, self.is_constexpr, self.default = name, constexpr, None
        return [P("x_ptr"), P("n"), P("stride"), P("BLOCK", True)]

    class K:
        params = kernel_params()

    x = torch.empty(64, device="meta", dtype=torch.bfloat16)
    sig, consts, attrs, options = registers.signature(K, (x, 48, 1), {"BLOCK": 32, "num_warps": 2})
    assert sig == {"x_ptr": "*bf16", "n": "i32", "stride": "constexpr", "BLOCK": "constexpr"}
    assert consts == {"stride": 1, "BLOCK": 32}
    assert attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    assert options == {"num_warps": 2}


@pytest.mark.skipif(not _has_ptxas(), reason="Triton's CUDA backend (ptxas) is not installed")
def test_layer_norm_variants_report_registers():
    """The script as a user runs it (its own process: the test session runs the Triton interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "registers.py"), "--ops", "norms", "--stages",
                          "4"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| _ln_")]
    assert len(rows) == 4, out.stdout  # forward and backward, with and without the gate
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 0 < int(cells[3]) <= 255, row
        assert int(cells[7]) >= 0 and int(cells[8]) >= 0, row  # loads and barriers in loops


def test_loop_counts_read_only_the_lines_inside_loops():
    ptx = "\n".join([
        "ld.global.b32 a;",           # before any loop
        "$L__BB0_1:",                 # loop header
        "ld.global.v4.b32 b;",
        "bar.sync 0;",
        "$L__BB0_2:",                 # a label inside the loop, branched to forward only
        "cp.async.cg.shared.global c;",
        "@%p1 bra $L__BB0_3;",        # forward branch: no loop
        "bar.sync 0;",
        "@%p2 bra $L__BB0_1;",        # back-branch: lines 2..7 are the loop
        "$L__BB0_3:",
        "ld.global.b32 d;",
        "bar.sync 0;",
    ])
    assert registers.loop_counts(ptx) == {"loop_loads": 2, "loop_barriers": 2}
    assert registers.loop_counts("ld.global.b32 a;\nbar.sync 0;") == {"loop_loads": 0, "loop_barriers": 0}


# what each kernel of the fused op writes: its outputs, never an input
_OUTPUTS = {
    "_scan_fwd_kernel": {"h_ptr", "sum_ptr", "end_ptr"},
    "_scan_bwd_kernel": {"dx_ptr", "ddt_ptr", "dB_part_ptr", "dA_part_ptr", "dbias_part_ptr", "dD_part_ptr", "sum_ptr",
                         "end_ptr"},
    "_mix_weights_kernel": {"wa_ptr"},
    "_fusion_fwd_kernel": {"y_ptr", "hf_ptr"},
    "_fusion_bwd_param_kernel": {"g_ptr", "dC_part_ptr", "G_part_ptr"},
    "_fusion_edge_kernel": {"el_ptr", "er_ptr"},
    "_fusion_bwd_state_kernel": {"dh_ptr"},
    "_column_sums_kernel": {"out0_ptr", "out1_ptr", "out2_ptr"},
    "_weight_grad_kernel": {"dw_ptr", "dalpha_part_ptr"},
    "_dwconv_fwd_kernel": {"y_ptr", "pre_ptr"},
    "_dwconv_bwd_param_kernel": {"gp_ptr", "part_ptr"},
    "_dwconv_bwd_input_kernel": {"dx_ptr"},
    "_dwconv_param_kernel": {"dw_ptr", "db_ptr"},
}


@pytest.mark.slow
@pytest.mark.skipif(not _has_ptxas(), reason="Triton's CUDA backend (ptxas) is not installed")
def test_every_fused_op_variant_compiles_for_hopper():
    """Every kernel variant of the fused op and the depthwise convolutions at T's last stage (every tile candidate)
    compiles for sm_90 on the CPU: a kernel the interpreter runs can still fail Triton's compiler, which the other
    CPU tests would first meet on a GPU. (With the installed Triton: the GPU machine's older one can refuse more — a
    jit function's tuple default argument, which Triton 3.8 compiles and 3.6 does not.) And a compiled graph that
    launches them itself (the traced ops) takes each to write only its outputs: an input taken for written is copied
    at every call (x and dt once were, through a helper that handed the scan kernels their pointers)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "registers.py"), "--ops", "fused,dwconv",
                          "--stages", "4", "--writes"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| _")]
    names = {row.split("|")[1].strip() for row in rows}
    assert set(_OUTPUTS) <= names, out.stdout
    failed = [row for row in rows if "failed:" in row]
    assert not failed, "\n".join(failed)
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        written = set(cells[-1].split(", "))
        assert written and written <= _OUTPUTS[cells[0]], f"{cells[0]} ({cells[1]}) taken to write {sorted(written)}"


def test_bad_arguments_are_refused_by_name(capsys):
    assert registers.main(["--ops", "fused,conv"]) == 2
    assert "--ops: unknown ['conv']" in capsys.readouterr().err
    assert registers.main(["--stages", "5"]) == 2
    assert "--stages must be a comma list of 1 ... 4" in capsys.readouterr().err
    assert registers.main(["--stages", "x"]) == 2
    assert "--stages" in capsys.readouterr().err


def test_the_interpreter_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registers.main(["--ops", "norms"]) == 2
    assert "TRITON_INTERPRET=1 is set" in capsys.readouterr().err
