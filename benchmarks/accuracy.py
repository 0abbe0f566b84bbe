"""Accuracy of the converted sample models: original, swapped, calibrated and fine-tuned, per frame and recipe.

For each sample, frame (the C > N class vectors: today's "tile" signs or the "kerdock" frame) and recipe
(how it is fine-tuned), over several seeds: the original model's accuracy, right after the swap, after
calibrating α and the bias, after fine-tuning, the epochs used and the wall time, then mean ± sd over the
seeds. Everything goes through the library as the CLI does (load_model, load_data, capture_features,
HadamardHead.from_linear, calibrate, finetune, evaluate); nothing is exported. Runs of the frames are
interleaved seed by seed, so load changes on a shared machine hit both alike.

    python benchmarks/accuracy.py [--sample digits glyphs glyphs-large] [--frame default tile pad kerdock]
                                  [--recipe auto auto-distill defaults recipe] [--seeds 0 1 2] [--threads 1]
                                  [--device cpu] [--jsonl FILE]
    python benchmarks/accuracy.py --table FILE.jsonl ...     # the table of recorded runs

A recipe is a function Facts -> FinetuneConfig in RECIPES: "auto" is what the CLI does with no training flags
(fyc_convert.train.recipe.plan on the same Facts the pipeline builds, and fine-tuning with the original's
validation accuracy as the target of ``epochs="auto"``); "auto-distill" is that with
distillation on for every head (a candidate rule); "defaults" is the old fixed default (SGD,
3 epochs) and "recipe" the hand-picked many-class recipe, both kept for comparison. Frame "default" is what
HadamardHead.from_linear picks without ``embedding=`` (the CLI's choice). The glyph data must be rendered first
(``python -m sample_models.glyphs --out sample_models/data/glyphs.npz``; the large sample: see
sample_models/README.md). The last table printed is what the README quotes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # sample_models (the --arch modules) import from the repository root

from fyc_convert.data.datasets import check_data, load_data  # noqa: E402
from fyc_convert.head.heads import HadamardHead, adapter_width  # noqa: E402
from fyc_convert.model.loading import load_model  # noqa: E402
from fyc_convert.model.surgery import capture_features, count_params, find_classifier  # noqa: E402
from fyc_convert.train.finetune import FinetuneConfig, calibrate, evaluate, finetune  # noqa: E402
from fyc_convert.train.recipe import Facts, plan  # noqa: E402

FEATURE_SAMPLES = 2048  # classifier inputs given to from_linear: a seeded random subset of the training data


@dataclass(frozen=True)
class Sample:
    """A shipped sample model and its data."""

    checkpoint: str  # relative to the repository root
    arch: str
    data: str
    make_data: str  # the command that renders the data when it is missing


SAMPLES = {
    "digits": Sample("sample_models/digits_cnn.pt", "sample_models.archs:digits_cnn", "sample_models/digits.npz",
                     "(committed)"),
    "glyphs": Sample("sample_models/glyph_cnn.pt", "sample_models.archs:glyph_cnn",
                     "sample_models/data/glyphs.npz",
                     "python -m sample_models.glyphs --out sample_models/data/glyphs.npz"),
    "glyphs-large": Sample("sample_models/glyph_large_cnn.pt", "sample_models.archs:glyph_large_cnn",
                           "sample_models/data/glyphs_large.npz",
                           "python -m sample_models.glyphs --large --out sample_models/data/glyphs_large.npz"),
}


def auto(facts: Facts) -> FinetuneConfig:
    """The CLI with no training flags: what recipe.plan decides from `facts`, as pipeline._train does."""
    return plan(FinetuneConfig(), facts)[0]


def auto_distill(facts: Facts) -> FinetuneConfig:
    """"auto" with distillation forced on (recipe.plan distils every head that has a teacher: the same today)."""
    return dataclasses.replace(auto(facts), distill=True)


def defaults(facts: Facts) -> FinetuneConfig:
    """The old fixed defaults (before recipe.py): SGD, its default lr, 3 epochs, batch 64, no distillation."""
    return plan(FinetuneConfig(optimizer="sgd", lr=1e-2, epochs=3, batch_size=64, distill=False), facts)[0]


def recipe(facts: Facts) -> FinetuneConfig:
    """The hand-picked many-class recipe: AdamW, lr 2e-3, distillation, 8 epochs, batch 128."""
    return FinetuneConfig(optimizer="adamw", lr=2e-3, distill=True, epochs=8, batch_size=128)


RECIPES: dict[str, Callable[[Facts], FinetuneConfig]] = {"auto": auto, "auto-distill": auto_distill,
                                                          "defaults": defaults, "recipe": recipe}


@dataclass
class Run:
    """One (sample, frame, recipe, seed) conversion; accuracies are fractions."""

    sample: str
    frame: str
    recipe: str
    seed: int
    embedding: str  # what from_linear built
    outputs: int  # transform outputs computed per sample (m, or K·P for the frame): head compute
    coherence: float
    original: float
    swapped: float
    calibrated: float
    finetuned: float | None
    epochs: int
    swap_s: float  # from_linear (row assignment included)
    calibrate_s: float
    finetune_s: float
    # the fields below are absent from runs recorded before the "auto" recipe (None there)
    stop_reason: str | None = None  # finetune's: "epochs" (a fixed count), "recovered", "plateau", "max_epochs"
    optimizer: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    distill: bool | None = None
    max_epochs: int | None = None  # the budget of epochs="auto"
    load1: float | None = None  # 1-minute load average when the run started
    adapter: bool | None = None  # a learned map before the head (None: recorded before there was one)


def _swap(model: nn.Module, layer: str, linear: nn.Linear, features: torch.Tensor, *, frame: str,
          seed: int) -> HadamardHead:
    """Replace `layer` by HadamardHead.from_linear(embedding=frame); frame "default": from_linear's own choice.
    The learned map before the head where the CLI's `--adapter auto` puts one (`adapter_width`)."""
    chosen = {} if frame == "default" else {"embedding": frame}
    head = HadamardHead.from_linear(linear, features=features, seed=seed,
                                    adapter=adapter_width(linear.in_features, linear.out_features) or False,
                                    **chosen)
    head.train(linear.training)
    parent, _, attr = layer.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, head)
    return head


