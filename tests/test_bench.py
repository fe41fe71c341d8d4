"""`fusegen bench`: its arguments, messages and exit codes, and the accounting behind its per-kernel table
(the launch recorder in eval and training mode, bytes, FLOPs, floors, tables, JSON), which all run on the
CPU at tiny shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusegen import bench
from helpers import DEVICE, TOLERANCE
from fusegen.cli import main as fusegen_main

ROOT = Path(__file__).resolve().parent.parent
TINY = """\
model Tiny(c=3, classes=10)
input(2, c, 8, 8)

block dw(ch):
    dwconv3x3(ch) -> bn(ch) -> relu6
    conv1x1(ch, ch) -> bn(ch)

forward:
    stem: conv3x3(c, 8, stride=2) -> bn1: bn(8) -> relu
    body:
        dw(8) * 2
    global_avgpool -> flatten
    fc: linear(8, classes)
"""
BAD = "model Broken(c=4)\ninput(1, c, 5, 5)\nforward:\n    conv: conv3x3(c, 8) -> pw: conv1x1(8, 8)\n"
# the pool's line ends the kernel of the line before it (plan.why_not_fused)
RUN_ORDER = [
    "conv3x3_bn_relu",
    "dwconv3x3_bn_relu6",
    "conv1x1_bn",
    "dwconv3x3_bn_relu6",
    "conv1x1_bn_global_avgpool_flatten",
    "linear",
]
# Worked by hand at the example input 2x3x8x8 (fp32: 4 bytes an element):
#   conv3x3_bn_relu: in 2*3*8*8=384, weight 8*3*3*3=216, bn 4*8=32, out 2*8*4*4=256 -> 888 elements;
#     conv 2*256*3*9=13824 + bn 2*256 + relu 256 = 14592 FLOPs
#   dwconv3x3_bn_relu6: in 256, weight 8*1*3*3=72, bn 32, out 256 -> 616; 2*256*9=4608 + 512 + relu6 2*256 = 5632
#   conv1x1_bn: in 256, weight 8*8=64, bn 32, out 256 -> 608; 2*256*8=4096 + 512 = 4608
#   conv1x1_bn_global_avgpool_flatten: in 256, weight 64, bn 32, out 2*8=16 -> 368; 4096 + 512 + one add
#     per pooled element: 256 -> 4864
#   linear: in 2*8=16, weight 10*8=80, bias 10, out 2*10=20 -> 126; 2*2*8*10 = 320
EXPECTED_BYTES = [888 * 4, 616 * 4, 608 * 4, 616 * 4, 368 * 4, 126 * 4]
EXPECTED_FLOPS = [14592, 5632, 4608, 5632, 4864, 320]
# Training mode: each BatchNorm moves into the prologue of the next launch, which normalises with the batch
# statistics that the launch before stored per tile (a sum and a sum of squared deviations per channel).
TRAIN_RUN_ORDER = [
    "conv3x3_stats",
    "bn_relu_dwconv3x3_stats_train",
    "bn_relu6_conv1x1_stats_train",
    "bn_dwconv3x3_stats_train",
    "bn_relu6_conv1x1_stats_train",
    "bn_global_avgpool_flatten_train",
    "linear_train",  # its dot in tf32x3, as every training-mode dot before BatchNorm's normalisation
]
# Worked by hand at 2x3x8x8, leaving out the per-tile statistics (their tile count is the GPU's choice):
#   conv3x3_stats: in 384, weight 216, out 256 -> 856; conv 13824
#   bn_relu_dwconv3x3_stats_train: in 256, bn 32, weight 72, out 256 -> 616; bn 2*256 + relu 256 + 4608 = 5376
#   bn_relu6_conv1x1_stats_train: in 256, bn 32, weight 64, out 256 -> 608; bn 512 + relu6 512 + 4096 = 5120
#   bn_dwconv3x3_stats_train: 616 as above; bn 512 + 4608 = 5120
#   bn_global_avgpool_flatten_train: in 256, bn 32, out 16 -> 304; bn 512 + 256 adds = 768
#   linear: as in eval mode
TRAIN_EXPECTED_ELEMENTS = [856, 616, 608, 616, 608, 304, 126]
TRAIN_EXPECTED_FLOPS = [13824, 5376, 5120, 5120, 5120, 768, 320]


@pytest.fixture(scope="module")
def tiny():
    return bench.compile_model("specs/tiny.fuse", TINY)


@pytest.fixture(scope="module")
def launches(tiny):
    model = bench.build_model(tiny).to(DEVICE)
    x = torch.rand(bench.input_shape(tiny, 2), device=DEVICE)
    return bench.label_launches(bench.record_launches(model, x), tiny.launch_steps, model)


@pytest.fixture(scope="module")
def train_launches(tiny):
    model = bench.build_model(tiny, mode="train").to(DEVICE)
    x = torch.rand(bench.input_shape(tiny, 2), device=DEVICE)
    return bench.label_launches(bench.record_launches(model, x), tiny.steps("train"), model)


def run_fusegen(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "fusegen", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


# -- the command ------------------------------------------------------------------------------------------


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.fuse").write_text(TINY)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fusegen_main(["bench", str(tmp_path / "tiny.fuse"), "--batch", "2"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("fusegen bench: needs a CUDA GPU (torch.cuda.is_available() is False)")
    assert out == ""


def test_bad_spec_is_rendered_like_build_and_exits_2(tmp_path):
    (tmp_path / "broken.fuse").write_text(BAD)
    result = run_fusegen(tmp_path, "bench", "broken.fuse", "--batch", "2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "broken.fuse:4:32: error: conv1x1 cannot join the kernel of conv3x3" in result.stderr
    assert "    conv: conv3x3(c, 8) -> pw: conv1x1(8, 8)\n" + " " * 35 + "^" in result.stderr


def test_missing_spec_and_bad_batch_exit_2(tmp_path):
    result = run_fusegen(tmp_path, "bench", "nope.fuse")
    assert result.returncode == 2 and "nope.fuse: error: cannot read spec" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "tiny.fuse").write_text(TINY)
    result = run_fusegen(tmp_path, "bench", "tiny.fuse", "--batch", "0")
    assert result.returncode == 2 and "--batch: must be at least 1" in result.stderr


@pytest.mark.parametrize(
    "given, modes",
    [([], ["eval"]), (["--mode", "train"], ["train"]), (["--mode", "train", "eval", "train"], ["train", "eval"])],
)
def test_mode_argument_reaches_bench_in_order_each_once(given, modes, monkeypatch):
    seen = {}

    def fake_main(spec_paths, batches, max_autotune, json_path, torch_compile=True, modes=None):
        seen.update(specs=spec_paths, batches=batches, modes=modes, torch_compile=torch_compile)
        return 0

    monkeypatch.setattr(bench, "main", fake_main)
    assert fusegen_main(["bench", "a.fuse", "b.fuse", "--batch", "4", *given, "--no-compile"]) == 0
    assert seen == {"specs": ["a.fuse", "b.fuse"], "batches": [4], "modes": modes, "torch_compile": False}


def test_unknown_mode_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        fusegen_main(["bench", "a.fuse", "--mode", "training"])
    assert exit_.value.code == 2
    assert "argument --mode: invalid choice: 'training'" in capsys.readouterr().err


# -- recording launches --------------------------------------------------------------------------------------


def test_recorder_sees_one_launch_per_kernel_step_in_run_order(tiny, launches):
    assert [launch.wrapper for launch in launches] == RUN_ORDER
    assert [launch.wrapper for launch in launches] == [step.kernel.name for step in tiny.launch_steps]
    # Each launch reads what the one before wrote, and the last one's output is the model's.
    for before, after in zip(launches, launches[1:]):
        assert after.inputs[0].data_ptr() == before.outputs[0].data_ptr()
    model = bench.build_model(tiny).to(DEVICE)
    with torch.no_grad():
        assert torch.equal(launches[-1].outputs[0], model.run_kernels(launches[0].inputs[0]))
    assert launches[0].comment == "tiny.fuse:9: stem: conv3x3(c, 8, stride=2) -> bn1: bn(8) -> relu"
    assert launches[1].ops == ("dwconv3x3", "bn", "relu6")


def test_recorder_puts_the_wrappers_back(tiny):
    namespace = tiny.module.__dict__
    before = {name: namespace[name] for name in RUN_ORDER}
    model = bench.build_model(tiny).to(DEVICE)
    bench.record_launches(model, torch.rand(bench.input_shape(tiny, 1), device=DEVICE))
    assert {name: namespace[name] for name in RUN_ORDER} == before
    with pytest.raises(ValueError, match="unpack"):  # a failing forward too (the first wrapper takes a 4-d shape)
        bench.record_launches(model, torch.rand(3, 8, device=DEVICE))
    assert {name: namespace[name] for name in RUN_ORDER} == before


def test_training_mode_records_the_plans_training_launches(tiny, train_launches):
    """run_training_kernels' launches, one per step of the plan's training steps; batch_norm_batch_stats,
    which a *_train wrapper calls for the statistics it normalises with, is part of that launch."""
    assert [launch.wrapper for launch in train_launches] == TRAIN_RUN_ORDER
    assert TRAIN_RUN_ORDER == [step.kernel.name for step in tiny.steps("train")]
    assert [step.kernel.name for step in tiny.steps("eval")] == RUN_ORDER
    for before, after in zip(train_launches, train_launches[1:]):
        assert after.inputs[0].data_ptr() == before.outputs[0].data_ptr()
    for before, after in zip(train_launches[:5], train_launches[1:6]):  # the statistics go along
        tile_sum, tile_m2, *_ = after.args[1]
        assert tile_sum is before.outputs[1] and tile_m2 is before.outputs[2]
        assert tile_sum.shape[1] == before.outputs[0].shape[1] == after.modules[0].num_features
    assert train_launches[1].ops == ("bn", "relu", "dwconv3x3")
    assert train_launches[1].comment == "tiny.fuse:11: dw(8) * 2"
    model = bench.build_model(tiny, mode="train").to(DEVICE)
    with torch.no_grad():
        assert torch.equal(train_launches[-1].outputs[0], model.run_kernels(train_launches[0].inputs[0]))


def test_training_recording_runs_the_forward_once_and_puts_every_wrapper_back(tiny):
    namespace = tiny.module.__dict__
    names = [*TRAIN_RUN_ORDER, "batch_norm_batch_stats"]
    before = {name: namespace[name] for name in names}
    model = bench.build_model(tiny, mode="train").to(DEVICE)
    bench.record_launches(model, torch.rand(bench.input_shape(tiny, 2), device=DEVICE))
    assert {name: namespace[name] for name in names} == before
    # the nested batch_norm_batch_stats calls ran: every BatchNorm counted one batch
    counts = [m.num_batches_tracked.item() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert counts == [1] * 5


def test_label_launches_refuses_launches_the_plan_does_not_list(tiny, launches):
    with pytest.raises(RuntimeError, match="where the plan lists"):
        bench.label_launches(launches[1:], tiny.launch_steps, None)


def test_label_launches_follows_loops_and_branches():
    """A loop runs its launches once per block, a branch one body's: each launch still gets its chain."""
    from test_graph import BRANCHES, LOOP

    for text, args, shape in ((LOOP, ([3, 1],), (2, 3, 7, 9)), (BRANCHES, (4, 4, 1, 3), (2, 4, 9, 7))):
        spec = bench.compile_model("specs/region.fuse", text)
        torch.manual_seed(0)
        model = spec.module.ModelNew(*args).eval().to(DEVICE)
        launches = bench.label_launches(
            bench.record_launches(model, torch.rand(shape, device=DEVICE)), spec.launch_steps, model
        )
        assert all(launch.comment and launch.ops for launch in launches)
        if text is LOOP:  # stage1's two blocks after its first, each two launches
            assert sum("stage(4, 4, layers[0], 1)" in launch.comment for launch in launches) == 2 + 2 * 2
        else:  # the residual branch: the project conv with the add
            assert [launch.wrapper for launch in launches][-1] == "conv1x1_bn_add"


