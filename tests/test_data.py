"""data.py: what the loader returns (keys, dtypes, scaling, labels, subset), that shuffling is
seeded and replayable, and that every bad file gives its own one-line error."""
import numpy as np
import pytest
import torch

import data
from system import errors
from conftest import write_npz
from system.errors import UserError

BLOOD = data.Dataset()  # the default: BloodMNIST at 64


def test_loads_splits_with_labels(data_root):
    splits = data.load(BLOOD, data_root)
    assert set(splits) == {"train", "val", "test"}
    assert splits["train"].images.shape == (64, 64, 64, 3) and splits["train"].images.dtype == np.uint8
    assert splits["train"].labels.shape == (64,) and splits["train"].labels.dtype == np.int64
    assert len(splits["val"]) == len(splits["test"]) == 16
    assert data.load(BLOOD, data_root / BLOOD.filename, splits=("val",)).keys() == {"val"}


def test_subset_keeps_first_training_images(data_root):
    full = data.load(BLOOD, data_root)["train"]
    sub = data.load(BLOOD, data_root, subset=10)["train"]
    assert len(sub) == 10 and np.array_equal(sub.images, full.images[:10])


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_batches_scale_and_carry_labels(data_root, value_range):
    split = data.load(BLOOD, data_root)["train"]
    batches = data.Batches(split, 16, "cpu", value_range, shuffle=False)
    x, y = next(batches.epoch(0))
    assert x.shape == (16, 3, 64, 64) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(split.labels[:16]))
    expected = torch.from_numpy(split.images[:16]).permute(0, 3, 1, 2).float() / 255
    lo, hi = value_range
    torch.testing.assert_close(x, lo + (hi - lo) * expected)
    assert torch.equal(data.to_uint8(x, value_range), torch.from_numpy(split.images[:16]).permute(0, 3, 1, 2))


def test_shuffling_is_seeded_and_replayable(data_root):
    split = data.load(BLOOD, data_root)["train"]
    a = data.Batches(split, 16, "cpu", (0, 1), seed=0)
    b = data.Batches(split, 16, "cpu", (0, 1), seed=0)
    c = data.Batches(split, 16, "cpu", (0, 1), seed=1)
    labels = lambda batches, epoch, start=0: torch.cat([y for _, y in batches.epoch(epoch, start)])
    assert len(a) == 4
    assert torch.equal(labels(a, 3), labels(b, 3))  # same seed and epoch: same order
    assert not torch.equal(labels(a, 0), labels(a, 1))  # a new order each epoch
    assert not torch.equal(labels(a, 0), labels(c, 0))  # another seed, another order
    assert torch.equal(labels(a, 2, start=2), labels(a, 2)[32:])  # the rest of an epoch replays
    assert sorted(a.order(5).tolist()) == list(range(64))  # a permutation: every image once


def test_small_split_gives_one_batch_and_eval_keeps_remainder(data_root):
    split = data.load(BLOOD, data_root, subset=5)["train"]
    assert [x.shape[0] for x, _ in data.Batches(split, 16, "cpu", (0, 1)).epoch(0)] == [5]
    val = data.load(BLOOD, data_root)["val"]
    assert [x.shape[0] for x, _ in data.Batches(val, 6, "cpu", (0, 1), shuffle=False).epoch(0)] == [6, 6, 4]


imgs = np.zeros((4, 64, 64, 3), np.uint8)
BAD_FILES = {
    "missing key": ({"val_labels": None}, "lacks val_labels"),
    "float images": ({"train_images": imgs.astype(np.float32)}, "dtype float32, expected uint8"),
    "28x28 images": ({"train_images": np.zeros((4, 28, 28, 3), np.uint8),
                      "train_labels": np.zeros((4, 1), np.uint8)}, "expected (N, 64, 64, 3)"),
    "grey images": ({"train_images": np.zeros((4, 64, 64), np.uint8),
                     "train_labels": np.zeros((4, 1), np.uint8)}, "expected (N, 64, 64, 3)"),
    "label count": ({"train_images": imgs, "train_labels": np.zeros((5, 1), np.uint8)}, "expected (4, 1)"),
    "label range": ({"train_images": imgs, "train_labels": np.array([[0], [3], [8], [1]])}, "expected 0..7"),
    "negative label": ({"train_images": imgs, "train_labels": np.array([[0], [-1], [2], [1]])}, "expected 0..7"),
    "float labels": ({"train_images": imgs, "train_labels": np.zeros((4, 1), np.float32)}, "expected integers"),
    "no training images": ({"train_images": imgs[:0], "train_labels": np.zeros((0, 1), np.uint8)}, "no training images"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_gives_clear_error(tmp_path, case):
    override, message = BAD_FILES[case]
    path = write_npz(tmp_path / "bloodmnist_64.npz", **override)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        data.load(BLOOD, tmp_path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04truncated"])
def test_unreadable_file_gives_clear_error(tmp_path, content):
    (tmp_path / "bloodmnist_64.npz").write_bytes(content)
    with pytest.raises(UserError, match="is not an .npz file|is damaged"):
        data.load(BLOOD, tmp_path)


def test_unofficial_md5_warns_once_and_loads(data_root, capsys, monkeypatch):
    monkeypatch.setattr(errors, "warned", set())  # as in a fresh process
    data.load(BLOOD, data_root)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "not the official" in err and BLOOD.md5 in err
    data.load(BLOOD, data_root)  # evaluate.py reads the file twice: one warning is enough
    assert capsys.readouterr().err == ""


def test_missing_file_without_network_says_what_to_do(tmp_path, monkeypatch):
    def no_network(url, root, filename, md5):
        (tmp_path / "root" / filename).write_bytes(b"half a download")
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr("torchvision.datasets.utils.download_url", no_network)
    with pytest.raises(UserError) as e:
        data.load(BLOOD, tmp_path / "root")
    message = str(e.value)
    for part in (str(tmp_path / "root" / "bloodmnist_64.npz"), BLOOD.url, BLOOD.md5, "--data-root",
                 "name resolution"):
        assert part in message
    assert "\n" not in message
    assert list((tmp_path / "root").iterdir()) == []  # the partial download was removed


def test_missing_npz_path_is_not_made_a_folder(tmp_path):
    with pytest.raises(UserError, match="not found; --data-root takes an existing .npz file"):
        data.load(BLOOD, tmp_path / "synthetic.npz")
    assert not (tmp_path / "synthetic.npz").exists()


def test_download_lands_under_the_real_name(tmp_path, monkeypatch):
    def fake_download(url, root, filename, md5):
        assert url == BLOOD.url and md5 == BLOOD.md5
        assert filename != BLOOD.filename  # written aside first, renamed when complete
        write_npz(tmp_path / "root" / filename)
    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download)
    splits = data.load(BLOOD, tmp_path / "root")
    assert len(splits["train"]) == 64
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["bloodmnist_64.npz"]


def test_class_names():
    names = BLOOD.class_names
    assert len(names) == 8 and names[0] == "basophil" and names[3] == "immature granulocytes"