def run_one(name: str, frame: str, recipe_name: str, seed: int, *, device: str = "cpu") -> Run:
    """Load, swap, calibrate, fine-tune and measure one sample once (on `device`: cpu, cuda, auto)."""
    load1 = os.getloadavg()[0]
    spec = SAMPLES[name]
    data_path = ROOT / spec.data
    if not data_path.exists():
        raise SystemExit(f"{data_path} is missing; render it with: {spec.make_data}")
    loaded = load_model(ROOT / spec.checkpoint, arch=spec.arch)
    model, meta = loaded.model.eval(), loaded.meta
    bundle = load_data(data_path, seed=seed, input_shape=meta.get("input_shape"), mean=meta.get("mean"),
                       std=meta.get("std"))
    original = copy.deepcopy(model)
    layer, linear = find_classifier(model, input_shape=tuple(bundle.input_shape))
    check_data(bundle, num_classes=linear.out_features, input_shape=bundle.input_shape)
    pick = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed))[:FEATURE_SAMPLES]
    features = capture_features(model, layer, bundle.train.tensors[0][pick])
    held_out = bundle.val

    def acc(m: nn.Module) -> float:
        return float(evaluate(m, held_out, FinetuneConfig(device=device)).accuracy)

    # the facts as pipeline._train builds them (head share: the classifier's parameters / the original model's)
    facts = Facts(in_features=linear.in_features, num_classes=linear.out_features,
                  head_share=count_params(linear) / max(count_params(original), 1), labelled=bundle.labelled,
                  train_samples=len(bundle.train), has_val=bundle.val is not None)
    original_acc = acc(original)
    t0 = time.perf_counter()
    head = _swap(model, layer, linear, features, frame=frame, seed=seed)
    swap_s = time.perf_counter() - t0
    swapped = acc(model)
    cfg = dataclasses.replace(RECIPES[recipe_name](facts), seed=seed, device=device)
    teacher = original if cfg.distill else None
    cal = calibrate(model, head, bundle.plain_train, cfg, teacher=teacher)
    calibrated = acc(model)
    t1 = time.perf_counter()
    trains = cfg.epochs == "auto" or cfg.epochs > 0
    result = finetune(model, head, bundle, cfg, teacher=teacher, reference_accuracy=original_acc) if trains else None
    finetune_s = time.perf_counter() - t1
    return Run(
        sample=name, frame=frame, recipe=recipe_name, seed=seed, embedding=head.embedding,
        outputs=head.embed_size if head.embedding == "kerdock" else head.hadamard_size,
        coherence=head.coherence(), original=original_acc, swapped=swapped, calibrated=calibrated,
        finetuned=acc(model) if result is not None else None, epochs=len(result.history) if result else 0,
        swap_s=swap_s, calibrate_s=cal.seconds, finetune_s=finetune_s,
        stop_reason=result.stop_reason if result else None, optimizer=cfg.optimizer,
        lr=cfg.lr, batch_size=cfg.batch_size, distill=cfg.distill,
        max_epochs=cfg.max_epochs if cfg.epochs == "auto" else None, load1=load1,
        adapter=head.adapter is not None,
    )