# -- bytes, FLOPs, floors -------------------------------------------------------------------------------------


def test_bytes_and_flops_match_the_hand_count(launches):
    assert [bench.launch_bytes(launch) for launch in launches] == EXPECTED_BYTES
    assert [bench.launch_flops(launch) for launch in launches] == EXPECTED_FLOPS


def test_training_bytes_and_flops_match_the_hand_count(train_launches):
    """The per-tile statistics count where they are read and written: two float32 tensors of tiles x
    channels, each way."""

    def statistics(items) -> int:
        return sum(t.numel() for item in items if isinstance(item, tuple) for t in item if isinstance(t, torch.Tensor))

    for launch, elements, flops in zip(train_launches, TRAIN_EXPECTED_ELEMENTS, TRAIN_EXPECTED_FLOPS, strict=True):
        tiles = statistics(launch.args) + statistics(launch.output if isinstance(launch.output, tuple) else ())
        assert bench.launch_bytes(launch) == (elements + tiles) * 4, launch.wrapper
        assert bench.launch_flops(launch) == flops, launch.wrapper
    assert [len(launch.outputs) for launch in train_launches] == [3] * 5 + [1, 1]
    assert [len(launch.inputs) for launch in train_launches] == [1] + [3] * 5 + [1]


RESIDUAL = """\
model Residual(c=3, w=4)
input(2, c, 6, 6)
forward:
    out = conv1: conv3x3(c, w) -> bn1: bn(w) -> relu
    out = out -> conv2: conv3x3(w, w) -> bn2: bn(w)
    identity = down: conv1x1(c, w) -> bnd: bn(w)
    return out -> add(identity) -> relu
"""


