"""The GPU fast path (config ``perf``) gives the results of the plain fp32 loop, within stated tolerances,
and the benchmark measures what it claims to. Every check runs on the CPU; none times anything.

Tolerances:
* bf16 autocast: a step's distillation losses within 5% (relative) of fp32 and the epoch-mean losses of a
  short run within 10%. bf16 keeps 8 bits of mantissa (about 3 significant digits) in every conv/linear
  output, and the PGD examples it produces can differ in the odd pixel, which then shifts the losses.
* channels_last: a step's trace within 1e-4 (relative) of NCHW, the weights after three steps within
  1e-4 relative or 1e-5 absolute; only the order of float sums changes.
* torch.compile: a step's trace within 1e-4 (relative) of eager.
* data on the device: bit-identical batches and traces, checked on a card only (tests/test_cuda.py): on a CPU
  the device is the host and both runs would take the same path.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from tune_mtard.attacks import PGD, TrainPGD
from tune_mtard.data import DataBundle, iterate_batches
from tune_mtard.engine import Trainer
from tune_mtard.methods import trace_row
from tune_mtard.metrics import TRACE_COLUMNS
from tune_mtard.perf import PerfOptions, data_bytes, resolve_device

CPU = torch.device("cpu")
LOSSES = [TRACE_COLUMNS.index("loss_adv"), TRACE_COLUMNS.index("loss_nat")]
PLATFORM_SEARCH = """\
search:
  num_samples: 1
  resources: {cpu: 1, gpu: 0}
space:
  balance.beta: {type: float, low: 0.5, high: 3.0}
"""
ALL_OFF = {"perf.bf16": False, "perf.channels_last": False, "perf.compile": False, "perf.data_on_device": False}


def trainer(cfg, data, teachers, **perf) -> Trainer:
    """A CPU trainer with its own copies of the teachers (a trainer converts them in place)."""
    cfg = cfg.with_values(dict(ALL_OFF, **{f"perf.{k}": v for k, v in perf.items()}))
    return Trainer(cfg, data, {role: copy.deepcopy(teachers[role]) for role in ("clean", "robust")}, device=CPU)


def first_batch(data, batch_size=64):
    return next(iterate_batches(data.train, batch_size, shuffle=False))


def fitted(cfg, data, teachers, **perf) -> Trainer:
    """A finished run; built right before it trains, since a Trainer seeds the global RNG when built."""
    t = trainer(cfg, data, teachers, **perf)
    t.fit()
    return t


def steps(t: Trainer, x, y, n: int) -> torch.Tensor:
    torch.manual_seed(123)
    return torch.stack([t.train_step(x, y) for _ in range(n)])


# ---- bf16 ------------------------------------------------------------------------------------------


def test_bf16_autocast_trains_with_losses_close_to_fp32(tiny_config, tiny_digits, tiny_teachers):
    x, y = first_batch(tiny_digits)
    fp32 = trainer(tiny_config, tiny_digits, tiny_teachers)
    bf16 = trainer(tiny_config, tiny_digits, tiny_teachers, bf16=True)
    first_fp32, first_bf16 = steps(fp32, x, y, 1)[0], steps(bf16, x, y, 1)[0]
    assert first_bf16[LOSSES].tolist() == pytest.approx(first_fp32[LOSSES].tolist(), rel=0.05)

    cfg = tiny_config.with_values({"train.epochs": 1})
    initial = trainer(cfg, tiny_digits, tiny_teachers).student.state_dict()
    runs = [fitted(cfg, tiny_digits, tiny_teachers, bf16=flag) for flag in (False, True)]
    means = [run.trace[:, [2 + i for i in LOSSES]].mean(0) for run in runs]
    assert torch.isfinite(runs[1].trace[:, 2:]).all()
    assert means[1].tolist() == pytest.approx(means[0].tolist(), rel=0.10)
    assert not torch.equal(initial["classifier.3.weight"], runs[1].student.state_dict()["classifier.3.weight"])
    assert all(p.dtype == torch.float32 for p in runs[1].student.parameters())  # autocast, not a bf16 model


def test_bf16_runs_the_student_teachers_and_training_pgd_in_bf16(tiny_config, tiny_digits, tiny_teachers):
    x, y = first_batch(tiny_digits)
    t = trainer(tiny_config, tiny_digits, tiny_teachers, bf16=True)
    seen: dict[str, set[torch.dtype]] = {"student_eval": set(), "student_train": set(), "teachers": set()}

    def student_hook(module, args, output):
        seen["student_train" if module.training else "student_eval"].add(output.dtype)

    def teacher_hook(module, args, output):
        seen["teachers"].add(output.dtype)

    t.student.register_forward_hook(student_hook)
    t.objective.teacher_clean.register_forward_hook(teacher_hook)
    t.objective.teacher_robust.register_forward_hook(teacher_hook)
    row = t.train_step(x, y)
    assert seen == {"student_eval": {torch.bfloat16}, "student_train": {torch.bfloat16}, "teachers": {torch.bfloat16}}
    assert row.dtype == torch.float32


def test_bf16_stores_the_teachers_weights_in_bf16_and_gives_the_outputs_of_casting_them_every_forward(
        tiny_config, tiny_digits, tiny_teachers):
    """Autocast re-cast a frozen teacher's fp32 weights at every forward; a teacher stored in bf16 (convolution and
    linear weights; batch norm stays fp32, as autocast leaves it) gives bit-identical outputs without the casts,
    and the caller's fp32 teacher is left alone."""
    x, _ = first_batch(tiny_digits)
    given = copy.deepcopy(tiny_teachers)
    t = Trainer(tiny_config.with_values(dict(ALL_OFF, **{"perf.bf16": True})), tiny_digits, given, device=CPU)
    for role, teacher in (("clean", t.objective.teacher_clean), ("robust", t.objective.teacher_robust)):
        assert teacher is not given[role]
        dtypes: dict[type, set[torch.dtype]] = {}
        for module in teacher.modules():
            dtypes.setdefault(type(module), set()).update(p.dtype for p in module.parameters(recurse=False))
        assert dtypes[nn.Conv2d] == dtypes[nn.Linear] == {torch.bfloat16}
        assert dtypes[nn.BatchNorm2d] == {torch.float32}
        assert all(p.dtype == torch.float32 for p in given[role].parameters())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(teacher(x), given[role](x))


