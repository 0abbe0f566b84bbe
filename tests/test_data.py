"""Tests of fyc_convert.data.datasets: arrays, memory-mapped .npy folders, image folders (both layouts), splits,
preprocessing, augmentation, bad files, and each bad-data error."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from image_folders import level, write_class_folders
from PIL import Image

from fyc_convert.data.datasets import (
    UNLABELLED,
    DataOptions,
    ImageFolderDataset,
    NpyDataset,
    check_data,
    load_data,
)
from fyc_convert.data.loader import make_loader
from fyc_convert.data.transforms import EvalTransform, TrainTransform
from fyc_convert.errors import DataError

CPU = torch.device("cpu")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _blobs(n=40, dim=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), (np.arange(n) % classes).astype(np.int64)


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


# ------------------------------------------------------------------------------------------ errors


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
    with pytest.raises(DataError, match="contains a value <= 0; pass a positive --std"):
        load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=y), std=0.0)
    with pytest.raises(DataError, match="one integer label per sample"):
        load_data(_npz(tmp_path / "e.npz", x_train=x, y_train=y[:-1]))


# ------------------------------------------------------------------------------------------ image folders


def _batches(ds, *, workers=0, shuffle=False, epoch=0, batch_size=64):
    """All of a dataset through the loader: (x, y) concatenated."""
    stream = make_loader(ds, batch_size=batch_size, device=CPU, workers=workers, shuffle=shuffle)
    stream.set_epoch(epoch)
    xs, ys = zip(*stream)
    return torch.cat(xs), torch.cat(ys)


def _reference_listing(root):
    """torchvision's order, written out independently: classes sorted; per class sorted os.walk, files sorted."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    out = []
    for c, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name)):
            out += [(os.path.relpath(os.path.join(dirpath, f), root), c) for f in sorted(files)
                    if f.lower().endswith((".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"))]
    return classes, out


