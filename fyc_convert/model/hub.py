"""Checkpoint folders as the model zoos save them: Hugging Face `save_pretrained` and timm's hub layout.

- Hugging Face: `config.json` with `model_type` (and usually `architectures`) beside `model.safetensors` /
  `pytorch_model.bin` (or a sharded `*.index.json`). transformers builds and loads it with its own
  `from_pretrained`: its files keep legacy key names that only transformers maps onto the modules. Local files
  only, `weights_only=True`, and never code from the folder unless `trust_remote_code=True`.
- timm: `config.json` with `architecture` (+ `num_classes`, `pretrained_cfg`, optional `model_args`) beside
  `model.safetensors` / `pytorch_model.bin`: `timm.create_model(architecture, pretrained=False, ...)`, then the
  weights are read by loading.py's safe readers and checked key by key (`loading.load_folder`).

This module knows the layouts and the libraries; `fyc_convert.model.loading` reads the weights and owns the
entry point, so imports point one way (loading -> hub). Neither library is imported unless such a folder is
loaded. What the folder says about preprocessing and classes goes into `LoadedModel.meta`: "preprocessor_config"
(the Hugging Face image processor's dict, read by `fyc_convert.data.preprocess`), "classes" (class names in
class-index order, when the folder names them). timm's `pretrained_cfg` is set on the model by `create_model`
itself (`model.pretrained_cfg`), where the resolver reads it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fyc_convert.errors import CheckpointError, describe, few, first_line

CONFIG = "config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# weight files in the order both ecosystems prefer them (safetensors first)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def folder_kind(path: Path) -> str | None:
    """"huggingface" | "timm" for a folder whose config.json says so; None when it has no config.json.

    Raises:
        CheckpointError: config.json is unreadable, or names neither layout.
    """
    config = read_config(path)
    if config is None:
        return None
    if isinstance(config.get("architecture"), str):
        return "timm"
    if isinstance(config.get("model_type"), str) or isinstance(config.get("architectures"), list):
        return "huggingface"
    raise CheckpointError(f"{path / CONFIG} names neither a Hugging Face model ('model_type') nor a timm "
                          "architecture ('architecture'); pass a checkpoint file with --arch instead")


def read_config(path: Path) -> dict[str, Any] | None:
    """The folder's config.json as a dict, None when there is none."""
    return _read_json(path / CONFIG) if (path / CONFIG).is_file() else None


def weight_files(path: Path) -> list[Path]:
    """The weight files of a zoo folder (the shards of an index, else the first of WEIGHT_FILES present).

    Raises:
        CheckpointError: no weight file, or an index that is unreadable or names files outside the folder.
    """
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        weight_map = _read_json(file).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise CheckpointError(f"{file} has no 'weight_map'; save the model again")
        shards = sorted(set(map(str, weight_map.values())))
        bad = [s for s in shards if Path(s).name != s or not (path / s).is_file()]
        if bad:
            raise CheckpointError(f"{file} names shards that are not files in {path}: {', '.join(bad[:4])}; copy "
                                  "the whole folder")
        return [path / s for s in shards]
    raise CheckpointError(f"{path} has a {CONFIG} but no weights ({', '.join(WEIGHT_FILES)}); copy the whole folder")


def build_huggingface(path: Path, config: dict[str, Any], *, trust_remote_code: bool,
                      notes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Build and load a `save_pretrained` folder with transformers. Returns (model in eval mode, meta)."""
    name = _architecture_name(config)
    if importlib.util.find_spec("transformers") is None:
        raise CheckpointError(f"{path} is a Hugging Face save_pretrained folder ({name}); building it needs "
                              "transformers: pip install transformers")
    try:
        import transformers
    except Exception as e:  # noqa: BLE001 - a broken install can raise anything
        raise CheckpointError(f"transformers does not import ({describe(e)}); reinstall it: pip install -U "
                              "transformers") from e
    cls = _transformers_class(transformers, path, config, name, trust_remote_code=trust_remote_code)
    try:
        with _quiet(transformers):
            model, info = cls.from_pretrained(str(path), local_files_only=True, weights_only=True,
                                              trust_remote_code=trust_remote_code, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - transformers and the model's code can raise anything
        raise CheckpointError(f"transformers could not build {name} from {path} ({describe(e)}); check the folder "
                              "is complete, or upgrade transformers") from e
    labels = {"missing_keys": "missing keys", "unexpected_keys": "unexpected keys",
              "mismatched_keys": "shape mismatch", "error_msgs": "errors"}
    problems = [f"{label} ({len(keys)}): {few(sorted(map(str, keys)))}" for key, label in labels.items()
                if (keys := info.get(key))]
    if problems:
        raise CheckpointError(f"the weights in {path} do not fit its {name} ({'; '.join(problems)}); save the model "
                              "again with save_pretrained")
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        notes.append(f"the weights are stored as {next(model.parameters()).dtype}; converted to float32")
        model = model.float()
    meta: dict[str, Any] = {}
    if (path / PREPROCESSOR_CONFIG).is_file():
        meta["preprocessor_config"] = _read_json(path / PREPROCESSOR_CONFIG)
    classes = _hf_classes(getattr(model.config, "id2label", None))
    if classes is not None:
        meta["classes"] = classes
    notes.append(f"built {type(model).__name__} with transformers {transformers.__version__} from {path.name}/")
    return model.eval(), meta


def build_timm(path: Path, config: dict[str, Any], *, notes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Build a timm hub folder's architecture with timm (random init; the caller loads the weights)."""
    arch = config["architecture"]
    if importlib.util.find_spec("timm") is None:
        raise CheckpointError(f"{path} is a timm hub folder (architecture {arch!r}); building it needs timm: "
                              "pip install timm")
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - a broken install (e.g. torchvision missing) can raise anything
        raise CheckpointError(f"timm does not import ({describe(e)}); reinstall it: pip install -U timm") from e
    pretrained_cfg, kwargs = timm_arguments(config)
    try:
        model = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm and the model's constructor can raise anything
        version = getattr(timm, "__version__", "?")
        raise CheckpointError(f"timm {version} could not build {arch!r} from {path / CONFIG} ({describe(e)}); "
                              "upgrade timm, or check the config's model_args") from e
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"timm.create_model({arch!r}) returned a {type(model).__name__}, not an nn.Module")
    meta: dict[str, Any] = {}
    classes = _timm_classes(config, pretrained_cfg, kwargs.get("num_classes"))
    if classes is not None:
        meta["classes"] = classes
    shown = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    notes.append(f"built timm.create_model({arch!r}{shown}) from {path.name}/{CONFIG}")
    return model, meta