def test_a_residual_add_counts_its_operand_in_both_modes():
    """Worked by hand at 2x3x6x6 (72 pixels of 4 channels: 288 elements a 2x4x6x6 tensor), the last launch:
    eval conv3x3_bn_add_relu: in 288 + weight 144 + bn 16 + identity 288 + out 288 = 1024 elements;
      conv 2*288*4*9 = 20736, bn 576, add 288, relu 288: 21888 FLOPs
    train bn_add_relu_train: in 288 + bn 16 + identity 288 + out 288 = 880, and its input's statistics;
      bn 576, add 288, relu 288: 1152 FLOPs"""
    spec = bench.compile_model("specs/residual.fuse", RESIDUAL)
    x = torch.rand(bench.input_shape(spec, 2), device=DEVICE)
    last = {}
    for mode in ("eval", "train"):
        model = bench.build_model(spec, mode=mode).to(DEVICE)
        launches = bench.label_launches(bench.record_launches(model, x), spec.steps(mode), model)
        last[mode] = launches[-1]
    assert last["eval"].wrapper == "conv3x3_bn_add_relu" and last["train"].wrapper == "bn_add_relu_train"
    assert bench.launch_bytes(last["eval"]) == 1024 * 4
    assert bench.launch_flops(last["eval"]) == 21888
    tile_sum, tile_m2, *_ = last["train"].args[1]
    assert bench.launch_bytes(last["train"]) == (880 + tile_sum.numel() + tile_m2.numel()) * 4
    assert bench.launch_flops(last["train"]) == 1152


