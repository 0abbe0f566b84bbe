import builtins
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from models import LAYOUTS, ResNetFc, VitHead
from safetensors.torch import save_file
from torch import nn

from fyc_convert.errors import ArchError, CheckpointError
from fyc_convert.model.loading import LoadedModel, clean_state_dict, load_model, resolve_arch
from fyc_convert.model.surgery import swap_classifier

MODELS_PY = str(Path(__file__).with_name("models.py"))
KWARGS = {"num_classes": 10, "width": 16}  # ResNetFc as in LAYOUTS["resnet_fc"]
X = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def _trained() -> nn.Module:
    return LAYOUTS["resnet_fc"]().model


def _assert_same_model(loaded: LoadedModel, reference: nn.Module) -> None:
    assert not loaded.model.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), reference(X), rtol=0, atol=0)


def _error(exc_type: type[Exception], path, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


class Evil:
    """Unpickling this creates a file: proof that code from the checkpoint ran."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return builtins.open, (str(self.target), "w")


# ---------------------------------------------------------------------------------------------- formats


def test_state_dict_with_module_arch(tmp_path):
    model = _trained()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = load_model(tmp_path / "w.pt", arch="models:ResNetFc", arch_kwargs=json.dumps(KWARGS))
    assert (loaded.format, loaded.meta, loaded.notes) == ("state_dict", {}, [])
    _assert_same_model(loaded, model)


def test_state_dict_with_file_arch_and_dict_kwargs(tmp_path):
    model = _trained()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = load_model(tmp_path / "w.pth", arch=f"{MODELS_PY}:ResNetFc", arch_kwargs=KWARGS)
    _assert_same_model(loaded, model)


def test_legacy_torch_save_format(tmp_path):
    model = _trained()
    torch.save(model.state_dict(), tmp_path / "w.pt", _use_new_zipfile_serialization=False)
    _assert_same_model(load_model(tmp_path / "w.pt", arch="models:ResNetFc", arch_kwargs=KWARGS), model)


@pytest.mark.parametrize("key", ["state_dict", "model", "state_dict_ema", "model_ema"])
def test_training_checkpoint_keys(tmp_path, key):
    model = _trained()
    meta = {"input_shape": [3, 8, 8], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "classes": list("abc")}
    torch.save({key: model.state_dict(), "epoch": 7, "optimizer": {"lr": 0.1}, "meta": meta}, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt", arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert loaded.format == "checkpoint"
    assert loaded.meta == meta
    assert loaded.notes == [f"weights taken from checkpoint[{key!r}]"]
    _assert_same_model(loaded, model)


def test_training_checkpoint_prefers_plain_weights_over_ema(tmp_path):
    model, other = _trained(), ResNetFc()
    torch.save({"state_dict_ema": other.state_dict(), "state_dict": model.state_dict()}, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt", arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert loaded.notes == ["weights taken from checkpoint['state_dict']; also present, not used: state_dict_ema"]
    _assert_same_model(loaded, model)


def test_state_dict_saved_from_real_ddp(tmp_path):
    model = _trained()
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    except RuntimeError as e:  # no usable network interface for gloo on this machine
        pytest.skip(f"gloo unavailable: {e}")
    try:
        state = nn.parallel.DistributedDataParallel(model).state_dict()
    finally:
        dist.destroy_process_group()
    assert all(k.startswith("module.") for k in state)
    torch.save(state, tmp_path / "ddp.pt")
    loaded = load_model(tmp_path / "ddp.pt", arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert loaded.notes == [f"stripped 'module.' / '_orig_mod.' prefixes from {len(state)} keys"]
    _assert_same_model(loaded, model)


def test_state_dict_with_ddp_prefix(tmp_path):
    model = _trained()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    _assert_same_model(load_model(tmp_path / "ddp.pt", arch="models:ResNetFc", arch_kwargs=KWARGS), model)


def test_state_dict_saved_from_compiled_model(tmp_path):
    model = _trained()
    state = torch.compile(model).state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    torch.save({"model": state}, tmp_path / "compiled.pt")
    _assert_same_model(load_model(tmp_path / "compiled.pt", arch="models:ResNetFc", arch_kwargs=KWARGS), model)


def test_state_dict_from_ddp_of_compiled_model(tmp_path):
    model = _trained()
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    _assert_same_model(load_model(tmp_path / "w.pt", arch="models:ResNetFc", arch_kwargs=KWARGS), model)


def test_lightning_style_common_prefix_is_stripped(tmp_path):
    model = _trained()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "last.ckpt")
    loaded = load_model(tmp_path / "last.ckpt", arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert loaded.notes == ["weights taken from checkpoint['state_dict']",
                            "stripped the prefix 'model.' shared by all keys"]
    _assert_same_model(loaded, model)


class Wrapper(nn.Module):
    """A model whose own submodule is called `module`: its keys must keep the prefix."""

    def __init__(self):
        super().__init__()
        self.module = ResNetFc()

    def forward(self, x):
        return self.module(x)


def test_module_prefix_kept_when_the_architecture_has_it(tmp_path):
    torch.manual_seed(3)
    model = Wrapper().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = load_model(tmp_path / "w.pt", arch=f"{__file__}:Wrapper")
    assert loaded.notes == []
    _assert_same_model(loaded, model)


def test_clean_state_dict():
    t = torch.zeros(1)
    cleaned = clean_state_dict({"module.a._orig_mod.b": t, "_orig_mod.c": t, "module.module.d": t, "e.module.f": t})
    assert list(cleaned) == ["a.b", "c", "d", "e.module.f"]


def test_safetensors_with_arch_and_metadata(tmp_path):
    model = _trained()
    save_file(model.state_dict(), tmp_path / "w.safetensors", metadata={"classes": '["a", "b"]', "note": "hi"})
    loaded = load_model(tmp_path / "w.safetensors", arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert (loaded.format, loaded.meta) == ("safetensors", {"classes": ["a", "b"], "note": "hi"})
    _assert_same_model(loaded, model)


def test_safetensors_found_by_content_without_suffix(tmp_path):
    model = _trained()
    save_file(model.state_dict(), tmp_path / "weights.bin")
    loaded = load_model(tmp_path / "weights.bin", arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert (loaded.format, loaded.meta) == ("safetensors", {})
    _assert_same_model(loaded, model)


def test_pickled_module_with_trust_pickle(tmp_path):
    model = _trained()
    torch.save(model, tmp_path / "whole.pt")
    loaded = load_model(tmp_path / "whole.pt", trust_pickle=True, arch="models:ResNetFc")
    assert loaded.format == "pickle"
    assert loaded.notes == ["--arch models:ResNetFc not used: the file holds a whole pickled model"]
    _assert_same_model(loaded, model)


def test_pickled_module_inside_checkpoint_with_trust_pickle(tmp_path):
    model = _trained()
    torch.save({"model": model, "meta": {"classes": ["x"]}}, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", trust_pickle=True)
    assert (loaded.format, loaded.meta) == ("pickle", {"classes": ["x"]})
    _assert_same_model(loaded, model)


def test_pickled_data_parallel_is_unwrapped(tmp_path):
    model = _trained()
    torch.save(nn.DataParallel(model), tmp_path / "dp.pt")
    loaded = load_model(tmp_path / "dp.pt", trust_pickle=True)
    assert isinstance(loaded.model, ResNetFc)
    assert loaded.notes == ["unwrapped the pickled DataParallel"]
    _assert_same_model(loaded, model)


def _save_model_of_user_module(tmp_path: Path) -> Path:
    """torch.save(model) where the model's class lives in tmp_path/usernet.py, then forget that module."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "usernet.py").write_text(
        "from torch import nn\n\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(4, 3)\n\n    def forward(self, x):\n        return self.fc(x)\n"
    )
    sys.path.insert(0, str(tmp_path / "code"))
    try:
        import usernet

        torch.save(usernet.Net(), tmp_path / "net.pt")
    finally:
        sys.path.remove(str(tmp_path / "code"))
        del sys.modules["usernet"]
    return tmp_path / "net.pt"


