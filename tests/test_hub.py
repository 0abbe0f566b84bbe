"""Checkpoint folders as the zoos save them: Hugging Face save_pretrained (real tiny transformers models built from
configs, nothing downloaded) and timm's hub layout (a stand-in `timm` package on sys.path; the real timm is tried
by benchmarks/zoo.py where it imports)."""

from __future__ import annotations

import builtins
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models import ResNetFc
from safetensors.torch import save_file

from fyc_convert.errors import CheckpointError
from fyc_convert.model.loading import load_model
from fyc_convert.model.surgery import find_classifiers, swap_classifier

KWARGS = {"num_classes": 10, "width": 16}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- Hugging Face


def _hf_model(kind: str):
    transformers = pytest.importorskip("transformers")
    labels = {"id2label": {i: f"class_{i}" for i in range(4)}, "label2id": {f"class_{i}": i for i in range(4)}}
    configs = {
        "vit": lambda: transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, **labels),
        "convnext": lambda: transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                        image_size=32, **labels),
        "resnet": lambda: transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                    layer_type="basic", num_labels=3),
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.AutoModelForImageClassification.from_config(configs[kind]()).eval()


def _save_hf(model, folder: Path, **kwargs) -> Path:
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()  # the test's own save, not the library under test
    try:
        model.save_pretrained(folder, **kwargs)
    finally:
        transformers.utils.logging.enable_progress_bar()
    return folder


@pytest.mark.parametrize(("kind", "classifier"), [("vit", "classifier"), ("convnext", "classifier"),
                                                  ("resnet", "classifier.1")])
def test_huggingface_folder_loads_and_swaps(tmp_path, capfd, kind, classifier):
    model = _hf_model(kind)
    folder = _save_hf(model, tmp_path / kind)
    capfd.readouterr()
    loaded = load_model(folder)
    assert loaded.format == "huggingface" and not loaded.model.training
    assert type(loaded.model) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X).logits, model(X).logits, rtol=0, atol=0)
    assert capfd.readouterr() == ("", "")  # transformers' load report and progress bars stay quiet
    if kind == "resnet":
        assert "classes" not in loaded.meta  # LABEL_0, LABEL_1, ... are placeholders, not class names
    else:
        assert loaded.meta["classes"] == [f"class_{i}" for i in range(4)]
    found = find_classifiers(loaded.model, input_shape=(3, 32, 32))
    assert found.names == (classifier,) and found.combine == "single"
    swap = swap_classifier(loaded.model, classifiers=found, inputs=X)
    assert swap.layer == classifier and loaded.model.get_submodule(classifier) is swap.head