def timm_arguments(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pretrained_cfg, create_model keyword arguments) of a timm config.json, parsed as timm's hub loader does.

    A legacy config is one flat dict (no `pretrained_cfg` key): everything but `architecture` and
    `num_features` is the pretrained_cfg. `num_classes` at the top overrides the pretrained_cfg's; `model_args`
    are passed to the architecture.
    """
    config = dict(config)
    if isinstance(config.get("pretrained_cfg"), Mapping):
        pretrained_cfg = dict(config["pretrained_cfg"])
    else:
        pretrained_cfg = {k: v for k, v in config.items() if k not in ("architecture", "num_features")}
        if "labels" in pretrained_cfg:
            pretrained_cfg["label_names"] = pretrained_cfg.pop("labels")
    kwargs = dict(config.get("model_args") or {})
    num_classes = config.get("num_classes", pretrained_cfg.get("num_classes"))
    if isinstance(num_classes, int):
        pretrained_cfg["num_classes"] = num_classes
        kwargs.setdefault("num_classes", num_classes)
    for key in ("label_names", "label_descriptions"):
        if key in config:
            pretrained_cfg[key] = config[key]
    return pretrained_cfg, kwargs


# ---------------------------------------------------------------------------------------------- helpers


def _architecture_name(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return f"model_type {config.get('model_type')!r}"


def _transformers_class(transformers: Any, path: Path, config: Mapping[str, Any], name: str, *,
                        trust_remote_code: bool) -> Any:
    """The class whose from_pretrained builds the folder: its named architecture when transformers has it, else
    the image-classification Auto class (which follows `auto_map` into the folder's code only when trusted)."""
    archs = config.get("architectures")
    cls = getattr(transformers, archs[0], None) if isinstance(archs, list) and archs else None
    if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
        return cls
    model_type = config.get("model_type")
    known = model_type in getattr(transformers, "CONFIG_MAPPING", {})
    if config.get("auto_map") and not trust_remote_code:
        raise CheckpointError(f"{path} defines its model ({name}) in code inside the folder (config.json "
                              "'auto_map'); pass --trust-remote-code only if you trust that code (it runs it)")
    if not known and not config.get("auto_map"):
        raise CheckpointError(f"transformers {transformers.__version__} does not know {name} in {path}; upgrade "
                              "transformers (pip install -U transformers)")
    return transformers.AutoModelForImageClassification


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' warnings, load report and progress bars off for the duration (library code never prints)."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _hf_classes(id2label: Any) -> list[str] | None:
    """Class names by index from `config.id2label`; None for transformers' placeholders LABEL_0, LABEL_1, …"""
    if not isinstance(id2label, Mapping) or not id2label:
        return None
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    if sorted(by_index) != list(range(len(by_index))):
        return None
    names = [by_index[i] for i in range(len(by_index))]
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def _timm_classes(config: Mapping[str, Any], pretrained_cfg: Mapping[str, Any], num_classes: Any) -> list[str] | None:
    names = config.get("label_names", pretrained_cfg.get("label_names"))
    if isinstance(names, Mapping):
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            return None
    if not isinstance(names, list) or (isinstance(num_classes, int) and len(names) != num_classes):
        return None
    return [str(n) for n in names]


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not readable JSON ({first_line(e)}); fix or re-save it") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a JSON {type(value).__name__}, not an object; fix or re-save it")
    return value
