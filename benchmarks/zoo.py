"""The models users bring: a deterministic sample of timm architectures and three tiny Hugging Face models, each
taken through fyc-convert with no flag beyond `--arch` (timm) or none at all (a save_pretrained folder).

Needs timm (and torchvision) beside the project's dependencies, e.g. the torch 2.14 venv:

    PYTHONPATH=. /work/venvs/torch214/bin/python benchmarks/zoo.py [--count 73] [--mode library|cli]
        [--only NAME ...] [--max-params 100e6] [--json out/zoo.json]

The sample: `timm.list_models()` sorted, cut into `--count` equal windows; from each window the first name by
size word (atto, femto, pico, nano, tiny, ..., small; then the rest in order) whose parameter count, counted on
the meta device, is at most `--max-params` (a window of larger models only takes its nearest neighbour window's
next pick). Each model is built with random weights (seed 0), its state_dict saved and then, as a user would:

- `--mode library` (default): `load_model(ckpt, arch="timm:create_model", arch_kwargs={"model_name": ...})`, the
  input shape from `fyc_convert.data.preprocess.resolve_preprocessing` when that module exists (the model's
  `pretrained_cfg` / `config`), else `surgery.guess_input_shape`; `find_classifiers`; `swap_classifier` with the
  head features of 4 random inputs. Export and verification are reported as "not run".
- `--timm-as folder`: each timm model saved in timm's hub layout (`timm.models.save_for_hf`) and loaded from
  that folder with no `--arch` at all.
- `--mode cli`: `python -m fyc_convert CKPT --arch timm:create_model --arch-kwargs '{"model_name": ...}'` (the
  folder alone for the Hugging Face models and `--timm-as folder`), once with `--dry-run` (load, input shape,
  find, swap), then for real into a temporary folder (export, verify: exit code 3 is a verification failure);
  a failure's stage is read from its one stderr line.

One thread; models are built one at a time. Output: one line per model (each stage: ok / FAIL / not run, then the
first error line) and the counts per stage; `--json` writes the same as a list of records.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

STAGES = ("load", "shape", "find", "swap", "export", "verify")
SIZE_WORDS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "micro", "xs", "mini", "small", "lite", "b0", "18",
              "050", "_s", "_t")


@dataclass
class Outcome:
    """One model's way through the stages."""

    name: str
    source: str  # "timm" or "huggingface"
    params: int = 0
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ok" | "FAIL" | "none" | "not run"
    detail: dict[str, str] = field(default_factory=dict)  # stage -> what it found / the error line
    seconds: float = 0.0

    def line(self) -> str:
        marks = " ".join(f"{s}:{self.stages.get(s, 'not run')}" for s in STAGES)
        failed = next((s for s in STAGES if self.stages.get(s) in ("FAIL", "none")), None)
        why = f"  <- {self.detail.get(failed, '')}" if failed else ""
        found = "; ".join(self.detail[s] for s in ("shape", "find", "export", "verify")
                          if self.stages.get(s) == "ok" and s in self.detail)
        return f"{self.name:<44} {self.params / 1e6:7.1f}M  {marks}  {found}{why}"


# ---------------------------------------------------------------------------------------------- the sample


def timm_sample(count: int, max_params: float) -> list[tuple[str, int]]:
    """(name, parameter count) of the deterministic sample described in the module docstring."""
    import timm

    names = sorted(timm.list_models())
    step = len(names) / count
    windows = [names[round(i * step):round((i + 1) * step)] for i in range(count)]
    params: dict[str, int | None] = {}

    def fitting(window: list[str]) -> list[str]:
        """The window's names that fit, smallest size word first (counted lazily: meta builds cost time)."""
        ranked = sorted(window, key=lambda n: (next((k for k, w in enumerate(SIZE_WORDS) if w in n),
                                                    len(SIZE_WORDS)), window.index(n)))
        for name in ranked:
            if name not in params:
                params[name] = _meta_params(name)
            if params[name] is not None and params[name] <= max_params:
                yield name

    chosen: list[str | None] = [next(fitting(w), None) for w in windows]
    for i in [i for i, c in enumerate(chosen) if c is None]:  # a window of large models only: a neighbour's next
        for j in sorted(range(count), key=lambda j: (abs(j - i), j)):
            extra = next((n for n in fitting(windows[j]) if n not in chosen), None)
            if extra is not None:
                chosen[i] = extra
                break
    return sorted((n, params[n]) for n in chosen if n is not None)


def _meta_params(name: str) -> int | None:
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - a model that cannot even be built on meta is left out of the sample
        return None
    return sum(p.numel() for p in model.parameters())


def hf_models() -> dict[str, Any]:
    """The three tiny transformers image classifiers of the tests (built from configs, random weights)."""
    import transformers

    labels = {"id2label": {i: f"class_{i}" for i in range(4)}, "label2id": {f"class_{i}": i for i in range(4)}}
    return {
        "hf-vit-tiny": transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, **labels),
        "hf-convnext-tiny": transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                        image_size=32, **labels),
        "hf-resnet-tiny": transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                    layer_type="basic", num_labels=3),
    }