def test_validation_under_bf16_is_fp32_and_equals_the_fp32_trainers(tiny_config, tiny_digits, tiny_teachers):
    fp32 = trainer(tiny_config, tiny_digits, tiny_teachers)
    bf16 = trainer(tiny_config, tiny_digits, tiny_teachers, bf16=True)
    bf16.student.load_state_dict(fp32.student.state_dict())
    dtypes = set()
    bf16.student.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    assert bf16.validate() == fp32.validate()
    assert dtypes == {torch.float32}


def test_train_pgd_keeps_the_callers_autocast_only_when_asked(tiny_digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    dtypes = []
    model.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    x, y = first_batch(tiny_digits, 8)
    for keep, expected in ((False, torch.float32), (True, torch.bfloat16)):
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            adv = TrainPGD(model, 0.1, 0.025, 2, keep_autocast=keep)(x, y)
        assert set(dtypes) == {expected}
        assert adv.dtype == torch.float32 and adv.shape == x.shape
        assert (adv - x).abs().max() <= 0.1 + 1e-6
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        PGD(model, 0.1, 0.025, 2)(x, y)
    assert set(dtypes) == {torch.float32}  # evaluation PGD is always fp32


# ---- channels_last ---------------------------------------------------------------------------------


def test_channels_last_gives_the_nchw_results(tiny_config, tiny_digits, tiny_teachers):
    x, y = first_batch(tiny_digits)
    nchw = trainer(tiny_config, tiny_digits, tiny_teachers)
    nhwc = trainer(tiny_config, tiny_digits, tiny_teachers, channels_last=True)
    conv = next(m for m in nhwc.student.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    rows_nchw, rows_nhwc = steps(nchw, x, y, 3), steps(nhwc, x, y, 3)
    assert rows_nhwc.tolist() == [pytest.approx(r, rel=1e-4, abs=1e-6) for r in rows_nchw.tolist()]
    for key, value in nchw.student.state_dict().items():
        assert torch.allclose(nhwc.student.state_dict()[key], value, rtol=1e-4, atol=1e-5), key


def test_the_attacks_random_starts_do_not_depend_on_the_memory_format():
    """randn_like on a channels_last batch of three channels would give each pixel another draw than in NCHW."""
    from tune_mtard.methods.base import kl_attack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10)).eval()
    x, y = torch.rand(5, 3, 6, 6), torch.randint(0, 10, (5,))
    nhwc = x.contiguous(memory_format=torch.channels_last)
    target = torch.softmax(torch.randn(5, 10), dim=1)
    attacks = [TrainPGD(model, 0.1, 0.025, 2), PGD(model, 0.1, 0.025, 2),
               lambda images, _: kl_attack(model, images, target, 0.1, 0.025, 2)]
    for attack in attacks:
        torch.manual_seed(1)
        expected = attack(x, y)
        torch.manual_seed(1)
        assert torch.allclose(attack(nhwc, y), expected, rtol=0, atol=1e-6)