def _messy_folder(root):
    """Three classes written out of order, a nested folder, upper-case and mixed extensions, files to ignore."""
    write_class_folders(root, ["dog", "cat", "emu"], 3, ext=".png")
    (root / "cat" / "sub").mkdir()
    Image.new("RGB", (12, 10), (1, 1, 1)).save(root / "cat" / "sub" / "a.JPG")
    Image.new("RGB", (12, 10), (2, 2, 2)).save(root / "cat" / "B.jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "loose.png").write_bytes((root / "cat" / "B.jpeg").read_bytes())  # top-level files are not samples
    return root


def test_image_folder_labels_and_order_match_a_reference_listing(tmp_path):
    root = _messy_folder(tmp_path / "imgs")
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    b = load_data(root, val_split=0, input_shape=(3, 8, 8))
    classes, listing = _reference_listing(root)
    assert b.classes == classes == ["cat", "dog", "emu"] and b.num_classes == 3
    assert [os.path.relpath(f, root) for f in b.train.files()] == [p for p, _ in listing]
    assert b.train.labels.tolist() == [c for _, c in listing]
    assert [p for p, _ in listing][:5] == ["cat/B.jpeg", "cat/img_000.png", "cat/img_001.png", "cat/img_002.png",
                                            "cat/sub/a.JPG"]
    assert (b.kind, b.labelled, b.val, b.input_shape) == ("images", True, None, (3, 8, 8))
    check_data(b, num_classes=3, input_shape=(3, 8, 8))


def test_image_folder_matches_torchvision_imagefolder(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    root = _messy_folder(tmp_path / "imgs")
    ref = datasets.ImageFolder(str(root))
    b = load_data(root, val_split=0, input_shape=(3, 8, 8))
    assert b.classes == ref.classes
    assert list(zip(b.train.files(), b.train.labels.tolist())) == [(p, c) for p, c in ref.samples]


def test_pixels_come_through_resized_cropped_and_normalised(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root, ["a", "b"], 3, size=(20, 14), mode="L")
    b = load_data(root, val_split=0, input_shape=(1, 8, 8), mean=(0.5,), std=(0.25,), augment=False)
    assert isinstance(b.train, ImageFolderDataset) and b.train_eval is None
    raw, label = b.train[4]
    assert raw.dtype == torch.uint8 and raw.shape == (1, 8, 8) and label == 1
    x, y = _batches(b.train)
    assert x.dtype == torch.float32 and x.shape == (6, 1, 8, 8)
    want = torch.tensor([level(c, i) for c in range(2) for i in range(3)], dtype=torch.float32)
    torch.testing.assert_close(x[:, 0, 3, 3], (want / 255 - 0.5) / 0.25)  # constant images stay constant
    assert y.tolist() == [0, 0, 0, 1, 1, 1]


def test_input_shape_from_the_first_image_and_other_sizes_resized_to_it(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root, ["a", "b"], 2, size=(9, 7), mode="L")
    Image.new("L", (30, 30), 200).save(root / "b" / "z_big.png")
    b = load_data(root, val_split=0)
    assert b.input_shape == (1, 7, 9)  # (C, H, W): grey, 9 wide and 7 high
    assert b.preprocessing.sources["input_shape"] == "data"
    x, _ = _batches(b.train)
    assert x.shape == (5, 1, 7, 9) and torch.allclose(x[-1], torch.full((1, 7, 9), 200 / 255))
    rgb = tmp_path / "rgb"
    write_class_folders(rgb, ["a"], 1, size=(6, 5))
    assert load_data(rgb, val_split=0).input_shape == (3, 5, 6)


def test_seeded_val_split_of_a_class_folder(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root, ["a", "b", "c"], 10)
    a = load_data(root, val_split=0.2, seed=1, input_shape=(3, 4, 4))
    again = load_data(root, val_split=0.2, seed=1, input_shape=(3, 4, 4))
    other = load_data(root, val_split=0.2, seed=2, input_shape=(3, 4, 4))
    assert (len(a.train), len(a.val)) == (24, 6)
    assert a.val.files() == again.val.files() != other.val.files()
    assert sorted(a.train.files() + a.val.files()) == sorted(load_data(root, val_split=0, input_shape=(3, 4, 4))
                                                             .train.files())


@pytest.mark.parametrize("held_out", ["val", "validation", "test"])
def test_train_and_held_out_folders_are_the_split(tmp_path, held_out):
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["b", "a", "c"], 4)
    write_class_folders(root / held_out, ["c", "a"], 2, start=50)  # the held-out split may lack a class
    b = load_data(root, val_split=0.3, input_shape=(3, 4, 4))  # val_split is not used: the folder has its split
    assert b.classes == ["a", "b", "c"]  # not ["train", "val"]
    assert len(b.train) == 12 and len(b.val) == 4
    assert [os.path.relpath(f, root) for f in b.val.files()] == [f"{held_out}/a/img_050.png",
                                                                 f"{held_out}/a/img_051.png",
                                                                 f"{held_out}/c/img_050.png",
                                                                 f"{held_out}/c/img_051.png"]
    assert b.val.labels.tolist() == [0, 0, 2, 2]  # labels by the training split's classes
    x, y = _batches(b.val)
    assert y.tolist() == [0, 0, 2, 2]
    assert torch.allclose(x[:, 0, 0, 0] * 255, torch.tensor([level(0, 50), level(0, 51), level(1, 50),
                                                              level(1, 51)], dtype=torch.float32), atol=1e-3)


def test_val_is_preferred_and_a_train_folder_alone_gets_a_seeded_split(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["a", "b"], 5)
    write_class_folders(root / "test", ["a", "b"], 1, start=90)
    write_class_folders(root / "val", ["a", "b"], 2, start=50)
    assert all("/val/" in f for f in load_data(root, input_shape=(3, 4, 4)).val.files())
    alone = tmp_path / "alone"
    write_class_folders(alone / "train", ["a", "b"], 5)
    b = load_data(alone, val_split=0.2, input_shape=(3, 4, 4))
    assert b.classes == ["a", "b"] and (len(b.train), len(b.val)) == (8, 2)


def test_a_class_list_gives_the_order(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["n02", "n01"], 2)
    write_class_folders(root / "val", ["n02", "n01"], 1)
    (root / "classes.txt").write_text("n02 goldfish, Carassius auratus\nn01 tench, Tinca tinca\n\nn03 unseen\n")
    b = load_data(root, input_shape=(3, 4, 4))
    assert b.classes == ["n02", "n01", "n03"] and b.num_classes == 3  # a listed class may have no images
    assert [os.path.basename(os.path.dirname(f)) for f in b.train.files()] == ["n02", "n02", "n01", "n01"]
    assert b.train.labels.tolist() == [0, 0, 1, 1] and b.val.labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="has 3 classes but the model's classifier has 2 outputs"):
        check_data(b, num_classes=2)
    (root / "classes.txt").write_text("n02\n")
    with pytest.raises(DataError, match=r"class folders not in .*classes.txt: n01; add them to the list"):
        load_data(root, input_shape=(3, 4, 4))
    (root / "classes.txt").write_text("n02\nn01\nn02\n")
    with pytest.raises(DataError, match="names n02 more than once"):
        load_data(root, input_shape=(3, 4, 4))


def test_a_held_out_class_the_training_split_lacks(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["a", "b"], 2)
    write_class_folders(root / "val", ["a", "zebra"], 1)
    with pytest.raises(DataError, match=r"/val has class folders the training split does not have: zebra"):
        load_data(root, input_shape=(3, 4, 4))


