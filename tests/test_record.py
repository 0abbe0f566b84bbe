"""The one head record and its codec (fyc_convert.head.record): what both the ONNX metadata and the safetensors
header hold."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fyc_convert.errors import HeadError
from fyc_convert.head.heads import HadamardHead, OrthogonalHead
from fyc_convert.head.layouts import ConvHead
from fyc_convert.head.record import HEADS_KEY, KIND_KEY, HeadRecord, decode_heads, encode_heads


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 24), ConvHead(HadamardHead(24, 5, seed=3, fixed_scale=2.0)),
                         OrthogonalHead(5, 3, bias=False, seed=7))


def test_records_of_a_model_round_trip_through_the_two_keys() -> None:
    model = _model()
    records = [HeadRecord.of(model, "1.head"), HeadRecord.of(model, "2")]
    hadamard, orthogonal = records
    assert hadamard.kind == "hadamard" and hadamard.wrapper == "conv1x1" and hadamard.seed == 3
    assert hadamard.fixed_scale and hadamard.bias and hadamard.rows == tuple(model[1].head.rows.tolist())
    assert (hadamard.in_features, hadamard.num_classes, hadamard.hadamard_size) == (24, 5, model[1].head.hadamard_size)
    assert orthogonal == HeadRecord(kind="orthogonal", layer="2", in_features=5, num_classes=3, seed=7, bias=False,
                                    fixed_scale=False)  # no Hadamard fields, no wrapper, no graph placement
    meta = encode_heads(records)
    assert set(meta) == {KIND_KEY, HEADS_KEY} and meta[KIND_KEY] == "hadamard,orthogonal"
    assert "hadamard_size" not in json.loads(meta[HEADS_KEY])[1]  # None fields are left out
    assert decode_heads(meta) == records
    placed = hadamard.placed(scope="fyc_head/0/", input="feats", input_dtype="float16", output="out")
    assert decode_heads(encode_heads([placed]))[0].input_dtype == "float16"
    assert encode_heads([]) == {KIND_KEY: "original"} and decode_heads({KIND_KEY: "original"}) == []


@pytest.mark.parametrize(("meta", "message"), [
    ({KIND_KEY: "hadamard"}, r"no fyc-convert head list \(fyc_convert.heads\)"),
    ({KIND_KEY: "hadamard", HEADS_KEY: "[{"}, "is not JSON"),
    ({KIND_KEY: "hadamard", HEADS_KEY: "[]"}, "lists no heads"),
    ({KIND_KEY: "hadamard", HEADS_KEY: '[{"kind": "hadamard", "layer": "fc", "in_features": 4, "num_classes": 2}]'},
     "lacks hadamard_size, embedding for head 'fc'"),
    ({KIND_KEY: "x", HEADS_KEY: '[{"kind": "dense", "layer": "fc", "in_features": 4, "num_classes": 2}]'},
     "unknown head kind 'dense'"),
    ({KIND_KEY: "orthogonal", HEADS_KEY: '[{"kind": "orthogonal", "layer": "fc", "in_features": "4", '
                                         '"num_classes": 2}]'}, "bad entry for head 'fc'"),
])
def test_bad_head_lists_are_typed_errors_that_say_what_to_do(meta: dict[str, str], message: str) -> None:
    with pytest.raises(HeadError, match=message) as info:
        decode_heads(meta)
    assert str(info.value).endswith("converted model again") or "with this fyc-convert" in str(info.value)