# ---- torch.compile ---------------------------------------------------------------------------------


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """torch.compile with the aot_eager backend: Dynamo's graph capture and AOTAutograd, without Inductor's
    C++ code generation (minutes on a 2-core CPU). The Trainer's compile path is exercised as it is."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real, backend="aot_eager"))


def test_compiling_the_student_gives_the_eager_step(aot_eager_compile, tiny_config, tiny_digits, tiny_teachers):
    x, y = first_batch(tiny_digits)
    eager = trainer(tiny_config, tiny_digits, tiny_teachers)
    compiled = trainer(tiny_config, tiny_digits, tiny_teachers, compile=True)
    assert compiled.model is not compiled.student  # the objective sees the compiled module
    rows_eager, rows_compiled = steps(eager, x, y, 2), steps(compiled, x, y, 2)
    assert rows_compiled.tolist() == [pytest.approx(r, rel=1e-4, abs=1e-6) for r in rows_eager.tolist()]
    assert set(compiled.state_dict()["student"]) == set(eager.state_dict()["student"])  # no _orig_mod. prefix


def test_compile_builds_two_graphs_per_mode_in_the_first_epoch_and_none_after(tiny_config, tiny_digits, tiny_teachers,
                                                                                 monkeypatch):
    """Static shapes: the student in train mode and in eval mode (training PGD) each get one graph for full
    batches and one for the epoch's last, smaller batch; validation runs the eager student. Training PGD
    freezes the weights, so its compiled backward computes the input's gradient only."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    gradients_per_backward = []

    def backward_compiler(graph, example_inputs):
        (outputs,) = next(node for node in graph.graph.nodes if node.op == "output").args
        gradients_per_backward.append(sum(output is not None for output in outputs))
        return make_boxed_func(graph)

    recording = aot_autograd(fw_compiler=lambda graph, _: make_boxed_func(graph), bw_compiler=backward_compiler)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording))
    torch._dynamo.reset()
    counters.clear()
    t = trainer(tiny_config.with_values({"train.epochs": 3}), tiny_digits, tiny_teachers, compile=True)
    assert len(tiny_digits.train) % tiny_config.data.batch_size != 0  # a smaller last batch every epoch
    graphs = []
    for _ in range(3):
        t.train_epoch()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [4, 4, 4]
    assert graphs[-1] < torch._dynamo.config.recompile_limit  # past it the student would silently run eager
    weights = len(list(t.student.parameters()))
    assert sorted(gradients_per_backward) == [1, 1, weights, weights]  # PGD: the input's; training: the weights'
    assert all(p.requires_grad for p in t.student.parameters())