def test_trusted_pickle_imports_its_classes_from_current_directory(tmp_path, monkeypatch):
    path = _save_model_of_user_module(tmp_path)
    monkeypatch.chdir(tmp_path / "code")
    try:
        loaded = load_model(path, trust_pickle=True)
        assert type(loaded.model).__name__ == "Net" and loaded.model.fc.out_features == 3
    finally:
        sys.modules.pop("usernet", None)


def test_error_trusted_pickle_whose_code_does_not_import(tmp_path):
    path = _save_model_of_user_module(tmp_path)
    message = _error(CheckpointError, path, trust_pickle=True)
    assert message.startswith(f"the pickled model in {path} needs module 'usernet', which does not import; run from "
                              "the directory that holds the model's code")


def test_torchscript_with_arch_loads_its_weights(tmp_path):
    model = _trained()
    torch.jit.save(torch.jit.script(model), tmp_path / "ts.pt")
    loaded = load_model(tmp_path / "ts.pt", arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert loaded.format == "torchscript"
    _assert_same_model(loaded, model)


def test_torch_export_with_arch_and_trust_loads_its_weights(tmp_path):
    model = _trained()
    torch.export.save(torch.export.export(model, (X,)), tmp_path / "m.pt2")
    loaded = load_model(tmp_path / "m.pt2", arch="models:ResNetFc", arch_kwargs=KWARGS, trust_pickle=True)
    assert loaded.format == "export"
    _assert_same_model(loaded, model)


def test_loaded_checkpoint_can_be_swapped(tmp_path):
    model = LAYOUTS["vit_head"]().model
    torch.save({"state_dict": model.state_dict()}, tmp_path / "vit.pt")
    loaded = load_model(tmp_path / "vit.pt", arch="models:VitHead")
    result = swap_classifier(loaded.model, input_shape=(3, 8, 8))
    assert result.layer == "head" and isinstance(loaded.model, VitHead)


def test_arch_module_resolves_from_current_directory(tmp_path, monkeypatch):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "nets.py").write_text(
        "from torch import nn\n\ndef build(width=4):\n    return nn.Sequential(nn.Linear(width, 2))\n"
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    loaded = load_model("w.pt", arch="userpkg.nets:build", arch_kwargs='{"width": 4}')
    assert sys.path == path_before
    assert torch.equal(loaded.model[0].weight, model[0].weight)


def test_arch_file_with_sibling_import_and_dataclass(tmp_path):
    (tmp_path / "helpers.py").write_text("WIDTH = 5\n")
    (tmp_path / "net.py").write_text(
        "from dataclasses import dataclass\nfrom torch import nn\nfrom helpers import WIDTH\n\n"
        "@dataclass\nclass Cfg:\n    classes: int = 3\n\n"
        "def build():\n    return nn.Linear(WIDTH, Cfg().classes)\n"
    )
    built = resolve_arch(f"{tmp_path / 'net.py'}:build")()
    assert (built.in_features, built.out_features) == (5, 3)


# ---------------------------------------------------------------------------------------------- untrusted pickles


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_executes_nothing(tmp_path, legacy):
    target = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": Evil(target)}, tmp_path / "evil.pt", _use_new_zipfile_serialization=not legacy)
    message = _error(CheckpointError, tmp_path / "evil.pt", arch="models:ResNetFc")
    assert "it wants io.open" in message and "--trust-pickle" in message
    assert not target.exists()


def test_malicious_plain_pickle_executes_nothing(tmp_path):
    import pickle

    target = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil(target), protocol=4))
    message = _error(CheckpointError, tmp_path / "evil.pkl")
    assert "it wants io.open" in message
    assert not target.exists()


