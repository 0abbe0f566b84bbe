"""Tests of fyc_convert.data: the three formats, splits, normalisation, and each bad-data error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fyc_convert.data import UNLABELLED, check_data, load_data
from fyc_convert.errors import DataError


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _blobs(n=40, dim=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), (np.arange(n) % classes).astype(np.int64)


def _image_folder(root, sizes=None, mode="L"):
    """Two classes ("cat" before "dog" when sorted), three 6x5 images each: pixel value = 40·class + index."""
    for c, name in enumerate(["dog", "cat"]):  # written out of order on purpose
        d = root / name
        d.mkdir(parents=True)
        for i in range(3):
            value = 40 * (1 - c) + i  # "cat" (label 0) gets 0..2, "dog" (label 1) gets 40..42
            size = (sizes or {}).get((name, i), (6, 5))
            Image.new(mode, size, value if mode == "L" else (value,) * 3).save(d / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------ formats


def test_npz_with_seeded_validation_split(tmp_path):
    x, y = _blobs()
    path = _npz(tmp_path / "d.npz", x_train=x, y_train=y)
    a = load_data(path, val_split=0.25, seed=3)
    b = load_data(path, val_split=0.25, seed=3)
    c = load_data(path, val_split=0.25, seed=4)
    assert (len(a.train), len(a.val)) == (30, 10)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])
    # the two splits partition the data
    both = torch.cat([a.train.tensors[0], a.val.tensors[0]])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, torch.from_numpy(x).tolist()))
    assert (a.num_classes, a.input_shape, a.labelled, a.classes) == (4, (6,), True, None)
    assert a.train.tensors[0].dtype == torch.float32 and a.train.tensors[1].dtype == torch.int64


def test_npz_with_its_own_validation_split_and_no_split(tmp_path):
    x, y = _blobs()
    b = load_data(_npz(tmp_path / "d.npz", x_train=x[:30], y_train=y[:30], x_val=x[30:], y_val=y[30:]))
    assert (len(b.train), len(b.val)) == (30, 10)
    assert torch.equal(b.val.tensors[0], torch.from_numpy(x[30:]))
    assert load_data(_npz(tmp_path / "e.npz", x_train=x, y_train=y), val_split=0).val is None


def test_normalisation_per_channel_and_reshape_to_the_input_shape(tmp_path):
    x = np.stack([np.full((2, 3, 3), 10.0), np.full((2, 3, 3), 20.0)]).astype(np.float32)  # (2, 2, 3, 3)
    x[:, 1] += 1.0
    flat = x.reshape(2, -1)  # (2, 18): stored flat, the model wants (2, 3, 3)
    b = load_data(_npz(tmp_path / "d.npz", x_train=flat, y_train=np.array([0, 1])), val_split=0,
                  input_shape=(2, 3, 3), mean=[10.0, 11.0], std=[2.0, 5.0])
    xt = b.train.tensors[0]
    assert b.input_shape == (2, 3, 3)
    assert torch.allclose(xt[0, 0], torch.zeros(3, 3)) and torch.allclose(xt[0, 1], torch.zeros(3, 3))
    assert torch.allclose(xt[1, 0], torch.full((3, 3), 5.0)) and torch.allclose(xt[1, 1], torch.full((3, 3), 2.0))


def test_uint8_inputs_are_scaled_to_unit_range(tmp_path):
    x = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    b = load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1])), val_split=0)
    assert torch.allclose(b.train.tensors[0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))


def test_pt_dict_of_tensors(tmp_path):
    x, y = _blobs(n=10)
    torch.save({"x_train": torch.from_numpy(x), "y_train": torch.from_numpy(y)}, tmp_path / "d.pt")
    b = load_data(tmp_path / "d.pt", val_split=0.2)
    assert (len(b.train), len(b.val), b.num_classes) == (8, 2, 4)


def test_unlabelled_arrays(tmp_path):
    x, _ = _blobs(n=10)
    b = load_data(_npz(tmp_path / "d.npz", x_train=x), val_split=0.2)
    assert not b.labelled and b.num_classes == 0
    assert (b.train.tensors[1] == UNLABELLED).all() and (b.val.tensors[1] == UNLABELLED).all()
    check_data(b, num_classes=3, input_shape=(6,))  # no labels to check


def test_image_folder_sorted_classes_grayscale_and_resize(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    b = load_data(root, val_split=0, input_shape=(1, 4, 4))
    x, y = b.train.tensors
    assert b.classes == ["cat", "dog"] and b.num_classes == 2
    assert x.shape == (6, 1, 4, 4) and b.input_shape == (1, 4, 4)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    # constant images stay constant through the resize: 0, 1, 2 (cat) and 40, 41, 42 (dog), over 255
    assert torch.allclose(x[:, 0, 0, 0] * 255, torch.tensor([0.0, 1, 2, 40, 41, 42]), atol=1e-4)
    check_data(b, num_classes=2, input_shape=(1, 4, 4))


def test_image_folder_rgb_without_shape_and_unlabelled_flat_folder(tmp_path):
    root = _image_folder(tmp_path / "imgs", mode="RGB")
    b = load_data(root, val_split=0)
    assert b.input_shape == (3, 5, 6)  # (C, H, W) of 6-wide, 5-high images
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("L", (4, 4), i).save(flat / f"{i}.png")
    u = load_data(flat, val_split=0, input_shape=(1, 4, 4))
    assert not u.labelled and u.classes is None and len(u.train) == 3


# ------------------------------------------------------------------------------------------ errors


def test_class_count_differs_from_the_head(tmp_path):
    b = load_data(_image_folder(tmp_path / "imgs"), val_split=0, input_shape=(1, 4, 4))
    with pytest.raises(DataError, match="has 2 classes but the model.s classifier has 10 outputs"):
        check_data(b, num_classes=10, input_shape=(1, 4, 4))


def test_class_names_from_the_arrays_must_match_the_head(tmp_path):
    x, y = _blobs()
    b = load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=y, classes=np.array(list("abcd"))))
    assert b.classes == ["a", "b", "c", "d"] and b.num_classes == 4
    check_data(b, num_classes=4, input_shape=(6,))
    with pytest.raises(DataError, match="has 4 classes but the model's classifier has 5 outputs"):
        check_data(b, num_classes=5, input_shape=(6,))


def test_label_out_of_range(tmp_path):
    x, y = _blobs()
    b = load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=y), val_split=0)
    with pytest.raises(DataError, match=r"training label 3 \(sample 3\) is outside 0..2 for a 3-class model"):
        check_data(b, num_classes=3, input_shape=(6,))
    y[5] = -2
    b = load_data(_npz(tmp_path / "e.npz", x_train=x, y_train=y), val_split=0)
    with pytest.raises(DataError, match=r"label -2 \(sample 5\) is outside"):
        check_data(b, num_classes=4, input_shape=(6,))


def test_non_integer_labels(tmp_path):
    x, _ = _blobs(n=4)
    with pytest.raises(DataError, match="non-integer"):
        load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=np.array([0.0, 1.5, 2.0, 0.0])))


def test_input_shape_mismatch(tmp_path):
    x, y = _blobs()
    b = load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=y), input_shape=(1, 8, 8))
    with pytest.raises(DataError, match=r"samples have shape \(6,\) but the model expects \(1, 8, 8\)"):
        check_data(b, num_classes=4, input_shape=(1, 8, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_inputs(tmp_path, bad):
    x, y = _blobs()
    x[7, 2] = bad
    b = load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=y), val_split=0)
    with pytest.raises(DataError, match="training sample 7 contains NaN or inf"):
        check_data(b, num_classes=4, input_shape=(6,))


def test_empty_splits(tmp_path):
    x, y = _blobs()
    b = load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=y, x_val=x[:0], y_val=y[:0]))
    with pytest.raises(DataError, match="the validation split of .* is empty"):
        check_data(b, num_classes=4, input_shape=(6,))
    b = load_data(_npz(tmp_path / "e.npz", x_train=x[:0], y_train=y[:0]))
    with pytest.raises(DataError, match="the training split of .* is empty"):
        check_data(b, num_classes=4, input_shape=(6,))


def test_unreadable_image_names_the_file(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"cannot read image .*dog/broken\.png"):
        load_data(root, input_shape=(1, 4, 4))


def test_images_of_different_sizes_need_an_input_shape(tmp_path):
    root = _image_folder(tmp_path / "imgs", sizes={("dog", 2): (7, 7)})
    with pytest.raises(DataError, match="pass --input-shape"):
        load_data(root)
    assert load_data(root, input_shape=(1, 5, 5), val_split=0).input_shape == (1, 5, 5)


def test_missing_unsupported_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="data not found"):
        load_data(tmp_path / "nope.npz")
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unsupported data format: d.csv"):
        load_data(tmp_path / "d.csv")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read .*bad.npz"):
        load_data(tmp_path / "bad.npz")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_data(tmp_path / "empty_dir")


def test_missing_arrays_and_bad_normalisation(tmp_path):
    x, y = _blobs()
    with pytest.raises(DataError, match="has no 'x_train' \\(keys: x, y\\)"):
        load_data(_npz(tmp_path / "a.npz", x=x, y=y))
    with pytest.raises(DataError, match="only one of x_val/y_val"):
        load_data(_npz(tmp_path / "b.npz", x_train=x, y_train=y, x_val=x))
    with pytest.raises(DataError, match="mean has 4 values but samples have shape \\(6,\\)"):
        load_data(_npz(tmp_path / "c.npz", x_train=x, y_train=y), mean=[0, 0, 0, 0])
    with pytest.raises(DataError, match="std contains 0"):
        load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=y), std=0.0)
    with pytest.raises(DataError, match="one integer label per sample"):
        load_data(_npz(tmp_path / "e.npz", x_train=x, y_train=y[:-1]))