def test_each_compiling_trainer_gets_its_own_graphs_however_many_came_before(tiny_config, tiny_digits, tiny_teachers,
                                                                              monkeypatch):
    """Three trainers in one process with three batch sizes need twelve graphs of one forward; past eight Dynamo
    would run the third student eagerly, so each compiling trainer starts from empty caches."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    counters.clear()
    built = []
    for batch_size in (96, 112, 128):
        cfg = tiny_config.with_values({"train.epochs": 1, "data.batch_size": batch_size, "attack.steps": 1})
        trainer(cfg, tiny_digits, tiny_teachers, compile=True).train_epoch()
        built.append(counters["stats"]["unique_graphs"])
    assert built == [4, 8, 12]


@pytest.mark.slow
def test_inductor_compiled_student_gives_the_eager_step(tiny_config, tiny_digits, tiny_teachers):
    """The real backend (Inductor's C++ compilation of the student: about 3 minutes on a 2-core CPU with a cold
    cache), where the tests above use aot_eager."""
    x, y = first_batch(tiny_digits)
    rows_eager = steps(trainer(tiny_config, tiny_digits, tiny_teachers), x, y, 1)
    rows_compiled = steps(trainer(tiny_config, tiny_digits, tiny_teachers, compile=True), x, y, 1)
    assert rows_compiled.tolist() == [pytest.approx(r, rel=1e-4, abs=1e-6) for r in rows_eager.tolist()]


# ---- perf: auto ------------------------------------------------------------------------------------


def test_perf_auto_is_off_on_the_cpu_and_explicit_values_win(tiny_config):
    assert PerfOptions.resolve(tiny_config, CPU) == PerfOptions(False, False, False, False)
    cfg = tiny_config.with_values({"perf.bf16": True, "perf.channels_last": True, "perf.data_on_device": True})
    assert PerfOptions.resolve(cfg, CPU) == PerfOptions(True, True, False, True)


def test_perf_auto_on_cuda_turns_everything_on_and_keeps_large_datasets_on_the_host(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=1000, major=8))
    cuda = torch.device("cuda")
    assert PerfOptions.resolve(tiny_config, cuda, dataset_bytes=100) == PerfOptions(True, True, False, True)
    assert PerfOptions.resolve(tiny_config, cuda, dataset_bytes=101).data_on_device is False


def test_perf_auto_leaves_bf16_off_on_a_card_without_native_bf16(tiny_config, monkeypatch):
    """A V100 or T4 (compute capability 7.x) emulates bf16; an explicit ``perf.bf16: true`` still wins."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=1000, major=7))
    cuda = torch.device("cuda")
    assert PerfOptions.resolve(tiny_config, cuda) == PerfOptions(False, True, False, True)
    assert PerfOptions.resolve(tiny_config.with_values({"perf.bf16": True}), cuda).bf16 is True


def test_data_bytes_counts_every_split(tiny_digits: DataBundle):
    splits = (tiny_digits.train, tiny_digits.val, tiny_digits.test)
    expected = sum(s.images.numel() + 8 * s.labels.numel() for s in splits)
    assert data_bytes(tiny_digits) == expected


# ---- the trace row ---------------------------------------------------------------------------------


def test_a_trace_row_holds_tensors_and_numbers_in_column_order_with_nan_for_the_rest():
    row = trace_row(CPU, loss_adv=torch.tensor(0.25, dtype=torch.float64), w_adv=1.0, w_nat=0.0)
    assert row.dtype == torch.float32 and row.shape == (len(TRACE_COLUMNS),)
    values = dict(zip(TRACE_COLUMNS, row.tolist(), strict=False))
    assert (values["loss_adv"], values["w_adv"], values["w_nat"]) == (0.25, 1.0, 0.0)
    assert all(math.isnan(values[k]) for k in ("loss_nat", "entropy_adv", "entropy_nat", "tau_adv", "tau_nat"))
    again = trace_row(CPU, w_adv=1.0)
    again[TRACE_COLUMNS.index("w_adv")] = 5.0  # rows are fresh tensors: the cached constants stay put
    assert trace_row(CPU, w_adv=1.0)[TRACE_COLUMNS.index("w_adv")] == 1.0


# ---- the benchmark ---------------------------------------------------------------------------------


def test_the_reference_step_computes_what_the_engine_does(tiny_config, tiny_digits, tiny_teachers):
    """bench's authors'-style step is the same algorithm, so bmtard_over_reference compares like with like."""
    from tune_mtard.benchmarks.reference_step import ReferenceStep

    x, y = first_batch(tiny_digits)
    engine = trainer(tiny_config, tiny_digits, tiny_teachers)
    reference = ReferenceStep(engine.cfg, copy.deepcopy(engine.student), copy.deepcopy(tiny_teachers["clean"]),
                              copy.deepcopy(tiny_teachers["robust"]))
    rows = steps(engine, x, y, 3)
    torch.manual_seed(123)
    for row in rows.tolist():
        expected = reference(x, y)
        assert row == pytest.approx([expected[k] for k in TRACE_COLUMNS], rel=1e-4, abs=1e-6)


