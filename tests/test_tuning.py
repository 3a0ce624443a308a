"""Tile choice (`src.kernels.tuning.pick_config`) without a GPU: CUDA queries and the timer are faked, so the
order of the sources — earlier timing, measured pick, timing — and the JSON cache are checked on the CPU."""

import json

import pytest
import torch
import triton.testing

from src.kernels import fused, tuning

CANDIDATES = ((16, 64, 4), (8, 128, 4, 1), (32, 32, 4))
KERNEL = "fusion_bwd_state"  # its measured pick for 56² maps of 128 channels, (8, 128, 4, 1), is among CANDIDATES
FAKE_MS = {(16, 64, 4): 0.3, (8, 128, 4, 1): 0.2, (32, 32, 4): 0.1}  # the fake timer: the last is the fastest


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A Hopper GPU as far as pick_config can tell; the timer answers FAKE_MS and counts its calls."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("SPATIAL_MAMBA_CACHE", str(tmp_path))
    monkeypatch.delenv("SPATIAL_MAMBA_TUNE", raising=False)
    monkeypatch.setattr(tuning, "_TUNED", {})
    monkeypatch.setattr(tuning, "_CAPABILITY", {})
    timed = []

    def do_bench(fn, **kwargs):
        fn()
        return FAKE_MS[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return timed, tmp_path / "kernel_tuning.json"


def test_measured_picks_by_map_size():
    tuning._CAPABILITY[99] = (9, 0)
    assert tuning.measured_pick("scan_fwd", 56 * 56, 99) == (64, 16, 2, 3)
    assert tuning.measured_pick("scan_fwd", 28 * 28, 99) == (16, 16, 1, 3)
    assert tuning.measured_pick("scan_fwd", 7 * 7, 99) == (16, 16, 1, 1)
    assert tuning.measured_pick("scan_bwd", 14 * 14, 99) == (8, 16, 1, 3)
    assert tuning.measured_pick("fusion_fwd", 7 * 7, 99) == (8, 64, 4, 1)
    assert tuning.measured_pick("fusion_fwd", 14 * 14, 99) == (2, 128, 2, 1)
    assert tuning.measured_pick("fusion_fwd", 56 * 56, 99) == (4, 128, 4, 1)
    assert tuning.measured_pick("fusion_fwd", 56 * 56, 99, ((16, 64, 4), (8, 64, 4, 1))) == (8, 64, 4, 1)
    assert tuning.measured_pick("fusion_fwd", 7 * 7, 99, ((16, 64, 4), (16, 64, 2))) == (16, 64, 2)
    assert tuning.measured_pick("fusion_bwd_state", 28 * 28, 99) == (4, 256, 4, 1)
    assert tuning.measured_pick("fusion_bwd_state", 56 * 56, 99, fused.STATE_CONFIGS[:1]) == (8, 128, 4, 1)
    assert tuning.measured_pick("fusion_bwd_state", 7 * 7, 99) == (8, 128, 2)
    assert tuning.measured_pick("fusion_bwd_param", 56 * 56, 99) == (8, 64, 2)
    assert tuning.measured_pick("fusion_bwd_param", 7 * 7, 99) == (8, 64, 2)
    assert tuning.measured_pick("no_such_kernel", 3136, 99) is None
    # a row of several configs: the first among the shape's candidates (64 channels rule out 128-channel tiles)
    assert tuning.measured_pick("dwconv_fwd", 3136, 99) == (8, 128, 4)
    assert tuning.measured_pick("dwconv_fwd", 3136, 99, ((16, 64, 4), (16, 64, 2))) == (16, 64, 2)
    assert tuning.measured_pick("dwconv_fwd", 3136, 99, ((16, 64, 4),)) is None
    assert tuning.measured_pick("dwconv_bwd_param", 7 * 7, 99) == (8, 32, 2)
    tuning._CAPABILITY[98] = (8, 0)  # no measured picks for this architecture
    assert tuning.measured_pick("scan_fwd", 3136, 98) is None
    for table in tuning.MEASURED_PICKS.values():  # rows largest first, the last one covering every size
        for rows in table.values():
            least = [n for n, _ in rows]
            assert least == sorted(least, reverse=True) and least[-1] == 0


def test_measured_pick_is_used_untimed_for_16_bit_inputs(fake_gpu):
    timed, cache = fake_gpu
    pick = tuning.pick_config(KERNEL, ("k",), CANDIDATES, timed.append, tokens=3136, half=True)
    assert pick == (8, 128, 4, 1) and timed == []  # nothing compiled or timed
    assert not cache.exists()


def test_fp32_and_forced_timing_pick_the_fastest_and_remember_it(fake_gpu, monkeypatch):
    timed, cache = fake_gpu
    assert tuning.pick_config(KERNEL, ("fp32",), CANDIDATES, timed.append, tokens=3136, half=False) == (32, 32, 4)
    assert sorted(timed) == sorted(CANDIDATES)
    monkeypatch.setenv("SPATIAL_MAMBA_TUNE", "1")
    timed.clear()
    assert tuning.pick_config(KERNEL, ("bf16",), CANDIDATES, timed.append, tokens=3136, half=True) == (32, 32, 4)
    assert len(timed) == 3
    stored = json.loads(cache.read_text())
    assert sorted(map(tuple, stored.values())) == [(32, 32, 4)] * 2
    # a new process (empty memory) takes the file's answer before the measured pick, untimed
    monkeypatch.setattr(tuning, "_TUNED", {})
    monkeypatch.delenv("SPATIAL_MAMBA_TUNE")
    timed.clear()
    assert tuning.pick_config(KERNEL, ("bf16",), CANDIDATES, timed.append, tokens=3136, half=True) == (32, 32, 4)
    assert timed == []


def test_no_timing_mode_and_unfitting_pick(fake_gpu, monkeypatch):
    timed, _ = fake_gpu
    monkeypatch.setenv("SPATIAL_MAMBA_TUNE", "0")
    assert tuning.pick_config(KERNEL, ("a",), CANDIDATES, timed.append, tokens=3136, half=True) == (8, 128, 4, 1)
    assert tuning.pick_config(KERNEL, ("b",), CANDIDATES, timed.append, tokens=3136) == (16, 64, 4)
    monkeypatch.delenv("SPATIAL_MAMBA_TUNE")
    # the measured tile is not among this shape's candidates (a narrow map clamps them): timed instead
    narrow = ((16, 64, 4), (32, 32, 4))
    assert tuning.pick_config(KERNEL, ("c",), narrow, timed.append, tokens=3136, half=True) == (32, 32, 4)
    assert sorted(timed) == sorted(narrow)


def test_unknown_tuning_mode_is_refused(fake_gpu, monkeypatch):
    timed, _ = fake_gpu
    monkeypatch.setenv("SPATIAL_MAMBA_TUNE", "yes")
    with pytest.raises(ValueError, match="SPATIAL_MAMBA_TUNE must be auto, 0 or 1, got 'yes'"):
        tuning.pick_config(KERNEL, ("x",), CANDIDATES, timed.append, tokens=3136, half=True)


def test_a_known_shape_on_a_given_device_asks_cuda_nothing(fake_gpu, monkeypatch):
    timed, _ = fake_gpu
    first = tuning.pick_config(KERNEL, ("k",), CANDIDATES, timed.append, tokens=3136, half=True)

    def no_query(*args):
        raise AssertionError("a CUDA query on the per-call path")

    monkeypatch.setattr(torch.cuda, "is_available", no_query)
    monkeypatch.setattr(torch.cuda, "current_device", no_query)
    again = tuning.pick_config(KERNEL, ("k",), CANDIDATES, timed.append, tokens=3136, half=True,
                               device=torch.device("cuda", 0))
    assert again == first == (8, 128, 4, 1) and timed == []
    with pytest.raises(AssertionError, match="CUDA query"):  # another device index: the full path
        tuning.pick_config(KERNEL, ("k",), CANDIDATES, timed.append, tokens=3136, half=True,
                           device=torch.device("cuda", 1))


def test_timing_waits_for_the_background_compiles_first(fake_gpu, monkeypatch):
    """Nothing is timed while `ahead` compiles share the host (their delays would count as kernel time)."""
    timed, _ = fake_gpu
    monkeypatch.setattr(tuning.ahead, "wait_all", lambda: timed.append("waited"))
    assert tuning.pick_config(KERNEL, ("w",), CANDIDATES, timed.append, tokens=3136) == (32, 32, 4)  # fp32: timed
    assert timed[0] == "waited" and set(timed[1:]) == set(CANDIDATES)


def test_every_measured_pick_is_a_candidate_tile():
    """A pick outside its kernel's candidate list would never be used (pick_config takes only candidates)."""
    from src.kernels import dwconv, triton_scan

    candidates = {
        "scan_fwd": triton_scan.SCAN_FWD_CONFIGS, "scan_bwd": triton_scan.SCAN_BWD_CONFIGS,
        "fusion_fwd": fused.FWD_CONFIGS, "fusion_bwd_param": fused.BWD_CONFIGS,
        "fusion_bwd_state": fused.STATE_CONFIGS, "dwconv_fwd": dwconv.FWD_CONFIGS,
        "dwconv_bwd_input": dwconv.FWD_CONFIGS, "dwconv_bwd_param": dwconv.BWD_CONFIGS,
    }
    for table in tuning.MEASURED_PICKS.values():
        assert set(table) <= set(candidates)
        for name, rows in table.items():
            for _, picks in rows:
                for cfg in picks if isinstance(picks[0], tuple) else (picks,):
                    assert cfg in candidates[name], f"{name}: measured pick {cfg} is not a candidate"


# ----------------------------------------------------------------------------------------------------
# tiles for a traced op: its launchers run once on real scratch tensors before the trace


def test_a_trace_runs_the_launchers_once_on_real_scratch_tensors(monkeypatch):
    """Fake tensors in (a trace): the launcher gets real zero-filled tensors of the same sizes, strides (an
    overlapping expand and a transpose included) and dtypes, outside the fake mode, once per signature; real
    tensors (no trace) and devices without timing never run it; a failing launcher only warns."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    monkeypatch.setattr(tuning, "_TRACE_TUNED", set())
    wants = []
    monkeypatch.setattr(tuning, "_wants_timing", lambda device, half: wants.append((device.type, half)) or True)
    seen = []

    def launcher(x, w, n, dims):
        seen.append((x, w, n, dims))

    with FakeTensorMode():
        x = torch.empty(2, 3, 4, dtype=torch.bfloat16).transpose(1, 2)
        w = torch.empty(5, 1).expand(5, 7)
        for _ in range(2):
            tuning.tune_for_trace(launcher, (x, w, 3, [1, 3]), True)
        assert len(seen) == 1
        tuning.tune_for_trace(launcher, (x, w, 4, [1, 3]), True)  # another integer: another signature
        assert len(seen) == 2
    real_x, real_w, n, dims = seen[0]
    for got, fake in ((real_x, x), (real_w, w)):
        assert not is_fake(got)
        assert (got.shape, got.stride(), got.dtype) == (fake.shape, fake.stride(), fake.dtype)
        assert torch.count_nonzero(got) == 0
    assert (n, dims) == (3, [1, 3]) and wants[0] == ("cpu", True)
    tuning.tune_for_trace(launcher, (torch.zeros(2), 9, []), False)  # real tensors: not a trace
    assert len(seen) == 2

    def failing(x):
        raise RuntimeError("out of memory")

    with FakeTensorMode():
        with pytest.warns(UserWarning, match="tiles of failing not timed for a compiled graph .RuntimeError: out of"):
            tuning.tune_for_trace(failing, (torch.empty(3),), False)


def test_only_where_a_tile_would_be_timed(fake_gpu, monkeypatch):
    """`tune_for_trace` runs where `pick_config` would time: CUDA, not SPATIAL_MAMBA_TUNE=0, and no measured
    picks for the data (Hopper, 16-bit) unless SPATIAL_MAMBA_TUNE=1."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the suite's interpreter never times)
    cuda = torch.device("cuda", 0)
    assert not tuning._wants_timing(torch.device("cpu"), False)
    assert tuning._wants_timing(cuda, False)  # fp32: timed
    assert not tuning._wants_timing(cuda, True)  # 16-bit on Hopper: measured picks
    monkeypatch.setenv("SPATIAL_MAMBA_TUNE", "1")
    assert tuning._wants_timing(cuda, True)
    monkeypatch.setenv("SPATIAL_MAMBA_TUNE", "0")
    assert not tuning._wants_timing(cuda, False)
    monkeypatch.setenv("SPATIAL_MAMBA_TUNE", "auto")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100: no measured picks
    assert tuning._wants_timing(cuda, True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not tuning._wants_timing(cuda, True)