def test_flat_folder_is_unlabelled(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("L", (4, 4), i).save(flat / f"{i}.png")
    u = load_data(flat, val_split=0, input_shape=(1, 4, 4))
    assert not u.labelled and u.classes is None and u.num_classes == 0 and len(u.train) == 3
    assert _batches(u.train)[1].tolist() == [UNLABELLED] * 3


def test_class_count_differs_from_the_head(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root, ["cat", "dog"], 2)
    b = load_data(root, val_split=0, input_shape=(1, 4, 4))
    with pytest.raises(DataError, match="has 2 classes but the model.s classifier has 10 outputs"):
        check_data(b, num_classes=10, input_shape=(1, 4, 4))


# ------------------------------------------------------------------------------------------ augmentation


def _gradient_folder(root, n=4):
    """Images with structure (a horizontal ramp), so crops and flips change the pixels."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            ramp = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
            Image.fromarray(np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 40 * i)], -1)).save(root / c / f"{i}.png")
    return root


def test_augmentation_on_by_default_for_images_and_off_with_the_option(tmp_path):
    root = _gradient_folder(tmp_path / "imgs")
    on = load_data(root, val_split=0.25, input_shape=(3, 16, 16))
    assert on.preprocessing.augment is True and on.preprocessing.sources["augment"] == "default (image folder)"
    assert isinstance(on.train.transform, TrainTransform)
    assert isinstance(on.train_eval.transform, EvalTransform) and isinstance(on.val.transform, EvalTransform)
    assert on.train_eval.files() == on.train.files()
    e0, e0_again, e1 = (_batches(on.train, shuffle=True, epoch=e)[0] for e in (0, 0, 1))
    assert torch.equal(e0, e0_again)  # the same epoch draws the same crops
    assert not torch.equal(e0, e1)  # another epoch other crops (and order)
    plain = _batches(on.train_eval)[0]
    assert not torch.equal(_batches(on.train)[0], plain)  # unshuffled, still augmented (seeded by index)

    off = load_data(root, val_split=0.25, input_shape=(3, 16, 16), augment=False)
    assert off.preprocessing.sources["augment"] == "option" and off.train_eval is None
    assert isinstance(off.train.transform, EvalTransform)
    assert torch.equal(_batches(off.train)[0], plain)
    meta = load_data(root, val_split=0.25, input_shape=(3, 16, 16), meta={"augment": False})
    assert meta.preprocessing.augment is False and meta.preprocessing.sources["augment"] == "checkpoint meta"


def test_augmented_epochs_are_the_same_with_any_number_of_workers(tmp_path):
    root = _gradient_folder(tmp_path / "imgs", n=6)
    b = load_data(root, val_split=0, input_shape=(3, 16, 16))
    x0, y0 = _batches(b.train, shuffle=True, epoch=3, batch_size=5, workers=0)
    x2, y2 = _batches(b.train, shuffle=True, epoch=3, batch_size=5, workers=2)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_arrays_are_not_augmented(tmp_path):
    x, y = _blobs()
    b = load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=y), meta={"augment": True})
    assert b.preprocessing.augment is False
    with pytest.raises(DataError, match="augmentation applies to image folders"):
        load_data(tmp_path / "d.npz", augment=True)


# ------------------------------------------------------------------------------------------ bad images


def _with_corrupt_file(root):
    write_class_folders(root, ["a", "b"], 4)
    bad = root / "b" / "img_001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return bad


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_names_itself_in_one_line(tmp_path, workers):
    bad = _with_corrupt_file(tmp_path / "imgs")
    b = load_data(tmp_path / "imgs", val_split=0, input_shape=(3, 4, 4))  # lazy: indexing does not decode
    with pytest.raises(DataError) as err:
        _batches(b.train, workers=workers, batch_size=3)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert message.startswith(f"cannot read image {bad}: ")
    assert message.endswith("fix or remove the file, or pass --skip-bad-images to skip such files")


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_images_skips_and_counts(tmp_path, workers):
    bad = _with_corrupt_file(tmp_path / "imgs")
    b = load_data(tmp_path / "imgs", val_split=0.25, seed=0, input_shape=(3, 4, 4), skip_bad_images=True)
    n = len(b.train) + len(b.val)
    x_train, _ = _batches(b.train, workers=workers, batch_size=3)
    x_val, _ = _batches(b.val, workers=workers, batch_size=3)
    assert len(x_train) + len(x_val) == n - 1
    assert b.skipped_images() == [str(bad)] and b.summary()["skipped_images"] == 1


def test_a_corrupt_first_image_when_the_shape_comes_from_it(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root, ["a"], 2)
    (root / "a" / "img_000.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"cannot read image .*a/img_000\.png"):
        load_data(root)
    assert load_data(root, skip_bad_images=True).input_shape == (3, 10, 12)


# ------------------------------------------------------------------------------------------ .npy folders


def _npy_folder(root, *, n=30, val=False, labels=True, dtype=np.uint8):
    root.mkdir()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 1, 4, 4)).astype(dtype)
    y = (np.arange(n) % 3).astype(np.int64)
    np.save(root / "x_train.npy", x)
    if labels:
        np.save(root / "y_train.npy", y)
    if val:
        np.save(root / "x_val.npy", x[:6])
        np.save(root / "y_val.npy", y[:6])
    return x, y


def test_npy_folder_is_memory_mapped_and_streams(tmp_path):
    x, y = _npy_folder(tmp_path / "arrays")
    b = load_data(tmp_path / "arrays", val_split=0.2, seed=0, input_shape=(16,), mean=(0.5,), std=(0.5,))
    assert b.kind == "npy" and isinstance(b.train, NpyDataset) and (len(b.train), len(b.val)) == (24, 6)
    assert b.input_shape == (16,) and b.num_classes == 3 and b.labelled
    assert b.train._x is None  # nothing read until a sample is
    b.train[0]
    assert isinstance(b.train._x, np.memmap) and b.train._x.base is not None
    # the same samples, values and split as the in-memory .npz path
    eager = load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=y), val_split=0.2, seed=0, input_shape=(16,),
                      mean=(0.5,), std=(0.5,))
    for split in ("train", "val"):
        xs, ys = _batches(getattr(b, split))
        ex, ey = getattr(eager, split).tensors
        order = torch.argsort(ex[:, 0] * 1e6 + ex[:, 1] * 1e3 + ex[:, 2])
        mine = torch.argsort(xs[:, 0] * 1e6 + xs[:, 1] * 1e3 + xs[:, 2])
        torch.testing.assert_close(xs[mine], ex[order])
        assert torch.equal(ys[mine], ey[order])
    check_data(b, num_classes=3, input_shape=(16,))


def test_npy_folder_with_its_own_val_split_float_data_and_no_labels(tmp_path):
    _npy_folder(tmp_path / "a", val=True)
    b = load_data(tmp_path / "a")
    assert (len(b.train), len(b.val), b.input_shape) == (30, 6, (1, 4, 4))
    x, _ = _npy_folder(tmp_path / "f", dtype=np.float32, labels=False)
    u = load_data(tmp_path / "f", val_split=0)
    assert not u.labelled and u.num_classes == 0
    xs, ys = _batches(u.train)
    torch.testing.assert_close(xs, torch.from_numpy(x))  # float data: not scaled by 1/255
    assert (ys == UNLABELLED).all()
    (tmp_path / "f" / "classes.txt").write_text("golden retriever\ntabby cat\n")
    assert load_data(tmp_path / "f").classes == ["golden retriever", "tabby cat"]


def test_streaming_labels_are_checked_without_decoding(tmp_path):
    _npy_folder(tmp_path / "a")  # labels 0..2
    b = load_data(tmp_path / "a", val_split=0)
    with pytest.raises(DataError, match=r"training label 2 \(sample 2\) is outside 0..1 for a 2-class model"):
        check_data(b, num_classes=2)
    with pytest.raises(DataError, match=r"samples have shape \(1, 4, 4\) but the model expects \(1, 8, 8\)"):
        check_data(b, num_classes=3, input_shape=(1, 8, 8))


def test_npy_nan_row_and_bad_files(tmp_path):
    x, _ = _npy_folder(tmp_path / "n", dtype=np.float32)
    x[7, 0, 1, 1] = np.nan
    np.save(tmp_path / "n" / "x_train.npy", x)
    b = load_data(tmp_path / "n", val_split=0, skip_bad_images=True)  # not an image: never skipped
    with pytest.raises(DataError, match=r"x_train.npy sample 7 contains NaN or inf; clean the data"):
        _batches(b.train, workers=1)
    (tmp_path / "n" / "y_train.npy").write_bytes(b"nonsense")
    with pytest.raises(DataError, match=r"cannot read .*y_train.npy"):
        load_data(tmp_path / "n")
    np.save(tmp_path / "n" / "y_train.npy", np.arange(29))
    with pytest.raises(DataError, match=r"y_train has shape \(29,\) for 30 samples"):
        load_data(tmp_path / "n")


def test_loader_options_are_recorded(tmp_path):
    x, y = _blobs()
    b = load_data(_npz(tmp_path / "d.npz", x_train=x, y_train=y), DataOptions(workers=3, val_split=0.5))
    assert b.workers == 3 and len(b.val) == 20
    assert load_data(tmp_path / "d.npz").workers == 0  # in memory: no workers by default
    root = tmp_path / "imgs"
    write_class_folders(root, ["a"], 2)
    assert load_data(root).workers >= 1
    with pytest.raises(DataError, match="workers must be >= 0"):
        load_data(root, workers=-1)
    with pytest.raises(TypeError, match="unknown data options: colour"):
        load_data(root, colour=True)