def test_bench_step_writes_the_ratios_as_json(tiny_config_path, tmp_path):
    from tune_mtard.cli.bench import main

    out = tmp_path / "step.json"
    assert main(["step", "--config", str(tiny_config_path), "--repeats", "1", "--window-s", "0.01",
                 "--warmup", "1", "--batch-size", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"bmtard_over_floor", "bmtard_over_reference", "steps_per_s", "machine"} <= result.keys()
    assert set(result["steps_per_s"]) == {"bmtard_step", "pgdat_step", "teacher_clean_forward",
                                          "teacher_robust_forward", "student_forward_backward", "compute_in_sequence",
                                          "reference_step"}
    assert result["bmtard_over_floor"] > 0 and result["bmtard_over_reference"] > 0
    assert result["batch_size"] == 32


def test_bench_epoch_times_whole_epochs_and_the_loader_alone(tiny_config_path, tmp_path):
    from tune_mtard.cli.bench import main

    out = tmp_path / "epoch.json"
    assert main(["epoch", "--config", str(tiny_config_path), "--epochs", "2", "--warmup-epochs", "0",
                 "--train-examples", "80", "--batch-size", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["train_examples"], result["steps_per_epoch"], result["epochs"]) == (80, 3, 2)
    assert len(result["epoch_s_all"]) == len(result["loader_s_all"]) == 2
    assert 0 < result["train_s"] < result["epoch_s"] and result["validate_s"] > 0 and result["loader_s"] > 0
    assert result["steps_per_s"] == pytest.approx(3 / result["train_s"])
    assert result["images_per_s"] == pytest.approx(80 / result["train_s"])
    assert {"loader_share", "images_per_s_with_validation", "ms_per_step", "machine", "perf"} <= result.keys()


def small_check_setup():
    """The GPU checks' setup, shrunk for a CPU: digits CNNs on 3x8x8 images, batches of 8, a last batch of 4."""
    from tune_mtard.benchmarks.gpu_checks import CheckSetup

    return CheckSetup(CPU, student="digits_cnn", clean_teacher="digits_cnn_large", robust_teacher="digits_cnn",
                      image_size=8, train_examples=20, val_examples=8, batch_size=8, attack_steps=1)


def test_bench_gpu_runs_every_check_then_step_and_epoch_into_one_json(aot_eager_compile, tiny_config, tmp_path):
    """The GPU owner's one command, run small on a CPU: the checks (tests/test_cuda.py's, without the sync
    check's debug mode, which needs CUDA) pass, and every figure lands in one file."""
    from tune_mtard.benchmarks.gpu import EPOCH_VARIANTS, STEP_VARIANTS, bench_gpu
    from tune_mtard.benchmarks.gpu_checks import SYNC_CHECK_OPTIONS

    out = tmp_path / "gpu.json"
    cfg = tiny_config.with_values({"data.batch_size": 8, "eval.n_examples": 8, "attack.steps": 1})
    bench_gpu(cfg, small_check_setup(), out, train_examples=24, val_examples=8, image_size=8, epochs=1, repeats=1,
              window_s=0.01, log=lambda line: None)
    result = json.loads(out.read_text())
    failed = {name: check["error"] for name, check in result["checks"].items() if not check["passed"]}
    assert not failed and result["all_checks_passed"] is True
    assert {f"no_host_sync[{option}]" for option in SYNC_CHECK_OPTIONS} <= result["checks"].keys()
    assert result["checks"]["compile_steady_state"]["result"]["graphs_after_each_epoch"] == [4, 4, 4]
    assert set(result["step"]) == set(STEP_VARIANTS) and set(result["epoch"]) == set(EPOCH_VARIANTS)
    assert result["epoch"]["compile"]["perf"]["compile"] is True
    assert result["epoch"]["host_data"]["perf"]["data_on_device"] is False
    assert all("steps_per_s" in figures for figures in [*result["step"].values(), *result["epoch"].values()])


def test_a_check_that_fails_says_what_it_measured(monkeypatch):
    from tune_mtard.benchmarks import gpu_checks

    monkeypatch.setattr(gpu_checks, "BF16_FIRST_STEP_RTOL", 0.0)
    with pytest.raises(gpu_checks.CheckFailed, match="first step"):
        gpu_checks.check_bf16_close_to_fp32(small_check_setup())


def test_bench_platform_times_one_trial_bare_and_several_through_one_tuner(tiny_config_path, tmp_path):
    """The real platform benchmark, shrunk: a fresh Ray in a subprocess, a 1-epoch trial bare and two in a Tuner."""
    space = tmp_path / "space.yaml"
    space.write_text(tiny_config_path.read_text() + PLATFORM_SEARCH)
    out = tmp_path / "platform.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "tune_mtard.bench", "platform", "--config", str(space),
                           "--epochs", "1", "--repeats", "1", "--trials", "2", "--out", str(out)],
                          cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["command"] == "platform" and result["epochs"] == 1 and result["repeats"] == 1
    (run,) = result["runs"]
    assert 0 < run["bare_epoch_time_sum_s"] <= run["bare_s"]
    assert 0 < run["trial_epoch_time_sum_s"] <= run["trial_loop_s"] <= run["tuner_fit_s"]
    assert run["trials"] == result["trials_per_tuner"] == 2
    assert run["trial_launch_s"] == pytest.approx((run["tuner_fit_s"] - run["trial_loops_sum_s"]) / 2)
    assert result["trial_launch_s"] == run["trial_launch_s"]
    assert result["platform_overhead"] == pytest.approx((run["trial_loop_s"] - run["bare_s"]) / run["trial_loop_s"])
    assert run["driver_mlflow_s"] > 0 and run["driver_optuna_s"] > 0  # the search's own recorder and searcher ran
    assert "platform_overhead" in done.stdout


@pytest.mark.parametrize("argv", [["step", "--repeats", "0"], ["search", "--num-samples", "0"],
                                  ["epoch", "--warmup-epochs", "-1"], ["epoch", "--train-examples", "0"],
                                  ["gpu", "--device", "cpu"], ["gpu", "--device", "nonsense"],
                                  ["step", "--out", "/no/such/folder/x.json"], ["nonsense"]])
def test_bench_rejects_bad_flags_with_exit_code_2(argv, capsys):
    from tune_mtard.cli.bench import main
    from tune_mtard.cli.common import run

    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bench_search_refuses_a_fifo_baseline_from_another_config(tmp_path, capsys):
    from tune_mtard.cli.bench import main
    from tune_mtard.cli.common import run

    earlier = tmp_path / "search.json"
    earlier.write_text(json.dumps({"command": "search", "fifo": {}, "fifo_fingerprint": {"train": {"epochs": 1}}}))
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["search", "--fifo-from", str(earlier)])
    assert exit_info.value.code == 2
    assert "--fifo-from" in capsys.readouterr().err


