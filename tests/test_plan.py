"""search --plan: the scheduler's epochs simulated by Ray's ASHA rules on hand-computed cases, and the real
command on digits, which times the work, writes plan.json and starts no trial (docs/search.md, "Planning a
search")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from searchkit import child_env, search_args

from tune_mtard.search.schedule_model import asha_rungs, simulate


def test_asha_rungs_are_ray_tunes_milestones():
    assert asha_rungs(3, 3, 30) == [3, 9, 27]
    assert asha_rungs(10, 3, 300) == [10, 30, 90, 270]
    assert asha_rungs(1, 2, 3) == [1, 2]
    assert asha_rungs(5, 3, 5) == [5]


def test_a_trial_below_the_rungs_percentile_of_earlier_records_stops_there():
    # One lane, rung at epoch 1, reduction factor 2 (cutoff: the median of the values recorded before).
    # Trial 0 is first at the rung: continues. Trial 1 (0.2 < 0.5) stops at epoch 1. Trial 2: cutoff is the
    # median of [0.5, 0.2] = 0.35, 0.9 continues. A trial takes 10 s to start and 1 s per epoch.
    sim = simulate([0.5, 0.2, 0.9], slots=1, max_t=2, rungs=[1], reduction_factor=2, reported=[1, 2],
                   trial_seconds=lambda epoch: 10 + epoch)
    assert sim.epochs == [2, 1, 2]
    assert sim.total_epochs == 5
    assert sim.wall_s == 12 + 11 + 12


def test_lanes_run_trials_side_by_side_and_a_freed_lane_takes_the_next_trial():
    # Two lanes: trials 0 and 1 start at 0 s. At epoch 1 trial 0 (first) continues, trial 1 (0.1 < 0.3)
    # stops at 2 s and its lane starts trial 2 (0.8 > median(0.3, 0.1) = 0.2), which ends at 2 + 4 = 6 s.
    sim = simulate([0.3, 0.1, 0.8], slots=2, max_t=2, rungs=[1], reduction_factor=2, reported=[1, 2],
                   trial_seconds=lambda epoch: 1 + 1.5 * epoch)
    assert sim.epochs == [2, 1, 2]
    assert sim.wall_s == pytest.approx(2.5 + 4)


def test_without_rungs_every_trial_runs_max_t():
    sim = simulate([0.0] * 4, slots=2, max_t=3, rungs=[], reduction_factor=3, reported=[1, 2, 3],
                   trial_seconds=lambda epoch: 2.0 * epoch)
    assert sim.epochs == [3, 3, 3, 3]
    assert sim.wall_s == 12.0


def run_plan(space_file: Path, tmp_path: Path, ray_address: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tune_mtard.search", *search_args(space_file, tmp_path, "planned"),
           "--address", ray_address, "--plan", *extra]
    return subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)


def test_plan_times_the_work_writes_plan_json_and_starts_nothing(space_file, tmp_path, ray_address):
    result = run_plan(space_file, tmp_path, ray_address)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "results" / "planned"
    plan = json.loads((folder / "plan.json").read_text())
    # No trial, no study, no MLflow record: only the plan.
    assert sorted(p.name for p in folder.iterdir()) == ["plan.json"]
    assert not (tmp_path / "mlflow.db").exists()
    assert "no trial was started" in result.stdout
    m = plan["measured"]
    assert m["step_s"] > 0 and m["validation_s"] > 0 and m["checkpoint_s"] > 0
    assert m["steps_per_epoch"] == 10  # digits: 1222 training examples in batches of 128
    assert plan["teachers_to_train"] == {}  # the session's teachers are cached
    assert plan["lanes"] == 2 and plan["scheduler"]["rungs"] == [1, 2]
    e, w = plan["expected"], plan["worst_case"]
    assert w["epochs"] == 5 * 3 and w["trials_at_full_budget"] == 5
    assert 5 <= e["epochs"] < w["epochs"]
    assert 0 < plan["wall_s"] == e["wall_s"] < w["wall_s"]
    assert 0 < e["device_hours"] < w["device_hours"]
    assert plan["device_hours_unit"] == "CPU core-hours"
    assert any("simulated searches" in line for line in plan["assumptions"])


def test_plan_adds_the_teachers_a_search_would_train_and_trains_none(space_file, tmp_path, ray_address):
    cache = tmp_path / "empty-cache"
    result = run_plan(space_file, tmp_path, ray_address, "--set", f"teachers.cache_dir={cache}")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "results" / "planned" / "plan.json").read_text())
    assert sorted(plan["teachers_to_train"]) == ["clean", "robust"]
    assert plan["teachers_to_train"]["clean"]["epochs"] == 4 and plan["teachers_to_train"]["robust"]["epochs"] == 3
    assert all(t["seconds"] > 0 for t in plan["teachers_to_train"].values())
    assert not cache.exists() or not any(cache.rglob("*.pt"))
    assert "first trains the clean teacher" in result.stdout


def test_plan_for_a_device_elsewhere_scales_the_compute_by_its_given_speed(space_file, tmp_path, ray_address):
    result = run_plan(space_file, tmp_path, ray_address, "--plan-device", "a100=1000", "--plan-cluster", "64,8",
                      "--set", "search.resources.gpu=0.5", "--set", "search.max_concurrent=4",
                      "--set", "device=auto")  # a GPU search: device cpu with GPUs reserved is exit 2 (issue 21)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "results" / "planned" / "plan.json").read_text())
    assert plan["measured"]["device"] == "a100"
    assert plan["measured"]["steps_per_s"] == pytest.approx(1000)
    assert plan["cluster"] == {"cpu": 64, "gpu": 8, "source": "--plan-cluster"}
    assert plan["lanes"] == 4 and plan["device_hours_unit"] == "GPU-hours"


@pytest.mark.parametrize("flags, key", [
    (["--plan-device", "a100=fast"], "--plan-device"),
    (["--plan-device", "a100=-3"], "--plan-device"),
    (["--plan-device", "cuda:7"], "--plan-device"),
    (["--plan-cluster", "lots"], "--plan-cluster"),
    (["--plan-cluster", "0,1"], "--plan-cluster"),
    (["--resume"], "--plan"),
])
def test_bad_plan_flags_are_one_line_and_exit_2_before_anything_is_written(space_file, tmp_path, ray_address,
                                                                           flags, key):
    result = run_plan(space_file, tmp_path, ray_address, *flags)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().count("\n") == 0 and key in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results" / "planned" / "plan.json").exists()
