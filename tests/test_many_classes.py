"""A many-class sample (issue 26): a tiny backbone with a 21,843-class classifier on generated, unlabelled data,
through the whole job — swap, calibration with distillation, one epoch, export and verification.

Prints its wall time and peak RSS (run with ``-s`` to see them); asserts the outputs and a memory bound.
Marked slow: 7 s and 2.2 GB peak RSS on a quiet 2-core machine, up to 2 minutes under load.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fyc_convert import convert

pytestmark = pytest.mark.slow

CLASSES = 21_843  # ImageNet-21k
KWARGS = {"num_classes": CLASSES, "width": 64}


def test_21843_classes_swap_calibrate_distill_one_epoch_export(tmp_path: Path, capsys: pytest.CaptureFixture):
    from models import ResNetFc

    torch.manual_seed(0)
    model = ResNetFc(**KWARGS)
    ckpt = tmp_path / "many.pt"
    torch.save(model.state_dict(), ckpt)
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.standard_normal((600, 3, 16, 16)).astype(np.float32))  # unlabelled: --distill
    out = tmp_path / "out"
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    report = convert(ckpt, arch="models:ResNetFc", arch_kwargs=json.dumps(KWARGS), data=str(data), epochs=1,
                     batch_size=128, output_dir=out, device="cpu")
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak, whole session so far
    with capsys.disabled():
        print(f"\n21,843 classes on 64 features, 600 unlabelled images, distillation, 1 epoch, export: "
              f"{seconds:.1f} s wall, peak RSS {peak_mib:.0f} MiB")
    assert report.num_classes == CLASSES and report.in_features == 64
    assert report.training["epochs"] == 1 and report.training["distill"] is True
    assert report.accuracy.agreement is not None and 0.0 <= report.accuracy.agreement <= 1.0
    assert (out / "model.onnx").is_file() and (out / "report.json").is_file()
    assert report.params.removed > 0.9 * 64 * CLASSES  # the 64 × 21,843 weight is gone
    assert report.coherence is not None and 0.0 < report.coherence < 1.0
    assert peak_mib < 4096 or peak_before >= 4096  # (an earlier test of the session may have set the peak)