POOLED = """\
model Pooled()
input(2, 3, 9, 9)
forward:
    pw: conv1x1(3, 8, stride=2) -> bn1: bn(8) -> relu -> p: avgpool(2)
    pw2: conv1x1(8, 4) -> bn2: bn(4) -> relu -> global_avgpool -> flatten
"""


def test_bytes_and_flops_of_kernels_that_a_pool_ends():
    """The ops before the pool count at the conv's pixels that the windows cover; worked by hand:
    conv1x1_bn_relu_avgpool: 2x3x9x9, conv 5x5 of which avgpool(2) covers 4x4 (32 pixels), 2x8x2x2 out:
      486 in + 24 weight + 32 bn + 64 out = 606 elements; conv 2*32*8*3 = 1536, bn 2*32*8 = 512, relu
      32*8 = 256, pool 64*4 = 256: 2560 FLOPs
    conv1x1_bn_relu_global_avgpool_flatten: 2x8x2x2 (8 pixels), 2x4 out: 64 + 32 + 16 + 8 = 120 elements;
      conv 2*8*4*8 = 512, bn 2*8*4 = 64, relu 32, pool 32: 640 FLOPs"""
    spec = bench.compile_model("specs/pooled.fuse", POOLED)
    model = bench.build_model(spec).to(DEVICE)
    x = torch.rand(bench.input_shape(spec, 2), device=DEVICE)
    launches = bench.label_launches(bench.record_launches(model, x), spec.launch_steps, model)
    assert [launch.wrapper for launch in launches] == [
        "conv1x1_bn_relu_avgpool",
        "conv1x1_bn_relu_global_avgpool_flatten",
    ]
    assert [bench.launch_bytes(launch) for launch in launches] == [606 * 4, 120 * 4]
    assert [bench.launch_flops(launch) for launch in launches] == [2560, 640]


TAPS = """\
model Taps()
input(2, 4, 6, 6)
forward:
    e: conv1x1(4, 8) -> bn1: bn(8) -> relu6 -> d: dwconv3x3(8, 2) -> bn2: bn(8) -> relu6
"""


def test_bytes_and_flops_of_a_kernel_with_a_tap_producer():
    """The 1x1 conv computed at the depthwise conv's taps counts once per pixel of its own output, the
    ops after the depthwise conv at its pixels; worked by hand, 2x4x6x6 in, 2x8x3x3 out:
    288 in + 32 weight + 32 bn1 + 72 depthwise weight + 32 bn2 + 144 out = 600 elements;
    conv1x1 at 72 pixels 2*72*8*4 = 4608, bn1 2*72*8 = 1152, relu6 1152; dwconv3x3 at 18 pixels
    2*18*8*9 = 2592, bn2 2*18*8 = 288, relu6 288: 10080 FLOPs"""
    spec = bench.compile_model("specs/taps.fuse", TAPS)
    model = bench.build_model(spec).to(DEVICE)
    x = torch.rand(bench.input_shape(spec, 2), device=DEVICE)
    (launch,) = bench.label_launches(bench.record_launches(model, x), spec.launch_steps, model)
    assert launch.wrapper == "conv1x1_bn_relu6_dwconv3x3_bn_relu6"
    assert bench.launch_bytes(launch) == 600 * 4
    assert bench.launch_flops(launch) == 10080


def test_identical_launches_group_with_a_count_in_first_appearance_order(launches):
    groups = bench.group_launches(launches)
    assert [(launch.wrapper, count) for launch, count in groups] == [
        ("conv3x3_bn_relu", 1),
        ("dwconv3x3_bn_relu6", 2),
        ("conv1x1_bn", 1),
        ("conv1x1_bn_global_avgpool_flatten", 1),
        ("linear", 1),
    ]


