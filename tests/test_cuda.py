"""The GPU fast path on a real card (docs/gpu.md): skipped without CUDA.

Each test is one check of ``tune_mtard.benchmarks.gpu_checks``, the same plain functions
``python -m tune_mtard.bench gpu`` runs without pytest; a check raises ``CheckFailed`` saying what it measured.
They train B-MTARD on a synthetic CIFAR-shaped dataset (576 training images: four batches of 128 and a last one
of 64) with a ResNet-18 student and a ResNet-56 and a PreAct-ResNet-18 teacher of random weights. Most of the
time goes to compiling ResNet-18 once (Inductor); the file is meant to finish within five minutes.
"""

from __future__ import annotations

import pytest
import torch

from tune_mtard.benchmarks import gpu_checks as checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def setup() -> checks.CheckSetup:
    return checks.CheckSetup(torch.device("cuda"))


@pytest.mark.parametrize("option", checks.SYNC_CHECK_OPTIONS)
def test_an_epoch_never_makes_the_host_wait_for_the_gpu(setup, option):
    """Inside torch.cuda.set_sync_debug_mode("error") from the loader's first batch to the last step; "fp32" has
    every option off (data on the host, pinned copies), "all" every option on, torch.compile included."""
    result = checks.check_no_host_sync(setup, option)
    assert result["sync_checked"] and result["steps_checked"] == 5


def test_bf16_losses_are_within_tolerance_of_fp32(setup):
    checks.check_bf16_close_to_fp32(setup)


def test_bf16_teachers_are_stored_in_bf16_and_nhwc_and_give_the_outputs_of_casting_every_forward(setup):
    checks.check_teachers_stored_for_the_fast_path(setup)


def test_channels_last_gives_the_nchw_trace(setup):
    checks.check_channels_last_matches_nchw(setup)


def test_data_on_the_device_gives_the_same_batches_and_trace_bit_for_bit(setup):
    result = checks.check_data_on_device_is_bit_identical(setup)
    # The two runs took different paths: uint8 images on the card (floats made per batch there) against images on
    # the host copied through pinned memory.
    assert result["images_of_each_run"] == {"host": "cpu torch.uint8", "device": "cuda torch.uint8"}


def test_evaluation_is_the_same_whether_tf32_is_allowed_or_not(setup):
    if torch.cuda.get_device_properties(setup.device).major < 8:
        pytest.skip("no TF32 on a card before Ampere (compute capability < 8): the check could not fail here")
    result = checks.check_evaluation_ignores_tf32(setup)
    assert result["tf32_changes_raw_logits"], "TF32 left the raw logits unchanged: the check compared fp32 with fp32"


def test_compile_builds_every_graph_in_the_first_epoch_and_none_after(setup):
    result = checks.check_compile_steady_state(setup)
    assert result["graphs_after_each_epoch"][0] <= 4


def test_bf16_auto_is_on_exactly_on_a_card_with_native_bf16(setup):
    checks.check_bf16_auto_matches_the_card(setup)
