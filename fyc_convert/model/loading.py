"""Load whatever a user's training code saved into an eager nn.Module, safely.

Formats (sniffed from the file's bytes, not its name, except `.safetensors`):
- `torch.save` of a state_dict or of a training checkpoint dict (weights under `state_dict`, `model`,
  `state_dict_ema` or `model_ema`), read with `weights_only=True`; needs `--arch` to build the model.
- `.safetensors` weights; needs `--arch`.
- a whole pickled nn.Module (`torch.save(model)`): unpickling runs code from the file, so only with
  `trust_pickle=True`; without it we list the globals the file wants and execute nothing.
- TorchScript (`torch.jit.save`) and `torch.export` (`.pt2`) archives: their compiled code calls the classifier
  directly, so it cannot be swapped there; with `--arch` their weights are loaded into the eager model.
- a checkpoint folder as the model zoos save them (Hugging Face `save_pretrained`, timm's hub layout): built
  by that library from the folder's config.json, no `--arch` needed (see `fyc_convert.model.hub`).

State-dict keys lose the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes when that makes them fit.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import difflib
import importlib
import importlib.util
import io
import json
import os
import pickle
import pickletools
import pkgutil
import re
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

from fyc_convert.errors import ArchError, CheckpointError, describe, few, first_line
from fyc_convert.model.hub import (
    CONFIG,
    build_huggingface,
    build_timm,
    folder_kind,
    read_config,
    weight_files,
)
from fyc_convert.options import parse_arch_kwargs

STATE_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")  # where training checkpoints keep weights
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors", ".pt2")
_ARCH_HELP = "pass --arch MODULE:CALLABLE that builds the model (e.g. mypkg.models:resnet18 or path/to/file.py:build)"


@dataclass
class LoadedModel:
    """A model ready for surgery.

    Attributes:
        model: The eager model, in eval mode, on the CPU.
        format: "state_dict" | "checkpoint" | "safetensors" | "pickle" | "torchscript" | "export" |
            "huggingface" | "timm" (a zoo folder).
        meta: Non-code metadata the file carries (a checkpoint's "meta" dict, safetensors metadata), {} if none.
            Zoo folders: "preprocessor_config" (a Hugging Face image processor's dict) and "classes" (class
            names by index) when the folder has them.
        notes: What was done on the way that a user may want to know (prefixes stripped, keys chosen).
    """

    model: nn.Module
    format: str
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: str | dict | None = None,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a checkpoint in any supported format into an eager model in eval mode.

    Args:
        path: The checkpoint file, or a Hugging Face / timm checkpoint folder.
        arch: "pkg.mod:callable" or "path/to/file.py:callable" building the model (for weights-only files; for a
            folder, it builds the model instead of the folder's config and gets the folder's weights).
        arch_kwargs: Keyword arguments for `arch`, as a JSON object string or a dict.
        trust_pickle: Allow unpickling arbitrary objects (a whole pickled nn.Module). This runs code from the file.
        trust_remote_code: Let transformers run model code that a Hugging Face folder carries (`auto_map`).

    Returns:
        The loaded model with its format, metadata and notes.

    Raises:
        CheckpointError: The file is missing, unreadable, unsafe without `trust_pickle`, or does not fit `arch`.
        ArchError: `arch` / `arch_kwargs` do not resolve to a callable that builds an nn.Module.
    """
    path = Path(path)
    kwargs = parse_arch_kwargs(arch_kwargs)
    if path.is_dir():
        return load_folder(path, arch=arch, arch_kwargs=kwargs, trust_remote_code=trust_remote_code)
    notes: list[str] = []
    state, fmt, meta = _read_checkpoint(path, arch=arch, trust_pickle=trust_pickle, notes=notes)
    if isinstance(state, nn.Module):
        if arch is not None:
            notes.append(f"--arch {arch} not used: the file holds a whole pickled model")
        return LoadedModel(state.cpu().eval(), "pickle", meta, notes)
    if arch is None:
        hint = ""
        if isinstance(meta.get("arch"), str):  # only named in the message: we never import what a file asks for
            kwargs_hint = f" --arch-kwargs '{json.dumps(meta['arch_kwargs'])}'" if meta.get("arch_kwargs") else ""
            hint = f" (its metadata names --arch {meta['arch']}{kwargs_hint})"
        raise CheckpointError(f"{path} holds only weights ({fmt}); {_ARCH_HELP}{hint}")
    model = build_model(arch, kwargs)
    load_state(model, state, path=path, built_by=f"--arch {arch}", notes=notes)
    return LoadedModel(model.eval(), fmt, meta, notes)


def load_folder(path: Path, *, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None,
                trust_remote_code: bool = False) -> LoadedModel:
    """Load a Hugging Face or timm checkpoint folder (see `fyc_convert.model.hub`); `arch` overrides its config.

    Raises:
        CheckpointError: the folder is neither layout, lacks its weights, needs a library that is not installed
            or remote code that is not trusted, or its weights do not fit the model.
    """
    notes: list[str] = []
    kind = folder_kind(path)
    if kind is None:
        inside = checkpoint_files(path)
        hint = f"pass one of the files in it: {few(inside)}" if inside else "pass the checkpoint file itself"
        raise CheckpointError(f"checkpoint {path} is a directory without {CONFIG} (neither a Hugging Face "
                              f"save_pretrained nor a timm hub folder); {hint}")
    config = read_config(path) or {}
    if arch is not None:  # the user's own architecture, the folder's weights
        files = weight_files(path)
        model = build_model(arch, arch_kwargs or {})
        load_state(model, read_state(files), path=path, built_by=f"--arch {arch}", notes=notes)
        notes.append(f"built with --arch {arch}; {path.name}/{CONFIG} not used to build the model")
        return LoadedModel(model.eval(), kind, {}, notes)
    if arch_kwargs:
        notes.append(f"--arch-kwargs not used: {path.name}/{CONFIG} says how to build the model")
    if kind == "huggingface":
        model, meta = build_huggingface(path, config, trust_remote_code=trust_remote_code, notes=notes)
        return LoadedModel(model, kind, meta, notes)
    files = weight_files(path)
    model, meta = build_timm(path, config, notes=notes)
    load_state(model, read_state(files), path=path, built_by=f"timm.create_model({config['architecture']!r})",
               notes=notes, hint=f"check {path.name}/{CONFIG} (architecture, num_classes, model_args) belongs to "
               "these weights")
    return LoadedModel(model.eval(), kind, meta, notes)


def _read_checkpoint(path: Path, *, arch: str | None, trust_pickle: bool,
                     notes: list[str]) -> tuple[Mapping[str, Tensor] | nn.Module, str, dict[str, Any]]:
    """The weights (or a whole pickled module) in one checkpoint file. Returns (state or module, format, meta)."""
    kind = _sniff(path)
    if kind == "safetensors":
        state, meta = _read_safetensors(path)
        return state, "safetensors", meta
    if kind == "torchscript":
        return _read_torchscript(path, arch=arch), "torchscript", {}
    if kind == "export":
        return _read_export(path, arch=arch, trust_pickle=trust_pickle), "export", {}
    obj = _torch_load(path, trust_pickle=trust_pickle)
    meta = dict(obj["meta"]) if isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping) else {}
    state, fmt = _unpack(obj, path, notes)
    if isinstance(state, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        notes.append(f"unwrapped the pickled {type(state).__name__}")
        state = state.module
    return state, fmt, meta


def _read_torchscript(path: Path, *, arch: str | None) -> dict[str, Tensor]:
    if arch is None:
        raise CheckpointError(
            f"{path} is a TorchScript archive, whose compiled code calls the classifier directly so it cannot "
            f"be swapped; {_ARCH_HELP} to rebuild it from the archive's weights, or give the eager model's "
            "state_dict"
        )
    try:
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError as e:
        raise CheckpointError(f"{path} is a corrupt TorchScript archive ({first_line(e)}); re-save it") from e


def _read_export(path: Path, *, arch: str | None, trust_pickle: bool) -> dict[str, Tensor]:
    if arch is None:
        raise CheckpointError(
            f"{path} is a torch.export archive, a traced graph whose classifier cannot be swapped; "
            f"{_ARCH_HELP} to rebuild it from the archive's weights, or give the eager model's state_dict"
        )
    if not trust_pickle:
        raise CheckpointError(
            f"{path} is a torch.export archive and reading it unpickles data (runs code from the file); "
            "pass --trust-pickle if you trust it, or save the eager model's state_dict and pass that with --arch"
        )
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - anything can fail inside an unpickler we were told to trust
        raise CheckpointError(f"cannot read torch.export archive {path} ({describe(e)}); re-save it") from e
    return dict(program.state_dict)  # parameters and persistent buffers, as in the eager model


def resolve_arch(spec: str) -> Callable[..., Any]:
    """Resolve "pkg.mod:callable" or "path/to/file.py:callable" (dots after ":" walk attributes).

    Modules are imported with the current directory on sys.path, as when the user runs python next to their code.

    Raises:
        ArchError: The module does not import, the attribute is missing, or it is not callable.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ArchError(f"--arch {spec!r} is not MODULE:CALLABLE; write it like mypkg.models:resnet18 or "
                        "path/to/file.py:build")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        module = _import_file(Path(module_name), spec)
    else:
        module = _import_module(module_name, spec)
    try:
        obj = pkgutil.resolve_name(f"{module.__name__}:{attr}")  # the module is imported: this walks `attr`
    except AttributeError:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        close = difflib.get_close_matches(attr, defined, n=3, cutoff=0.3)
        names = close + [n for n in defined if n not in close]  # the likeliest first
        raise ArchError(f"--arch {spec!r}: {module_name} has no attribute {attr!r}; callables defined in it: "
                        f"{few(names) or 'none'}") from None
    if not callable(obj):
        raise ArchError(f"--arch {spec!r} is a {type(obj).__name__}, not a callable; point it at a function or "
                        "class that builds the model")
    return obj


def clean_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a leading `module.` (DDP) and every `_orig_mod.` segment (torch.compile) from each key."""
    return {_clean_key(k): v for k, v in state.items()}


def _clean_key(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return re.sub(r"(^|\.)_orig_mod\.", r"\1", key)


# ---------------------------------------------------------------------------------------------- sniffing


def _sniff(path: Path) -> str:
    """"safetensors" | "torchscript" | "export" | "torch" (a torch.save zip or a legacy pickle)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the save was probably interrupted, re-save it")
    if path.suffix == ".safetensors":
        return "safetensors"
    with path.open("rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"checkpoint {path} is a truncated or corrupt archive ({first_line(e)}); "
                                  "copy or save it again") from e
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/archive_format") for n in names):
            return "export"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint; pass a file written by "
                              "torch.save, safetensors, torch.jit.save or torch.export.save")
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:  # pickle PROTO opcode: legacy torch.save or plain pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    raise CheckpointError(f"{path} is not a checkpoint (unrecognised content, first bytes {head[:4].hex(' ')}); "
                          "pass a file written by torch.save, safetensors, torch.jit.save or torch.export.save")


# ---------------------------------------------------------------------------------------------- readers


def checkpoint_files(folder: Path) -> list[str]:
    """Names of the files in `folder` that look like checkpoints (by suffix), sorted."""
    return sorted(p.name for p in folder.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)


def read_weights(path: Path) -> dict[str, Tensor]:
    """The state_dict in a weights-only file (safetensors, or torch.save read with weights_only=True).

    Raises:
        CheckpointError: The file is unreadable, needs code to load, or holds no plain state_dict.
    """
    if _sniff(path) == "safetensors":
        return _read_safetensors(path)[0]
    obj = _torch_load(path, trust_pickle=False)
    if not _is_state_dict(obj):
        raise CheckpointError(f"{path} does not hold a plain state_dict ({type(obj).__name__}); save "
                              "model.state_dict() there")
    return dict(obj)


def read_state(files: list[Path]) -> dict[str, Tensor]:
    """The state_dict stored in one or several (sharded) weight files, read without executing code."""
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(read_weights(file))
    return state


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({first_line(e)}); its header is "
                              "corrupt or the file is truncated: copy or save it again") from e
    meta = {k: _maybe_json(v) for k, v in raw_meta.items() if k != "format"}
    return state, meta


def _torch_load(path: Path, *, trust_pickle: bool) -> Any:
    if not trust_pickle:
        try:
            with warnings.catch_warnings():  # our error below says it better
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            wanted = _unsafe_globals(path)
            if wanted:
                raise CheckpointError(
                    f"{path} needs code to load (it wants {few(wanted)}), e.g. a whole pickled model; pass "
                    "--trust-pickle only if you trust the file (unpickling runs its code), or save "
                    "model.state_dict() and pass it with --arch MODULE:CALLABLE"
                ) from e
            raise CheckpointError(f"{path} is not a torch.save checkpoint that can be read safely "
                                  f"({_unpickling_reason(e)}); save model.state_dict() with torch.save and pass "
                                  "it with --arch MODULE:CALLABLE") from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first_line(e) or 'unexpected end'}"
                                  "); copy or save it again") from e
    try:
        with _on_sys_path(Path.cwd()):  # pickled classes import like the user's own code would
            return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise CheckpointError(f"the pickled model in {path} needs module {e.name!r}, which does not import; run "
                              "from the directory that holds the model's code, or save model.state_dict() and "
                              "pass it with --arch") from e
    except Exception as e:  # noqa: BLE001 - unpickling trusted code can raise anything
        raise CheckpointError(f"cannot unpickle {path} ({describe(e)}); check the file is complete, or save "
                              "model.state_dict() and pass it with --arch") from e


def _unpack(obj: Any, path: Path, notes: list[str]) -> tuple[Mapping[str, Tensor] | nn.Module, str]:
    """Find the weights in what torch.load returned. Returns (state_dict or module, format)."""
    if isinstance(obj, nn.Module):
        return obj, "pickle"
    if _is_state_dict(obj):
        return obj, "state_dict"
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            value = obj.get(key)
            if isinstance(value, nn.Module) or _is_state_dict(value):
                unused = [k for k in STATE_KEYS if k != key and k in obj]
                notes.append(f"weights taken from checkpoint[{key!r}]"
                             + (f"; also present, not used: {', '.join(unused)}" if unused else ""))
                return value, "checkpoint"
        keys = [str(k) for k in obj]
        raise CheckpointError(f"{path} holds a dict without weights (keys: {few(keys) or 'none'}); expected a "
                              f"state_dict or a checkpoint with one of the keys {', '.join(STATE_KEYS)}")
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a model or weights; save model.state_dict() "
                          "with torch.save and pass it with --arch")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) or k.endswith("_extra_state") for k, v in obj.items())
    )


# ---------------------------------------------------------------------------------------------- building


def build_model(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """Call the `--arch` builder with `kwargs` (the current directory on sys.path); it must return an nn.Module."""
    builder = resolve_arch(arch)
    try:
        with _on_sys_path(Path.cwd()):
            model = builder(**kwargs)
    except Exception as e:  # noqa: BLE001 - user code can raise anything
        called = json.dumps(kwargs, default=repr)
        raise ArchError(f"--arch {arch} failed when called with {called} ({describe(e)}); check --arch-kwargs") from e
    if not isinstance(model, nn.Module):
        raise ArchError(f"--arch {arch} returned a {type(model).__name__}, not an nn.Module; point it at a "
                        "function or class that builds the model")
    return model


def load_state(model: nn.Module, state: Mapping[str, Tensor], *, path: Path, built_by: str,
               notes: list[str], hint: str = "check --arch and --arch-kwargs (e.g. num_classes)") -> None:
    """Load `state` into `model` strictly, after stripping wrapper prefixes; every mismatch in one message.

    Args:
        built_by: how the model was built, for the message ("--arch pkg:fn", "timm.create_model('x')").
        hint: what to do when the weights do not fit.
    """
    expected = model.state_dict()
    cleaned = clean_state_dict(state)
    if _overlap(cleaned, expected) > _overlap(state, expected):
        notes.append(f"stripped 'module.' / '_orig_mod.' prefixes from {sum(k != _clean_key(k) for k in state)} keys")
        state = cleaned
    first = {k.partition(".")[0] for k in state}
    if len(first) == 1 and not set(state) <= set(expected):  # e.g. a Lightning module's `model.` attribute
        prefix = f"{first.pop()}."
        stripped = {k.removeprefix(prefix): v for k, v in state.items()}
        if set(stripped) <= set(expected) and _overlap(stripped, expected) > _overlap(state, expected):
            notes.append(f"stripped the prefix {prefix!r} shared by all keys")
            state = stripped
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and isinstance(state[k], Tensor) and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = [f"{label} ({len(keys)}): {few(keys)}" for label, keys in
                 [("missing keys", missing), ("unexpected keys", unexpected),
                  ("shape mismatch, file vs model", mismatched)] if keys]
        raise CheckpointError(f"the weights in {path} do not fit {built_by}: {'; '.join(parts)}; {hint}")
    model.load_state_dict(state, strict=False)  # strictness checked above, with better messages


def _overlap(state: Mapping[str, Any], expected: Mapping[str, Any]) -> int:
    return sum(k in expected for k in state)


# ---------------------------------------------------------------------------------------------- imports


@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    entry = str(directory)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added:
            sys.path.remove(entry)


def _import_module(name: str, spec: str) -> Any:
    try:
        with _on_sys_path(Path.cwd()):
            return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ArchError(f"--arch {spec!r}: no module named {name!r}; run from the directory that holds it, "
                            "or pass path/to/file.py:CALLABLE") from e
        raise ArchError(f"--arch {spec!r}: importing {name} failed, it needs module {e.name!r}; install it") from e
    except Exception as e:  # noqa: BLE001 - importing user code can raise anything
        raise ArchError(f"--arch {spec!r}: importing {name} failed ({describe(e)}); fix the module") from e


def _import_file(file: Path, spec: str) -> Any:
    if not file.is_file():
        raise ArchError(f"--arch {spec!r}: file {file} does not exist; check the path")
    file = file.resolve()
    name = "_fyc_arch_" + re.sub(r"\W", "_", str(file))
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, file)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up here
    try:
        with _on_sys_path(file.parent):  # sibling imports work as when running the file
            module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - importing user code can raise anything
        del sys.modules[name]
        raise ArchError(f"--arch {spec!r}: importing {file} failed ({describe(e)}); fix the file") from e
    return module


# ---------------------------------------------------------------------------------------------- pickles


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a pickle-based checkpoint imports that weights_only refuses, found by static disassembly.

    torch's `get_unsafe_globals_in_checkpoint` reads zip checkpoints (torch.save's format since 1.6); for the
    legacy format we list the file's globals ourselves and ask torch's allowlist about them the same way.
    """
    try:
        if zipfile.is_zipfile(path):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with path.open("rb") as f:
            return _refused_by_torch(_pickle_globals(f))
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError):
        return []


def _refused_by_torch(names: set[str]) -> list[str]:
    """Which of the dotted global names torch's weights_only allowlist refuses (asked through its public API)."""
    body = b""
    for name in sorted(n for n in names if "." in n):
        module, attr = name.rsplit(".", 1)
        body += b"c" + module.encode() + b"\n" + attr.encode() + b"\n"  # the GLOBAL opcode
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:  # a checkpoint whose only pickle is a tuple of those globals
        z.writestr("archive/data.pkl", b"\x80\x02(" + body + b"t.")
        z.writestr("archive/version", "3\n")
    archive.seek(0)
    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(archive))