def test_kernel_rows_rates_floor_and_totals(launches):
    groups = bench.group_launches(launches)
    peaks = bench.Peaks(bandwidth_gb_per_s=1000.0, tf32_tflop_per_s=1.0)
    rows = bench.kernel_rows(groups, [0.001, 0.002, 0.003, 0.004, 0.005], peaks)
    stem = rows[0]
    assert stem["bytes"] == 3552 and stem["flops"] == 14592
    assert stem["gb_per_s"] == pytest.approx(3552 / 1e-6 / 1e9)
    assert stem["tflop_per_s"] == pytest.approx(14592 / 1e-6 / 1e12)
    # compute-bound at these peaks: 14592 FLOPs / 1e12 FLOP/s = 1.4592e-8 s, bytes would take 3.552e-9 s
    assert stem["floor_ms"] == pytest.approx(1.4592e-5)
    assert stem["floor_share"] == pytest.approx(1.4592e-5 / 0.001)
    assert rows[4]["in_shape"] == [2, 8] and rows[4]["out_shape"] == [2, 10]
    totals = bench.kernel_totals(rows, fusegen_ms=0.05)
    assert totals["launches"] == 6
    assert totals["kernel_ms"] == pytest.approx(0.001 + 2 * 0.002 + 0.003 + 0.004 + 0.005)
    assert totals["floor_ms"] == pytest.approx(sum(r["floor_ms"] * r["count"] for r in rows))
    assert totals["floor_share"] == pytest.approx(totals["floor_ms"] / 0.05)


# -- tables and JSON --------------------------------------------------------------------------------------


def fake_run(configs, kernels=(), mode="eval"):
    return {
        "spec": "specs/tiny.fuse",
        "model": "Tiny",
        "batch": 2,
        "mode": mode,
        "input_shape": [2, 3, 8, 8],
        "configs": bench.add_speedups(configs),
        "kernels": list(kernels),
        "totals": bench.kernel_totals(list(kernels), 1.0),
    }


def test_model_table_columns_speedups_and_failures():
    run = fake_run(
        [
            {"config": "eager", "ms": 3.0, "rel_error": 2e-4, "failure": None},
            {"config": "torch.compile", "ms": None, "rel_error": None, "failure": "BackendCompilerFailed: boom"},
            {"config": "fusegen", "ms": 1.5, "rel_error": 1e-6, "failure": None},
        ]
    )
    lines = bench.model_table([run]).splitlines()
    assert lines[0].split() == ["net", "batch", "mode", "config", "median", "ms", "fusegen", "speedup", "rel", "err"]
    assert lines[1].split() == ["Tiny", "2", "eval", "eager", "3.000", "2.00x", "2.0e-04"]
    assert lines[2].split() == ["Tiny", "2", "eval", "torch.compile", "failed", "-", "-"]
    assert lines[3].split() == ["Tiny", "2", "eval", "fusegen", "1.500", "1.00x", "1.0e-06"]
    assert len({len(line) for line in lines[:4]}) == 1, "columns right-aligned to one width"
    assert "  Tiny batch 2 eval torch.compile: BackendCompilerFailed: boom" in lines
    assert any(line.startswith("mode eval: model.eval()") for line in lines)
    assert not any(line.startswith("mode train") for line in lines), "a note for each mode that ran, only"


def test_model_table_says_the_mode_of_each_row():
    configs = [
        {"config": "fusegen", "ms": 2.0, "rel_error": 1e-6, "failure": None},
        {"config": bench.FUSEGEN_NO_GRAPH, "ms": 3.0, "rel_error": 1e-6, "failure": None},
    ]
    runs = [fake_run([dict(c) for c in configs]), fake_run([dict(c) for c in configs], mode="train")]
    lines = bench.model_table(runs).splitlines()
    assert [line.split()[:4] for line in lines[1:5]] == [
        ["Tiny", "2", "eval", "fusegen"],
        ["Tiny", "2", "eval", "fusegen,"],
        ["Tiny", "2", "train", "fusegen"],
        ["Tiny", "2", "train", "fusegen,"],
    ]
    assert lines[4].split()[4:] == ["no", "CUDA", "graph", "3.000", "1.50x", "1.0e-06"]
    assert (
        "fusegen, no CUDA graph: model.use_cuda_graphs = False: the launch plan replayed (runtime.run_launch_plan)."
        in lines
    )
    train_note = next(line for line in lines if line.startswith("mode train: model.train() under torch.no_grad()"))
    assert "Every fusegen call updates the running buffers" in train_note
    assert any(line.startswith("mode eval") for line in lines)
    assert "fusegen slower than eager: none" in lines