def test_huggingface_preprocessor_config_goes_into_meta(tmp_path):
    folder = _save_hf(_hf_model("vit"), tmp_path / "vit")
    processor = {"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}, "resample": 2}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    assert load_model(folder).meta["preprocessor_config"] == processor


def _as_bin(folder: Path) -> Path:
    """The folder with its weights as pytorch_model.bin (older transformers' format), same keys."""
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_huggingface_bin_and_sharded_folders(tmp_path):
    model = _hf_model("convnext")
    bin_folder = _as_bin(_save_hf(model, tmp_path / "bin"))
    sharded = _save_hf(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    for folder in (bin_folder, sharded):
        with torch.no_grad():
            torch.testing.assert_close(load_model(folder).model(X).logits, model(X).logits, rtol=0, atol=0)


class Evil:
    """Unpickling this creates a file: proof that code from the checkpoint ran."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return builtins.open, (str(self.target), "w")


def test_huggingface_bin_is_read_without_running_its_code(tmp_path):
    folder = _as_bin(_save_hf(_hf_model("vit"), tmp_path / "vit"))
    target = tmp_path / "pwned"
    torch.save({"x": Evil(target)}, folder / "pytorch_model.bin")
    message = _error(folder)
    assert message.startswith(f"transformers could not build ViTForImageClassification from {folder}")
    assert not target.exists()


def test_huggingface_missing_weights_are_an_error(tmp_path):
    folder = _save_hf(_hf_model("resnet"), tmp_path / "resnet")
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    del state["classifier.1.bias"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert _error(folder) == (f"the weights in {folder} do not fit its ResNetForImageClassification (missing keys "
                              "(1): classifier.1.bias); save the model again with save_pretrained")


def test_huggingface_remote_code_needs_trust(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "my_net", "architectures": ["MyNetForImageClassification"],
        "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                     "AutoModelForImageClassification": "modeling_my.MyNetForImageClassification"}}))
    save_file({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    (tmp_path / "modeling_my.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    assert _error(tmp_path) == (f"{tmp_path} defines its model (MyNetForImageClassification) in code inside the "
                                "folder (config.json 'auto_map'); pass --trust-remote-code only if you trust that "
                                "code (it runs it)")
    assert not (tmp_path / "ran").exists()


_REMOTE_CONFIG = """
from transformers import PretrainedConfig


class MyConfig(PretrainedConfig):
    model_type = "my_net"

    def __init__(self, width=4, **kwargs):
        self.width = width
        super().__init__(**kwargs)
"""
_REMOTE_MODEL = """
from torch import nn
from transformers import PreTrainedModel

from .configuration_my import MyConfig


class MyNetForImageClassification(PreTrainedModel):
    config_class = MyConfig

    def __init__(self, config):
        super().__init__(config)
        self.body = nn.Sequential(nn.Conv2d(3, config.width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(config.width, config.num_labels)
        self.post_init()

    def forward(self, pixel_values):
        return self.classifier(self.body(pixel_values))
"""


def test_huggingface_remote_code_runs_when_trusted(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    # transformers copies the folder's code into its modules cache: a temporary one, off the user's home
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "my_net_remote"
    folder.mkdir()
    (folder / "configuration_my.py").write_text(_REMOTE_CONFIG)
    (folder / "modeling_my.py").write_text(_REMOTE_MODEL)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "my_net", "architectures": ["MyNetForImageClassification"], "width": 4,
        "id2label": {"0": "cat", "1": "dog"}, "label2id": {"cat": 0, "dog": 1},
        "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                     "AutoModelForImageClassification": "modeling_my.MyNetForImageClassification"}}))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        weights = {"body.0.weight": torch.randn(4, 3, 3, 3), "body.0.bias": torch.randn(4),
                   "classifier.weight": torch.randn(2, 4), "classifier.bias": torch.randn(2)}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert "trust-remote-code" in _error(folder)
    loaded = load_model(folder, trust_remote_code=True)
    assert type(loaded.model).__name__ == "MyNetForImageClassification"
    assert loaded.meta == {"classes": ["cat", "dog"]}
    torch.testing.assert_close(loaded.model.classifier.weight.detach(), weights["classifier.weight"])


def test_huggingface_unknown_model_type(tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    save_file({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert _error(tmp_path) == (f"transformers {transformers.__version__} does not know model_type 'not_a_model' "
                                f"in {tmp_path}; upgrade transformers (pip install -U transformers)")


def test_huggingface_without_transformers(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTForImageClass"
                                                                                              "ification"]}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    assert _error(tmp_path) == (f"{tmp_path} is a Hugging Face save_pretrained folder (ViTForImageClassification); "
                                "building it needs transformers: pip install transformers")


# ---------------------------------------------------------------------------------------------- timm

_FAKE_TIMM = '''
"""A stand-in for timm: create_model builds tests/models.py classes and records how it was called."""
__version__ = "0.0-test"
calls = []


def create_model(model_name, pretrained=False, pretrained_cfg=None, **kwargs):
    import models

    calls.append((model_name, pretrained, pretrained_cfg, kwargs))
    if model_name != "resnet_fc":
        raise RuntimeError(f"Unknown model ({model_name})")
    model = models.ResNetFc(**kwargs)
    model.pretrained_cfg = pretrained_cfg  # as timm sets it, where fyc_convert.data.preprocess reads it
    return model
'''


@pytest.fixture
def fake_timm(tmp_path, monkeypatch):
    root = tmp_path / "site"
    (root / "timm").mkdir(parents=True)
    (root / "timm" / "__init__.py").write_text(textwrap.dedent(_FAKE_TIMM))
    monkeypatch.syspath_prepend(str(root))
    sys.modules.pop("timm", None)
    import timm

    yield timm
    sys.modules.pop("timm", None)


def _timm_folder(folder: Path, model: torch.nn.Module, config: dict, *, weights: str = "model.safetensors") -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    state = model.state_dict()
    if weights.endswith(".safetensors"):
        save_file(state, folder / weights)
    else:
        torch.save(state, folder / weights)
    return folder


_CFG = {"architecture": "resnet_fc", "num_classes": 10, "num_features": 16, "model_args": {"width": 16},
        "label_names": [f"n{i:02d}" for i in range(10)],
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2],
                           "crop_pct": 0.9, "interpolation": "bicubic", "num_classes": 10}}


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_timm_folder_builds_with_create_model(tmp_path, fake_timm, weights):
    model = ResNetFc(**KWARGS).eval()
    folder = _timm_folder(tmp_path / "hub", model, _CFG, weights=weights)
    loaded = load_model(folder)
    assert loaded.format == "timm" and not loaded.model.training
    cfg = {**_CFG["pretrained_cfg"], "label_names": _CFG["label_names"]}  # as timm's hub loader merges them
    assert fake_timm.calls == [("resnet_fc", False, cfg, {"width": 16, "num_classes": 10})]
    assert loaded.model.pretrained_cfg["input_size"] == [3, 32, 32]
    assert loaded.meta == {"classes": _CFG["label_names"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), model(X), rtol=0, atol=0)


def test_timm_legacy_flat_config(tmp_path, fake_timm):
    model = ResNetFc(**KWARGS).eval()
    config = {"architecture": "resnet_fc", "num_classes": 10, "num_features": 16, "input_size": [3, 32, 32],
              "labels": ["a"] * 10}
    load_model(_timm_folder(tmp_path / "hub", model, config))
    _, _, cfg, kwargs = fake_timm.calls[0]
    assert cfg == {"num_classes": 10, "input_size": [3, 32, 32], "label_names": ["a"] * 10}
    assert kwargs == {"num_classes": 10}


def test_timm_weights_that_do_not_fit(tmp_path, fake_timm):
    folder = _timm_folder(tmp_path / "hub", ResNetFc(num_classes=7, width=16), _CFG)
    message = _error(folder)
    assert message.startswith(f"the weights in {folder} do not fit timm.create_model('resnet_fc'): shape mismatch")
    assert message.endswith("check hub/config.json (architecture, num_classes, model_args) belongs to these weights")


def test_timm_unknown_architecture(tmp_path, fake_timm):
    folder = _timm_folder(tmp_path / "hub", ResNetFc(**KWARGS), {**_CFG, "architecture": "resnet_9000"})
    assert _error(folder) == (f"timm 0.0-test could not build 'resnet_9000' from {folder / 'config.json'} "
                              "(RuntimeError: Unknown model (resnet_9000)); upgrade timm, or check the config's "
                              "model_args")


def test_timm_folder_without_timm(tmp_path, monkeypatch):
    folder = _timm_folder(tmp_path / "hub", ResNetFc(**KWARGS), _CFG)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    assert _error(folder) == (f"{folder} is a timm hub folder (architecture 'resnet_fc'); building it needs timm: "
                              "pip install timm")


# ---------------------------------------------------------------------------------------------- any folder


def test_folder_with_arch_uses_the_arch_and_the_folder_weights(tmp_path):
    model = ResNetFc(**KWARGS).eval()
    folder = _timm_folder(tmp_path / "hub", model, _CFG)  # timm is not needed: --arch builds the model
    loaded = load_model(folder, arch="models:ResNetFc", arch_kwargs=KWARGS)
    assert loaded.format == "timm"
    assert loaded.notes == ["built with --arch models:ResNetFc; hub/config.json not used to build the model"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), model(X), rtol=0, atol=0)


def test_folder_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"hidden": 3}))
    assert _error(tmp_path / "a") == (f"{tmp_path / 'a' / 'config.json'} names neither a Hugging Face model "
                                      "('model_type') nor a timm architecture ('architecture'); pass a checkpoint "
                                      "file with --arch instead")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{not json")
    assert _error(tmp_path / "b").startswith(f"{tmp_path / 'b' / 'config.json'} is not readable JSON (")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps(_CFG))
    assert _error(tmp_path / "c", arch="models:ResNetFc") == (
        f"{tmp_path / 'c'} has a config.json but no weights (model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin, pytorch_model.bin.index.json); copy the whole folder")
    (tmp_path / "c" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../x.bin"}}))
    assert _error(tmp_path / "c", arch="models:ResNetFc") == (
        f"{tmp_path / 'c' / 'model.safetensors.index.json'} names shards that are not files in {tmp_path / 'c'}: "
        "../x.bin; copy the whole folder")