def _mean_sd(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _stops(runs: list[Run]) -> str:
    """The stop reasons of `runs` with their counts ("recovered ×2, plateau"); "–" for runs recorded without."""
    reasons = [r.stop_reason for r in runs if r.stop_reason is not None]
    if not reasons:
        return "–"
    counts = {reason: reasons.count(reason) for reason in dict.fromkeys(reasons)}
    return ", ".join(reason + (f" ×{n}" if n > 1 else "") for reason, n in counts.items())


def _settings(r: Run) -> str:
    """What the recipe trained with ("adamw 0.002 b128 distill"); "–" for runs recorded without."""
    if r.optimizer is None:
        return "–"
    return f"{r.optimizer} {r.lr:g} b{r.batch_size}" + (" distill" if r.distill else "")


def _load(runs: list[Run]) -> str:
    """The range of the 1-minute load averages at the starts of `runs`; "–" for runs recorded without."""
    loads = [r.load1 for r in runs if r.load1 is not None]
    if not loads:
        return "–"
    return f"{min(loads):.1f}" if round(min(loads), 1) == round(max(loads), 1) else f"{min(loads):.1f}–{max(loads):.1f}"


def table(runs: list[Run]) -> str:
    """Markdown table: one line per (sample, frame, recipe), mean ± sd over the seeds."""
    header = ("| sample | frame | recipe | trained with | seeds | coherence | outputs | original % | swapped % | "
              "calibrated % | fine-tuned % | Δ vs original | epochs | stopped | fine-tune s | load |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    keys = list(dict.fromkeys((r.sample, r.frame, r.recipe) for r in runs))
    for key in keys:
        rs = [r for r in runs if (r.sample, r.frame, r.recipe) == key]
        drop = [(r.finetuned - r.original) if r.finetuned is not None else None for r in rs]
        lines.append(
            f"| {key[0]} | {rs[0].embedding} | {key[2]} | {_settings(rs[0])} | {len(rs)} | "
            f"{statistics.mean(r.coherence for r in rs):.3f} | "
            f"{statistics.mean(r.outputs for r in rs):.0f} | "
            f"{_mean_sd([r.original for r in rs])} | {_mean_sd([r.swapped for r in rs])} | "
            f"{_mean_sd([r.calibrated for r in rs])} | {_mean_sd([r.finetuned for r in rs])} | "
            f"{_mean_sd(drop)} | {_mean_sd([r.epochs for r in rs], 1.0, 1)} | {_stops(rs)} | "
            f"{_mean_sd([r.finetune_s for r in rs], 1.0, 1)} | {_load(rs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", nargs="+", default=["digits", "glyphs"], choices=sorted(SAMPLES))
    parser.add_argument("--frame", nargs="+", default=["tile", "kerdock"],
                        choices=["default", "tile", "pad", "kerdock"])
    parser.add_argument("--recipe", nargs="+", default=list(RECIPES), choices=sorted(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--jsonl", type=Path, help="append every run as one JSON line to this file")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSONL",
                        help="run nothing: print the table of the runs recorded in these files")
    args = parser.parse_args(argv)
    if args.table:
        names = {f.name for f in fields(Run)}  # keys of other versions of Run are left out
        print(table([Run(**{k: v for k, v in json.loads(line).items() if k in names})
                     for path in args.table for line in path.read_text().splitlines() if line.strip()]))
        return
    torch.set_num_threads(args.threads)
    runs: list[Run] = []
    for name in args.sample:
        for recipe_name in args.recipe:
            for seed in args.seeds:
                for frame in args.frame:  # interleaved: each seed runs every frame back to back
                    run = run_one(name, frame, recipe_name, seed, device=args.device)
                    runs.append(run)
                    line = json.dumps(asdict(run))
                    print(line, flush=True)
                    if args.jsonl is not None:
                        with args.jsonl.open("a") as f:
                            f.write(line + "\n")
    print()
    print(table(runs))


if __name__ == "__main__":
    main()