def test_model_table_names_each_run_where_fusegen_is_slower_than_eager():
    def run(mode, batch, eager_ms):
        configs = [
            {"config": "eager", "ms": eager_ms, "rel_error": 1e-6, "failure": None},
            {"config": "eager + CUDA graph", "ms": 0.5, "rel_error": 1e-6, "failure": None},
            {"config": "fusegen", "ms": 1.0, "rel_error": 1e-6, "failure": None},
        ]
        return {**fake_run(configs, mode=mode), "batch": batch}

    runs = [run("eval", 2, 3.0), run("train", 2, 0.9), run("eval", 8, 1.0), run("train", 8, 0.5)]
    lines = bench.model_table(runs).splitlines()
    assert "fusegen slower than eager: Tiny batch 2 train, Tiny batch 8 train" in lines


def test_kernel_table_has_every_column_and_the_totals(launches):
    groups = bench.group_launches(launches)
    rows = bench.kernel_rows(groups, [0.01] * len(groups), bench.Peaks(1000.0, 100.0))
    table = bench.kernel_table(fake_run([{"config": "fusegen", "ms": 1.0, "rel_error": 0.0, "failure": None}], rows))
    lines = table.splitlines()
    assert lines[0].startswith("Tiny (specs/tiny.fuse) batch 2, eval mode: per kernel")
    for column in ("kernel", "count", "input -> output", "ms", "MB", "GB/s", "TFLOP/s", "floor %", "spec"):
        assert column in lines[1]
    assert lines[3].split()[:4] == ["2", "dwconv3x3_bn_relu6", "2", "2x8x4x4"]
    assert lines[3].endswith("tiny.fuse:11: dw(8) * 2")  # where the block is used
    assert lines[-1].startswith("total: 6 launches, 0.060 ms summed one by one")


def test_kernel_table_in_training_mode_says_so_and_what_a_train_row_times(train_launches):
    groups = bench.group_launches(train_launches)
    assert [(launch.wrapper, count) for launch, count in groups] == [
        ("conv3x3_stats", 1),
        ("bn_relu_dwconv3x3_stats_train", 1),
        ("bn_relu6_conv1x1_stats_train", 2),
        ("bn_dwconv3x3_stats_train", 1),
        ("bn_global_avgpool_flatten_train", 1),
        ("linear_train", 1),
    ]
    rows = bench.kernel_rows(groups, [0.01] * len(groups), bench.Peaks(1000.0, 100.0))
    run = fake_run([{"config": "fusegen", "ms": 1.0, "rel_error": 0.0, "failure": None}], rows, mode="train")
    lines = bench.kernel_table(run).splitlines()
    assert lines[0].startswith("Tiny (specs/tiny.fuse) batch 2, train mode: per kernel")
    assert lines[4].split()[:4] == ["3", "bn_relu6_conv1x1_stats_train", "2", "2x8x4x4"]
    assert lines[-2].startswith("total: 7 launches, 0.070 ms summed one by one")
    assert lines[-1] == bench.TRAIN_KERNEL_NOTE
    assert lines[-1].startswith("a *_train row times two kernels: its wrapper first launches batch_norm_batch_stats")


def fake_gpu(monkeypatch, configurations, median_ms):
    """bench.main runs on this machine's device: the GPU's name, peaks, baselines and clock faked."""
    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "fake")
    monkeypatch.setattr(bench, "measure_peaks", lambda: bench.Peaks(1000.0, 100.0))
    monkeypatch.setattr(bench, "configurations", configurations)
    monkeypatch.setattr(bench, "median_ms", median_ms)
    monkeypatch.setattr(bench, "kernel_times_ms", lambda groups: [0.01] * len(groups))