# ---------------------------------------------------------------------------------------------- library mode


def run_library(out: Outcome, checkpoint: Path, arch: str | None, arch_kwargs: dict | None) -> None:
    from fyc_convert.errors import FycError, first_line
    from fyc_convert.model.loading import load_model
    from fyc_convert.model.surgery import find_classifiers, guess_input_shape, swap_classifier

    def stage(name: str, call):
        try:
            value = call()
        except FycError as e:
            # a feature extractor (timm's num_classes=0 default of some models): its clear error is the answer
            verdict = "none" if str(e).startswith("the model has no classifier") else "FAIL"
            out.stages[name], out.detail[name] = verdict, str(e)
            return None
        except Exception as e:  # noqa: BLE001 - anything else is a bug of ours: a traceback a user would see
            out.stages[name], out.detail[name] = "FAIL", f"UNEXPECTED {type(e).__name__}: {first_line(e)}"
            return None
        out.stages[name] = "ok"
        return value

    loaded = stage("load", lambda: load_model(checkpoint, arch=arch, arch_kwargs=arch_kwargs))
    if loaded is None:
        return
    model = loaded.model
    out.params = out.params or sum(p.numel() for p in model.parameters())

    def shape():
        try:
            from fyc_convert.data.preprocess import resolve_preprocessing
        except ImportError:
            resolve_preprocessing = None
        if resolve_preprocessing is not None:
            prep = resolve_preprocessing(None, meta=loaded.meta, model=model,
                                         preprocessor_config=loaded.meta.get("preprocessor_config"))
            if prep.input_shape is not None:
                return tuple(prep.input_shape), prep.sources.get("input_shape", "?")
        guess = guess_input_shape(model)
        if guess is None:
            raise FycError("no input shape: neither the model's config nor the fallback gives one")
        return guess[0], "guess_input_shape"

    found_shape = stage("shape", shape)
    if found_shape is None:
        return
    input_shape, how = found_shape
    out.detail["shape"] = f"{'x'.join(map(str, input_shape))} ({how})"
    found = stage("find", lambda: find_classifiers(model, input_shape=input_shape))
    if found is None:
        return
    out.detail["find"] = found.describe()
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    swap = stage("swap", lambda: swap_classifier(model, classifiers=found, inputs=x))
    if swap is not None:
        out.detail["swap"] = f"removed {swap.params.removed:,} params ({swap.params.removed_pct:.2f}%)"


# ---------------------------------------------------------------------------------------------- CLI mode


def run_cli(out: Outcome, checkpoint: Path, arch: str | None, arch_kwargs: dict | None, work: Path) -> None:
    """Two CLI runs: `--dry-run` (load, input shape, find, swap), then the real one (export, verification)."""
    base = [sys.executable, "-m", "fyc_convert", str(checkpoint), "--force"]
    if arch is not None:
        base += ["--arch", arch, "--arch-kwargs", json.dumps(arch_kwargs)]
    rc, error = _cli(base + ["--dry-run"])
    if rc != 0:
        failed = _stage_of(error, ("load", "shape", "find", "swap"))
        for s in STAGES[:STAGES.index(failed)]:
            out.stages[s] = "ok"
        out.stages[failed] = "none" if "has no classifier" in error else "FAIL"
        out.detail[failed] = f"exit {rc}: {error}"
        return
    for s in ("load", "shape", "find", "swap"):
        out.stages[s] = "ok"
    rc, error = _cli(base + ["-o", str(work / "out"), "--report", str(work / "report.json")])
    report = json.loads((work / "report.json").read_text()) if (work / "report.json").is_file() else {}
    out.detail["find"] = str(report.get("layer", ""))
    o = report.get("onnx") or {}
    if o.get("exporter"):
        failures = "; ".join(o.get("exporter_failures") or [])
        out.detail["export"] = f"{o['exporter']}" + (f" (after {failures})" if failures else "")
    if o.get("max_abs_diff") is not None:
        out.detail["verify"] = (f"|d| {o['max_abs_diff']:.2g}, floor {o.get('floor_max_abs_diff') or 0:.2g}"
                                + (f", blame {o['blame']}" if o.get("blame") else ""))
    if rc == 0:
        out.stages["export"] = out.stages["verify"] = "ok"
        return
    failed = "verify" if rc == 3 else _stage_of(error, ("shape", "export"))
    if failed == "verify":
        out.stages["export"] = "ok"
    out.stages[failed], out.detail[failed] = "FAIL", f"exit {rc}: {error}" + (
        f" ({out.detail[failed]})" if failed in out.detail else "")