def _pickle_globals(stream: IO[bytes]) -> set[str]:
    """Every GLOBAL / STACK_GLOBAL in the consecutive pickles at the start of ``stream`` (legacy torch.save
    writes several before the raw tensor bytes); nothing is executed."""
    found: set[str] = set()
    while stream.read(1) == b"\x80":  # each pickle starts with a PROTO opcode
        stream.seek(-1, io.SEEK_CUR)
        memo: dict[int, Any] = {}
        pushed: list[Any] = []  # recent pushes; STACK_GLOBAL takes module and name from the last two
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.add(_py3_name(*arg.split(" ", 1)))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
                    found.add(_py3_name(str(pushed[-2]), str(pushed[-1])))
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed.append(memo.get(arg))
                elif op.name not in ("FRAME", "PROTO"):
                    pushed.append(arg if isinstance(arg, str) else None)
        except ValueError:  # garbage after the last pickle
            break
    return found


def _py3_name(module: str, name: str) -> str:
    """The dotted name a protocol-2 pickle's global resolves to in Python 3 (`__builtin__.set` -> `builtins.set`)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


# ---------------------------------------------------------------------------------------------- messages


def _unpickling_reason(e: pickle.UnpicklingError) -> str:
    """The weights_only unpickler's actual complaint, without torch's advice paragraphs."""
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    return match.group(1).strip() if match else first_line(e)


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