def test_a_device_the_machine_lacks_is_a_config_error_naming_device(monkeypatch):
    from tune_mtard.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match="has 2 CUDA device") as info:
        resolve_device("cuda:2")
    assert info.value.key == "device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device(name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="MPS is not available"):
        resolve_device("mps")


def test_bench_driver_runs_two_searches_of_synthetic_trials_and_records_every_report(tmp_path):
    """The real driver benchmark, shrunk: the search's Tuner at two sizes; every report reaches MLflow."""
    out = tmp_path / "driver.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "tune_mtard.bench", "driver", "--config", "digits.yaml",
                           "--trials", "6", "--trials-large", "12", "--epochs", "5", "--concurrent", "2",
                           "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["command"] == "driver" and result["scheduler"] == "asha" and result["epochs"] == 5
    assert [s["trials"] for s in result["searches"]] == [result["trials"], result["trials_large"]] == [6, 12]
    for search in result["searches"]:
        assert search["child_runs"] == search["trials"] and search["records"] == "complete"
        assert search["trials"] <= search["reports"] == search["recorded_reports"] <= search["trials"] * 5
        assert search["driver_s_per_report"] == pytest.approx(search["tuner_fit_s"] / search["reports"])
    assert result["growth"] == pytest.approx(result["driver_s_per_report_large"] / result["driver_s_per_report"])
    assert "growth per report" in done.stdout
