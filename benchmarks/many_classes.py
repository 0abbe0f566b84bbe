"""Many classes: wall time and peak memory of everything but training and export, for large heads.

A tiny backbone (Linear(64 → N) + ReLU) with a trained-looking (C, N) classifier (random weights, class
structure in the data) goes through the library's own steps, each timed: the swap (`swap_classifier`, the
rows chosen from the features of 2,048 inputs, or from the weights alone with no data), the report's
coherence (`head.coherence()`), and calibration (`calibrate`, distillation from the original on unlabelled
generated data when `--samples` > 0). Each case runs in a fresh process; its peak RSS is the process's
ru_maxrss (the tiny model and the data are a few MB of it).

    python benchmarks/many_classes.py                       # the cases of issue 26
    python benchmarks/many_classes.py --case 2048 18000 0   # N, C, samples (0: no data)

Target (issue 26): each case under 60 s wall on the 2-core machine, peak RSS under 4 GB.

    python benchmarks/many_classes.py --glyph sample_models/data/glyphs_large.npz

runs the large glyph sample (4,191 classes) through `convert(epochs=0)` twice, each in a fresh process:
calibration within the S·C budget (`finetune.CALIBRATION_FLOATS`) and with the budget lifted (S up to
20,000 as before), and prints the calibrated accuracy, the calibration samples, wall time and peak RSS of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IN_DIM = 64
CASES = [(2048, 18_000, 0), (1280, 21_843, 3_000), (4096, 32_768, 0), (4096, 32_768, 3_000)]


def run_case(n: int, c: int, samples: int) -> dict:
    """One case in this process: seconds per step and the peak RSS (MB)."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from fyc_convert.data.loader import subset_loader
    from fyc_convert.model.surgery import swap_classifier
    from fyc_convert.options import FinetuneConfig
    from fyc_convert.train.finetune import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_DIM, n), nn.ReLU(), nn.Linear(n, c)).eval()
    teacher = copy.deepcopy(model)  # the original, for distillation
    times: dict[str, float] = {}
    data = None
    if samples:
        x = torch.randn(samples, IN_DIM)
        data = TensorDataset(x, torch.full((samples,), -1, dtype=torch.int64))  # unlabelled: distillation
    t = time.perf_counter()
    inputs = subset_loader(data, 2048, seed=0, workers=0) if data is not None else None
    swap = swap_classifier(model, classifiers=None, layer="2", inputs=inputs)
    times["swap"] = time.perf_counter() - t
    t = time.perf_counter()
    coh = swap.head.coherence()
    times["coherence"] = time.perf_counter() - t
    if data is not None:
        t = time.perf_counter()
        cal = calibrate(model, swap.head, data, FinetuneConfig(device="cpu", distill=True), teacher=teacher, workers=0)
        times["calibration samples"] = cal.samples
        times["calibrate"] = time.perf_counter() - t
    samples_used = times.pop("calibration samples", None)
    times["total"] = sum(times.values())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"N": n, "C": c, "samples": samples, "embedding": swap.head.embedding, "coherence": coh,
            "seconds": times, "peak_rss_mb": peak_mb, "calibration_samples": samples_used}


def run_glyph(data: str, budget: bool) -> dict:
    """convert(epochs=0) of the large glyph sample in this process; budget=False lifts calibration's S·C cap."""
    import tempfile

    import fyc_convert.train.finetune as ft
    from fyc_convert import convert

    if not budget:
        ft.CALIBRATION_FLOATS = 1 << 40
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        report = convert(REPO / "sample_models" / "glyph_large_cnn.pt", arch="sample_models.archs:glyph_large_cnn",
                         data=data, epochs=0, output_dir=Path(out) / "o", device="cpu")
    return {"budget": budget, "calibrated": report.accuracy.calibrated, "original": report.accuracy.original,
            "samples": ft.calibration_samples(report.num_classes), "seconds": time.perf_counter() - t,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def glyph(data: str) -> None:
    for budget in (True, False):
        out = subprocess.run([sys.executable, __file__, "--glyph-one", data, str(int(budget))], capture_output=True,
                             text=True, cwd=REPO)
        if out.returncode:
            print(f"budget={budget}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        samples = r["samples"] if budget else "up to 20,000"
        print(f"large glyph, epochs 0, calibration {'within' if budget else 'without'} the S·C budget "
              f"(samples {samples}): calibrated {100 * r['calibrated']:.2f}% (original {100 * r['original']:.2f}%), "
              f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs=3, type=int, action="append", metavar=("N", "C", "SAMPLES"))
    ap.add_argument("--glyph", metavar="NPZ", help="the large glyph sample's data: calibration with/without budget")
    ap.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)  # internal: run one case here
    ap.add_argument("--glyph-one", nargs=2, help=argparse.SUPPRESS)  # internal: one glyph run here
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_case(*args.one)))
        return
    if args.glyph_one:
        print(json.dumps(run_glyph(args.glyph_one[0], bool(int(args.glyph_one[1])))))
        return
    if args.glyph:
        glyph(args.glyph)
        return
    for case in args.case or CASES:
        out = subprocess.run([sys.executable, __file__, "--one", *map(str, case)], capture_output=True, text=True,
                             cwd=REPO)
        if out.returncode:
            print(f"N={case[0]} C={case[1]} samples={case[2]}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())
        print(f"N={r['N']} C={r['C']} samples={r['samples']} ({r['embedding']}): {steps}; "
              f"peak RSS {r['peak_rss_mb']:.0f} MB; coherence {r['coherence']:.4f}; calibration samples "
              f"{r.get('calibration_samples')}", flush=True)


if __name__ == "__main__":
    main()
