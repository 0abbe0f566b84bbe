"""No learned classifier left behind (issue 25): every layer that produces the logits' classes in eval is swapped,
the exported file is scanned for learned C×N class weights, and a head left out by --layer is reported."""

from __future__ import annotations

import json

import pytest
import torch
from models import HEAD_LAYOUTS, HIDDEN_HEAD_LAYOUTS, LAYOUTS, AuxTrainingHead, TokenAuxClassifier, VitHead, head_math
from torch import Tensor, nn
from typer.testing import CliRunner

import fyc_convert.model.surgery as surgery
from fyc_convert.cli import app
from fyc_convert.errors import VerificationError
from fyc_convert.export.leftover import check_no_learned_classifier, find_learned_class_weights
from fyc_convert.export.onnx_export import export_onnx
from fyc_convert.model.class_layers import class_producing
from fyc_convert.model.surgery import find_classifiers, logits_of, swap_classifier

runner = CliRunner()


def _inputs(shape: tuple[int, ...], batch: int = 6) -> Tensor:
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(1))


def _learned_class_linears(model: nn.Module, num_classes: int) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m.out_features == num_classes]


@pytest.mark.parametrize("name", HIDDEN_HEAD_LAYOUTS)
def test_every_class_producing_linear_is_found(name):
    layout = HIDDEN_HEAD_LAYOUTS[name]()
    found = find_classifiers(layout.model, input_shape=layout.input_shape)
    assert found.names == tuple(layout.layer.split(","))
    assert found.combine == layout.combine and found.kept == ()


@pytest.mark.parametrize("name", HIDDEN_HEAD_LAYOUTS)
def test_both_layouts_convert_with_no_learned_class_weight_left(tmp_path, name):
    layout = HIDDEN_HEAD_LAYOUTS[name]()
    model, x = layout.model, _inputs(layout.input_shape)
    before = export_onnx(model, tmp_path / "original.onnx", input_shape=layout.input_shape)
    # the scan sees both learned matrices in the original ([C, N] for a Gemm, [N, C] for a MatMul)
    left = find_learned_class_weights(before.path, layout.num_classes)
    assert len(left) == 2 and all(sorted(w.shape) == sorted([layout.in_features, layout.num_classes]) for w in left)

    feats = {n: torch.randn(64, layout.in_features) for n in layout.layer.split(",")}
    swap = swap_classifier(model, features=feats, input_shape=layout.input_shape)
    assert swap.layers == tuple(layout.layer.split(",")) and swap.kept == ()
    assert _learned_class_linears(model, layout.num_classes) == []  # every class-producing Linear swapped
    # the parameter count covers both heads: two C×N weights and biases gone, two α and biases added
    c, n = layout.num_classes, layout.in_features
    assert swap.params.head_before == 2 * (c * n + c) and swap.params.head_after == 2 * (1 + c)
    assert swap.params.removed == 2 * c * n - 2

    res = export_onnx(model, tmp_path / "model.onnx", input_shape=layout.input_shape, head_layer=swap.layers)
    assert find_learned_class_weights(res.path, layout.num_classes) == []
    assert check_no_learned_classifier(res.path, swap, model) == []
    with torch.no_grad():  # the exported heads still compute the model's logits
        import onnxruntime as ort

        got = ort.InferenceSession(str(res.path)).run(None, {"input": x.numpy()})[0]
        assert torch.allclose(torch.from_numpy(got), logits_of(model(x)), atol=1e-4)


def test_token_aux_logits_are_the_swapped_heads_max_reduced_and_added():
    layout = HIDDEN_HEAD_LAYOUTS["token_aux_classifier"]()
    model, x = layout.model, _inputs(layout.input_shape)
    swap = swap_classifier(model, input_shape=layout.input_shape, inputs=_inputs(layout.input_shape, 32))
    tokens = model.norm(torch.cat([model.cls_token.expand(len(x), -1, -1), model.blocks(x)], dim=1))
    with torch.no_grad():
        want = head_math(model.head, tokens[:, 0]) + 0.5 * head_math(model.aux_head, tokens[:, 1:]).max(1)[0]
        assert torch.allclose(model(x).double(), want, atol=1e-5)
    assert swap.combine == "added"


def test_layer_naming_one_of_two_heads_reports_the_learned_head_kept(tmp_path):
    layout = HIDDEN_HEAD_LAYOUTS["token_aux_classifier"]()
    found = find_classifiers(layout.model, layer="head", input_shape=layout.input_shape)
    assert found.names == ("head",) and found.kept == ("aux_head",)
    assert found.kept_note() == "learned classifier kept: aux_head (not in --layer)"
    assert "learned classifier kept: aux_head" in found.describe()
    swap = swap_classifier(layout.model, classifiers=found)
    res = export_onnx(layout.model, tmp_path / "model.onnx", input_shape=layout.input_shape, head_layer=swap.layers)
    kept = check_no_learned_classifier(res.path, swap, layout.model)  # allowed: the user chose it
    assert [sorted(w.shape) for w in kept] == [[10, 16]]
    # the same file without the user's choice fails
    with pytest.raises(VerificationError, match=r"1 learned class weight.*--layer head,NAME"):
        check_no_learned_classifier(res.path, surgery.SwapResult(swap.model, swap.heads, swap.combine,
                                                                 swap.params), layout.model)