def test_error_pickled_module_without_trust_pickle(tmp_path):
    torch.save(_trained(), tmp_path / "whole.pt")
    message = _error(CheckpointError, tmp_path / "whole.pt")
    assert message == (
        f"{tmp_path / 'whole.pt'} needs code to load (it wants models.ResNetFc, torch.nn.modules.activation.ReLU, "
        "torch.nn.modules.batchnorm.BatchNorm2d, torch.nn.modules.container.Sequential, "
        "torch.nn.modules.conv.Conv2d, torch.nn.modules.linear.Linear, … (1 more)), e.g. a whole pickled model; "
        "pass --trust-pickle only if you trust the file (unpickling runs its code), or save model.state_dict() "
        "and pass it with --arch MODULE:CALLABLE"
    )


def test_error_torch_export_without_trust_pickle(tmp_path):
    torch.export.save(torch.export.export(_trained(), (X,)), tmp_path / "m.pt2")
    message = _error(CheckpointError, tmp_path / "m.pt2", arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert "torch.export archive and reading it unpickles data" in message and "--trust-pickle" in message


# ---------------------------------------------------------------------------------------------- bad input


def test_error_missing_file(tmp_path):
    assert _error(CheckpointError, tmp_path / "nope.pt") == f"checkpoint {tmp_path / 'nope.pt'} does not exist; " \
                                                             "check the path"


def test_error_directory(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"x")
    (tmp_path / "log.txt").write_text("x")
    message = _error(CheckpointError, tmp_path)
    assert message == (f"checkpoint {tmp_path} is a directory without config.json (neither a Hugging Face "
                       "save_pretrained nor a timm hub folder); pass one of the files in it: best.pt")


def test_error_empty_file(tmp_path):
    (tmp_path / "w.pt").touch()
    assert "is empty (0 bytes)" in _error(CheckpointError, tmp_path / "w.pt", arch="models:ResNetFc")


def test_error_random_bytes(tmp_path):
    (tmp_path / "w.pt").write_bytes(bytes(range(7, 107)))
    message = _error(CheckpointError, tmp_path / "w.pt")
    assert message == (f"{tmp_path / 'w.pt'} is not a checkpoint (unrecognised content, first bytes 07 08 09 0a); "
                       "pass a file written by torch.save, safetensors, torch.jit.save or torch.export.save")


@pytest.mark.parametrize("legacy", [False, True])
def test_error_truncated_archive(tmp_path, legacy):
    torch.save(_trained().state_dict(), tmp_path / "w.pt", _use_new_zipfile_serialization=not legacy)
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    message = _error(CheckpointError, tmp_path / "w.pt", arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert "truncated or corrupt" in message and "copy or save it again" in message


def test_error_corrupt_safetensors_header(tmp_path):
    save_file(_trained().state_dict(), tmp_path / "w.safetensors")
    data = bytearray((tmp_path / "w.safetensors").read_bytes())
    data[8:20] = b"#not json!!!"
    (tmp_path / "w.safetensors").write_bytes(bytes(data))
    message = _error(CheckpointError, tmp_path / "w.safetensors", arch="models:ResNetFc")
    assert "is not a valid safetensors file" in message and "header is corrupt" in message


def test_error_state_dict_without_arch(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    assert _error(CheckpointError, tmp_path / "w.pt").endswith("holds only weights (state_dict); pass --arch "
                                                               "MODULE:CALLABLE that builds the model (e.g. "
                                                               "mypkg.models:resnet18 or path/to/file.py:build)")


def test_error_without_arch_names_the_arch_in_metadata(tmp_path):
    meta = {"arch": "models:ResNetFc", "arch_kwargs": KWARGS}
    torch.save({"state_dict": _trained().state_dict(), "meta": meta}, tmp_path / "c.pt")
    message = _error(CheckpointError, tmp_path / "c.pt")
    assert message.endswith("(its metadata names --arch models:ResNetFc --arch-kwargs "
                            "'{\"num_classes\": 10, \"width\": 16}')")


def test_error_torchscript_without_arch(tmp_path):
    torch.jit.save(torch.jit.script(_trained()), tmp_path / "ts.pt")
    message = _error(CheckpointError, tmp_path / "ts.pt")
    assert "TorchScript archive" in message and "cannot be swapped" in message and "--arch" in message


def test_error_dict_without_weights(tmp_path):
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "c.pt")
    message = _error(CheckpointError, tmp_path / "c.pt", arch="models:ResNetFc")
    assert message == (f"{tmp_path / 'c.pt'} holds a dict without weights (keys: epoch, optimizer); expected a "
                       "state_dict or a checkpoint with one of the keys state_dict, model, state_dict_ema, model_ema")


def test_error_arch_does_not_import(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    message = _error(ArchError, tmp_path / "w.pt", arch="no_such_pkg.models:build")
    assert message == ("--arch 'no_such_pkg.models:build': no module named 'no_such_pkg.models'; run from the "
                       "directory that holds it, or pass path/to/file.py:CALLABLE")


def test_error_arch_file_missing(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    message = _error(ArchError, tmp_path / "w.pt", arch=f"{tmp_path / 'nets.py'}:build")
    assert message.endswith(f"file {tmp_path / 'nets.py'} does not exist; check the path")


def test_error_arch_module_fails_to_import(tmp_path):
    (tmp_path / "broken.py").write_text("def build(:\n")
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    message = _error(ArchError, tmp_path / "w.pt", arch=f"{tmp_path / 'broken.py'}:build")
    assert "importing" in message and "SyntaxError" in message and "fix the file" in message


def test_error_arch_without_colon(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    assert "is not MODULE:CALLABLE" in _error(ArchError, tmp_path / "w.pt", arch="models.ResNetFc")


def test_error_arch_attribute_missing(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    message = _error(ArchError, tmp_path / "w.pt", arch="models:resnet")
    assert message.startswith("--arch 'models:resnet': models has no attribute 'resnet'; callables defined in it: "
                              "ResNetFc, ")


def test_error_arch_not_callable(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    message = _error(ArchError, tmp_path / "w.pt", arch="models:LAYOUTS")
    assert message == ("--arch 'models:LAYOUTS' is a dict, not a callable; point it at a function or class that "
                       "builds the model")


def test_error_arch_returns_no_module(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    message = _error(ArchError, tmp_path / "w.pt", arch="models:logits_of", arch_kwargs={"output": X})
    assert message == ("--arch models:logits_of returned a Tensor, not an nn.Module; point it at a function or "
                       "class that builds the model")


def test_error_arch_call_fails(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    message = _error(ArchError, tmp_path / "w.pt", arch="models:ResNetFc", arch_kwargs='{"classes": 10}')
    assert message.startswith('--arch models:ResNetFc failed when called with {"classes": 10} (TypeError: ')
    assert message.endswith("check --arch-kwargs")


def test_error_invalid_arch_kwargs_json(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    message = _error(ArchError, tmp_path / "w.pt", arch="models:ResNetFc", arch_kwargs="{num_classes: 10}")
    assert message.startswith("--arch-kwargs is not valid JSON (Expecting property name enclosed in double quotes")
    assert message.endswith("pass an object like '{\"num_classes\": 10}'")


def test_error_arch_kwargs_not_an_object(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    message = _error(ArchError, tmp_path / "w.pt", arch="models:ResNetFc", arch_kwargs="[10]")
    assert message.startswith("--arch-kwargs must be a JSON object, got list")


def test_error_state_dict_does_not_fit_arch(tmp_path):
    state = _trained().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.1.bias"]
    torch.save(state, tmp_path / "w.pt")
    message = _error(CheckpointError, tmp_path / "w.pt", arch="models:ResNetFc", arch_kwargs={"num_classes": 7})
    assert message == (
        f"the weights in {tmp_path / 'w.pt'} do not fit --arch models:ResNetFc: missing keys (1): layer1.1.bias; "
        "unexpected keys (1): extra.weight; shape mismatch, file vs model (2): fc.weight (10, 16) vs (7, 16), "
        "fc.bias (10,) vs (7,); check --arch and --arch-kwargs (e.g. num_classes)"
    )


def test_loading_leaves_process_state_alone(tmp_path):
    torch.save(_trained().state_dict(), tmp_path / "w.pt")
    path_before, cwd = list(sys.path), os.getcwd()
    load_model(tmp_path / "w.pt", arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert (sys.path, os.getcwd()) == (path_before, cwd)


def test_arch_kwargs_are_parsed_by_the_torch_free_options_layer():
    import subprocess

    from fyc_convert.errors import ArchError
    from fyc_convert.options import parse_arch_kwargs

    assert parse_arch_kwargs('{"num_classes": 10}') == {"num_classes": 10} and parse_arch_kwargs(None) == {}
    with pytest.raises(ArchError, match="must be a JSON object, got list"):
        parse_arch_kwargs("[1]")
    # the base layer imports neither torch nor model/ (the CLI's option checks stay fast)
    code = ("import sys, fyc_convert.options; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('fyc_convert.model')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_hub_does_not_import_loading():
    """Imports point one way: loading uses hub (load_folder), hub knows nothing of loading."""
    import ast

    import fyc_convert.model.hub as hub

    tree = ast.parse(Path(hub.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "fyc_convert.model.hub" not in imported and "fyc_convert.model.loading" not in imported
    assert "fyc_convert.errors" in imported