def test_whole_command_with_fake_timings_prints_tables_and_round_trips_json(tmp_path, monkeypatch, capsys):
    """main() end to end: the device name, the peaks and the clock are faked, everything else is real."""
    (tmp_path / "tiny.fuse").write_text(TINY)
    clock = iter([4.0, 1.0, 9.0, 3.0, 8.0, 2.0, 6.0, 3.0])  # eager, then fusegen, each run in order

    def broken(x):
        raise RuntimeError("no compiler here")

    asked = []

    def configurations(model, max_autotune, torch_compile):
        asked.append((model, torch_compile))
        return [("eager", lambda x: model.reference_forward), ("broken", broken), ("fusegen", lambda x: model)]

    fake_gpu(monkeypatch, configurations, lambda fn, inputs: next(clock))
    out_file = tmp_path / "bench.json"
    assert fusegen_main(["bench", str(tmp_path / "tiny.fuse"), "--batch", "1", "3", "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "device: fake" in out and "measured peaks: 1000 GB/s" in out
    assert "Tiny (" in out and "batch 3, eval mode: per kernel" in out and "train mode" not in out
    assert "mode train:" not in out and bench.TRAIN_KERNEL_NOTE not in out
    assert ["Tiny", "1", "eval", "eager", "4.000", "4.00x"] in [line.split()[:6] for line in out.splitlines()]

    report = json.loads(out_file.read_text())
    assert report["peaks"] == {"bandwidth_gb_per_s": 1000.0, "tf32_tflop_per_s": 100.0}
    assert [(run["batch"], run["mode"]) for run in report["runs"]] == [(1, "eval"), (3, "eval")]
    first = report["runs"][0]
    assert first["input_shape"] == [1, 3, 8, 8]
    eager, failed, ours = first["configs"]
    assert eager["ms"] == 4.0 and eager["speedup"] == 4.0 and eager["rel_error"] < 1e-5
    assert failed["failure"] == "RuntimeError: no compiler here" and failed["ms"] is None
    assert ours["rel_error"] < TOLERANCE  # TF32 dots on the GPU
    assert [k["kernel"] for k in first["kernels"]][:2] == ["conv3x3_bn_relu", "dwconv3x3_bn_relu6"]
    assert first["totals"]["launches"] == 6
    assert [c["speedup"] for c in report["runs"][1]["configs"]] == [3.0, None, 1.0]
    assert json.loads(json.dumps(report)) == report
    assert [(model.training, compile_) for model, compile_ in asked] == [(False, True)] * 2

    # training mode first: the eval run after it gets a model of its own, whose running statistics the
    # training-mode calls have not moved (its float64 copy would no longer match)
    asked.clear()
    argv = ["bench", str(tmp_path / "tiny.fuse"), "--batch", "2", "--mode", "train", "eval", "--no-compile"]
    assert fusegen_main([*argv, "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "batch 2, train mode: per kernel" in out and "batch 2, eval mode: per kernel" in out
    assert bench.TRAIN_KERNEL_NOTE in out and out.count(bench.TRAIN_KERNEL_NOTE) == 1
    assert [(model.training, compile_) for model, compile_ in asked] == [(True, False), (False, False)]
    train_model, eval_model = (model for model, _ in asked)
    batches = {m.num_batches_tracked.item() for m in train_model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    warm_ups = 3 * bench.INPUTS_PER_BATCH  # three rounds of the inputs
    assert batches == {warm_ups + 2}, "the warm-ups, the error's call and the recorded forward updated the buffers"
    assert all(m.num_batches_tracked.item() == 0 for m in eval_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    report = json.loads(out_file.read_text())
    train, eval_ = report["runs"]
    assert (train["mode"], eval_["mode"]) == ("train", "eval")
    assert [k["kernel"] for k in train["kernels"]] == [
        "conv3x3_stats",
        "bn_relu_dwconv3x3_stats_train",
        "bn_relu6_conv1x1_stats_train",
        "bn_dwconv3x3_stats_train",
        "bn_global_avgpool_flatten_train",
        "linear_train",
    ]
    assert train["totals"]["launches"] == 7
    for run in (train, eval_):  # against reference_forward in float64 in the run's mode
        eager, _, ours = run["configs"]
        assert eager["rel_error"] < 1e-5 and ours["rel_error"] < TOLERANCE, run["mode"]
    assert [train["configs"][0]["ms"], train["configs"][2]["ms"]] == [8.0, 2.0]


def bench_interrupted(argv: list[str]) -> int:
    """fusegen bench's exit status, an interrupt that escapes it failing the test (not ending pytest)."""
    try:
        return fusegen_main(argv)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped fusegen bench")


def eager_and_fusegen(model, max_autotune, torch_compile):
    """bench.configurations cut to two: two timings a run."""
    return [("eager", lambda x: model.reference_forward), ("fusegen", lambda x: model)]


def test_an_interrupted_bench_prints_and_keeps_the_runs_it_finished(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second run: exit 130, the first run's tables printed, the JSON file holds that run."""
    (tmp_path / "tiny.fuse").write_text(TINY)
    timed = []

    def median_ms(fn, inputs):
        timed.append(fn)
        if len(timed) == 3:  # eager and fusegen at batch 1, then eager at batch 2
            raise KeyboardInterrupt
        return 2.0

    fake_gpu(monkeypatch, eager_and_fusegen, median_ms)
    out_file = tmp_path / "bench.json"
    argv = ["bench", str(tmp_path / "tiny.fuse"), "--batch", "1", "2", "--json", str(out_file)]
    assert bench_interrupted(argv) == 130
    captured = capsys.readouterr()
    assert f"interrupted after 1 of 2 runs; {out_file} holds 1" in captured.err
    assert "batch 1, eval mode: per kernel" in captured.out and "batch 2" not in captured.out
    assert [(run["batch"], run["mode"]) for run in json.loads(out_file.read_text())["runs"]] == [(1, "eval")]


def test_an_interrupt_while_the_json_is_written_leaves_the_last_whole_file(tmp_path, monkeypatch, capsys):
    """The file is replaced whole after each run: cut between writing the second report and putting it in
    place, it still holds the first run, the message counts that one, and no partial file is left."""
    (tmp_path / "tiny.fuse").write_text(TINY)
    fake_gpu(monkeypatch, eager_and_fusegen, lambda fn, inputs: 2.0)
    replace = Path.replace
    replaced = []

    def interrupted_second_replace(self, target):
        replaced.append(target)
        if len(replaced) == 2:
            raise KeyboardInterrupt
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", interrupted_second_replace)
    out_file = tmp_path / "bench.json"
    argv = ["bench", str(tmp_path / "tiny.fuse"), "--batch", "1", "2", "--json", str(out_file)]
    assert bench_interrupted(argv) == 130
    assert f"interrupted after 2 of 2 runs; {out_file} holds 1" in capsys.readouterr().err
    assert [run["batch"] for run in json.loads(out_file.read_text())["runs"]] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "tiny.fuse"]


def test_an_interrupt_before_any_run_prints_nothing_and_writes_no_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.fuse").write_text(TINY)

    def interrupted():
        raise KeyboardInterrupt

    fake_gpu(monkeypatch, eager_and_fusegen, lambda fn, inputs: 1.0)
    monkeypatch.setattr(bench, "measure_peaks", interrupted)
    out_file = tmp_path / "bench.json"
    assert bench_interrupted(["bench", str(tmp_path / "tiny.fuse"), "--json", str(out_file)]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and "interrupted after 0 of 1 runs\n" in captured.err
    assert not out_file.exists()


def test_no_compile_leaves_out_the_torch_compile_baselines(tiny):
    model = bench.build_model(tiny)
    names = [name for name, _ in bench.configurations(model, max_autotune=False, torch_compile=False)]
    assert names == ["eager", "eager + CUDA graph", "fusegen", "fusegen, no CUDA graph"]
    names = [name for name, _ in bench.configurations(model, max_autotune=False)]
    assert "torch.compile" in names and "torch.compile reduce-overhead" in names


def test_the_no_graph_row_runs_the_model_with_cuda_graphs_off_and_turns_them_back_on(tiny):
    model = bench.build_model(tiny, mode="train").to(DEVICE)
    make = dict(bench.configurations(model, max_autotune=False, torch_compile=False))[bench.FUSEGEN_NO_GRAPH]
    forward = make(None)
    seen = []
    run_kernels = model.run_kernels

    def spy(x):
        seen.append(model.use_cuda_graphs)
        return run_kernels(x)

    model.run_kernels = spy  # forward calls self.run_kernels where it runs no graph
    x = torch.rand(bench.input_shape(tiny, 2), device=DEVICE)
    with torch.no_grad():
        out = forward(x)
    assert seen == [False] and model.use_cuda_graphs is True
    with torch.no_grad():
        assert torch.equal(out, run_kernels(x))
        with pytest.raises(ValueError, match="expects a float32 tensor"):
            forward(x.double())
    assert model.use_cuda_graphs is True


def test_build_model_gives_both_modes_the_same_parameters_and_statistics(tiny):
    eval_model, train_model = bench.build_model(tiny), bench.build_model(tiny, mode="train")
    assert not eval_model.training and train_model.training
    assert all(not m.training for m in eval_model.modules()) and all(m.training for m in train_model.modules())
    eval_state, train_state = eval_model.state_dict(), train_model.state_dict()
    assert eval_state.keys() == train_state.keys()
    assert all(torch.equal(eval_state[k], train_state[k]) for k in eval_state)
    assert not torch.equal(eval_model.bn1.running_var, torch.ones(8)), "random statistics, not the defaults"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times on the GPU")
def test_bench_on_the_gpu(tmp_path):
    (tmp_path / "tiny.fuse").write_text(TINY)
    out_file = tmp_path / "bench.json"
    argv = ["bench", str(tmp_path / "tiny.fuse"), "--batch", "2", "--mode", "eval", "train", "--json", str(out_file)]
    assert fusegen_main(argv) == 0
    report = json.loads(out_file.read_text())
    assert report["peaks"]["bandwidth_gb_per_s"] > 100 and report["peaks"]["tf32_tflop_per_s"] > 10
    assert [run["mode"] for run in report["runs"]] == ["eval", "train"]
    for run in report["runs"]:
        assert [c["config"] for c in run["configs"]][-2:] == ["fusegen", "fusegen, no CUDA graph"]
        for config in run["configs"]:
            assert config["failure"] is None, (run["mode"], config)
            assert config["ms"] > 0 and config["rel_error"] < 1e-2, (run["mode"], config)
        assert run["totals"]["launches"] == 7 and all(k["ms"] > 0 for k in run["kernels"])
    assert report["runs"][1]["kernels"][0]["kernel"] == "conv3x3_stats"