def _convert(tmp_path, model: nn.Module, arch: str, *extra: str):
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "out"
    result = runner.invoke(app, [str(ckpt), "--arch", arch, "--arch-kwargs", '{"num_classes": 10, "dim": 16}',
                                 "--input-shape", "3,8,8", "-o", str(out), "--quiet", *extra])
    return out, result


def test_cli_layer_one_of_two_heads_is_ok_with_a_note_naming_the_kept_head(tmp_path):
    model = HIDDEN_HEAD_LAYOUTS["token_aux_classifier"]().model
    out, result = _convert(tmp_path, model, "models:TokenAuxClassifier", "--layer", "head")
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and rep["layer"] == "head"
    assert "learned classifier kept: aux_head (not in --layer)" in rep["notes"]
    assert len(find_learned_class_weights(out / "model.onnx", 10)) == 1


def test_cli_without_layer_swaps_both_heads(tmp_path):
    model = HIDDEN_HEAD_LAYOUTS["token_aux_classifier"]().model
    out, result = _convert(tmp_path, model, "models:TokenAuxClassifier")
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and rep["layer"] == "head,aux_head"
    assert not any("kept" in note for note in rep["notes"])
    assert rep["params"]["head_before"] == 2 * (10 * 16 + 10) and rep["params"]["head_after"] == 2 * 11
    assert find_learned_class_weights(out / "model.onnx", 10) == []


def test_cli_fails_with_exit_3_when_discovery_misses_a_learned_head(tmp_path, monkeypatch):
    """The scan does not trust discovery: with discovery blinded, the learned aux head is caught in the file."""
    monkeypatch.setattr(surgery, "_every_class_layer", lambda model, found, *_: found)
    model = HIDDEN_HEAD_LAYOUTS["token_aux_classifier"]().model
    out, result = _convert(tmp_path, model, "models:TokenAuxClassifier")
    assert result.exit_code == 3, result.output
    assert "learned class weight" in result.output and "aux_head" in result.output
    assert (out / "model.failed.onnx").is_file() and not (out / "model.onnx").exists()
    assert json.loads((out / "report.json").read_text())["status"] == "verification_failed"


@pytest.mark.parametrize("name", sorted({**LAYOUTS, **HEAD_LAYOUTS}))
def test_known_layouts_keep_their_classifier_and_leave_no_learned_weight(tmp_path, name):
    layout = {**LAYOUTS, **HEAD_LAYOUTS}[name]()
    found = find_classifiers(layout.model, input_shape=layout.input_shape)
    assert ",".join(found.names) == layout.layer and found.kept == ()  # no extra head found anywhere
    swap = swap_classifier(layout.model, classifiers=found)
    res = export_onnx(layout.model, tmp_path / "model.onnx", input_shape=layout.input_shape, head_layer=swap.layers)
    assert find_learned_class_weights(res.path, layout.num_classes) == []


def test_orthogonal_head_matrix_is_fixed_not_learned(tmp_path):
    layout = LAYOUTS["vit_head"]()
    swap = swap_classifier(layout.model, head="orthogonal", input_shape=layout.input_shape)
    res = export_onnx(layout.model, tmp_path / "model.onnx", input_shape=layout.input_shape)
    assert len(find_learned_class_weights(res.path, 10)) == 1  # the dense fixed matrix is in the file...
    assert check_no_learned_classifier(res.path, swap, layout.model) == []  # ...and is the head's own


def test_class_producing_skips_hidden_and_training_only_layers():
    torch.manual_seed(0)
    vit = VitHead(num_classes=32, dim=16)  # its MLP's first Linear is 32 wide too: a hidden layer, not classes
    x = _inputs((3, 8, 8))
    with torch.no_grad():
        got = class_producing(vit.eval(), x, [m for m in vit.modules() if isinstance(m, nn.Linear)],
                              num_classes=32, logits_of=logits_of)
    assert got == [vit.head]
    aux = AuxTrainingHead(10, 16).eval()  # the aux Linear does not run in eval
    with torch.no_grad():
        got = class_producing(aux, x, [aux.aux[2], aux.fc], num_classes=10, logits_of=logits_of)
    assert got == [aux.fc]
    tok = TokenAuxClassifier(10, 16).eval()
    with torch.no_grad():
        got = class_producing(tok, x, [tok.aux_head, tok.head, tok.blocks.mlp[0]], num_classes=10,
                              logits_of=logits_of)
    assert got == [tok.aux_head, tok.head]