def _cli(cmd: list[str]) -> tuple[int, str]:
    """(exit code, the last stderr line) of one CLI run, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    return proc.returncode, (lines[-1] if lines else "")


def _stage_of(error: str, stages: tuple[str, ...]) -> str:
    """Which stage a CLI error line belongs to, by what it talks about (the CLI prints no error types)."""
    # "torch.onnx.export failed (...); check that the model runs on the input shape" is an export failure
    words = {"shape": ("without the input shape", "no input shape", "--input-shape"),
             "find": ("classifier", "--layer", "nn.Linear"),
             "swap": ("head", "transform size"), "export": ("export", "onnx", "opset")}
    for stage in stages:
        if any(w in error for w in words.get(stage, ())):
            return stage
    return stages[0] if stages[0] != "shape" else stages[-1]


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=73, help="timm models in the sample")
    parser.add_argument("--max-params", type=float, default=100e6, help="skip larger siblings in a window")
    parser.add_argument("--mode", choices=("library", "cli"), default="library")
    parser.add_argument("--only", nargs="*", help="run just these timm names (and hf-* names)")
    parser.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face models")
    parser.add_argument("--timm-as", choices=("state_dict", "folder"), default="state_dict",
                        help="save each timm model as a state_dict (loaded with --arch) or as a timm hub folder "
                             "(timm's save_for_hf; loaded with no --arch)")
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}; load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    if args.only:
        sample = [(n, _meta_params(n) or 0) for n in args.only if not n.startswith("hf-")]
    else:
        sample = timm_sample(args.count, args.max_params)
    print(f"sample: {len(sample)} timm models ({time.perf_counter() - t0:.0f} s to choose)", flush=True)
    hf = {} if args.no_hf else hf_models()
    if args.only:
        hf = {k: v for k, v in hf.items() if k in args.only}

    outcomes: list[Outcome] = []
    as_folder = args.timm_as == "folder"
    for name, params in sample:
        outcomes.append(_one(args.mode, Outcome(name, "timm", params),
                             lambda folder, n=name: _timm_checkpoint(n, folder, as_folder=as_folder),
                             arch=None if as_folder else "timm:create_model",
                             arch_kwargs=None if as_folder else {"model_name": name}))
    for name, config in hf.items():
        outcomes.append(_one(args.mode, Outcome(name, "huggingface"), lambda folder, c=config: _hf_folder(c, folder)))

    print()
    for s in STAGES:
        ran = [o for o in outcomes if o.stages.get(s) in ("ok", "FAIL", "none")]
        ok = sum(o.stages[s] == "ok" for o in ran)
        none = sum(o.stages[s] == "none" for o in ran)
        extra = f", {none} without a classifier (the clear error is the answer)" if none else ""
        print(f"{s:<7} {ok:3d} / {len(ran):3d} ok{extra}" + ("" if ran else "  (not run)"))
    used: dict[str, int] = {}
    for o in outcomes:
        if o.stages.get("export") == "ok" and o.detail.get("export"):
            key = o.detail["export"].split(" ")[0]
            used[key] = used.get(key, 0) + 1
    if used:
        blamed = sum("blame backbone" in o.detail.get("verify", "") for o in outcomes)
        print(f"exporter used: {', '.join(f'{k} {v}' for k, v in sorted(used.items()))}; accepted with the backbone "
              f"blamed (original.onnx beyond tolerance, each head alone within it): {blamed}")
    done = sum(o.stages.get("swap") == "ok" for o in outcomes)
    none = sum("none" in o.stages.values() for o in outcomes)
    print(f"through the swap: {done} / {len(outcomes)} ({done} / {len(outcomes) - none} of the models with a "
          f"classifier); {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1) + "\n")


def _one(mode: str, out: Outcome, make, *, arch: str | None = None, arch_kwargs: dict | None = None) -> Outcome:
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fyc-zoo-") as tmp:
        work = Path(tmp)
        try:
            checkpoint = make(work)
        except Exception as e:  # noqa: BLE001 - the zoo's own constructor failed: not ours to judge
            out.stages["load"], out.detail["load"] = "FAIL", f"building the test model failed: {type(e).__name__}: {e}"
            checkpoint = None
        if checkpoint is not None:
            if mode == "library":
                run_library(out, checkpoint, arch, arch_kwargs)
            else:
                run_cli(out, checkpoint, arch, arch_kwargs, work)
    gc.collect()
    out.seconds = time.perf_counter() - t
    print(f"{out.line()}  [{out.seconds:.1f} s]", flush=True)
    return out


def _timm_checkpoint(name: str, folder: Path, *, as_folder: bool) -> Path:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    if as_folder:  # config.json (architecture, num_classes, pretrained_cfg, model_args) + model.safetensors
        from timm.models import save_for_hf

        try:
            save_for_hf(model, folder / name, safe_serialization=True)
        except RuntimeError:  # safetensors refuses tensors shared between modules: timm then writes a .bin
            save_for_hf(model, folder / name, safe_serialization=False)
        return folder / name
    path = folder / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path


def _hf_folder(config: Any, folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(config)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(folder / "model")
    return folder / "model"


if __name__ == "__main__":
    main()
