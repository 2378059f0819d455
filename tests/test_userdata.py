"""A user's own data: IDX folders of any size, .npz/.npy images, torchvision classes on disk,
Fashion-MNIST/KMNIST offline; splits from the data; one-line errors for bad data."""
from __future__ import annotations

import gzip
import json
import sys
import time

import numpy as np
import pytest
import torch

from ppl_vae import cli, data
from ppl_vae.config import Config
from ppl_vae.errors import UserError
from ppl_vae.run import fit_run
from ppl_vae.run_setup import load_splits


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder, n_train=200, n_test=50, h=28, w=28, gz=True, seed=0):
    """MNIST-layout IDX files of random images; returns (train images, train labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, h, w)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, h, w)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for stem, a in arrays.items():
        raw = _idx_bytes(a)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]


def _one_line(e) -> bool:
    return "\n" not in str(e.value) and len(str(e.value)) > 10


# ---------------------------------------------------------------------------------------
# IDX folders
# ---------------------------------------------------------------------------------------
def test_a_users_idx_folder_of_200_rows_loads_with_splits_from_its_size(tmp_path):
    x, y = write_idx_folder(tmp_path / "idx", n_train=200, n_test=50)
    splits = data.load(str(tmp_path / "idx"))
    # 200 training rows: 1/6 validation (33), the file's own 50 test rows
    assert [len(s) for s in splits] == [167, 33, 50]
    assert splits.shape == (1, 28, 28)
    # the rows are the file's rows (permuted with a fixed seed), scaled to [0, 1]
    flat = torch.from_numpy(x.reshape(200, -1).astype(np.float32)) / 255
    both = torch.cat([splits.train.x, splits.valid.x])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, flat.tolist()))
    labels = torch.cat([splits.train.y, splits.valid.y])
    assert sorted(labels.tolist()) == sorted(y.tolist())
    assert torch.equal(data.load(str(tmp_path / "idx")).train.x, splits.train.x)  # seeded


def test_idx_folder_without_test_files_gets_a_seeded_test_fraction(tmp_path):
    write_idx_folder(tmp_path / "idx", n_train=300, gz=False)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / "idx" / stem).unlink()
    splits = data.load(str(tmp_path / "idx"), valid_fraction=0.2, test_fraction=0.1)
    assert [len(s) for s in splits] == [216, 54, 30]


def test_an_empty_folder_names_the_file_it_needs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train-images-idx3-ubyte") as e:
        data.load(str(tmp_path / "empty"))
    assert _one_line(e)


# ---------------------------------------------------------------------------------------
# .npz / .npy
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,expected", [((120, 20, 28), (1, 20, 28)),
                                            ((120, 3, 32, 32), (3, 32, 32)),
                                            ((120, 64), (1, 8, 8)), ((120, 30), (1, 1, 30))])
def test_npz_shapes_travel_with_the_data(tmp_path, shape, expected):
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    splits = data.load(str(tmp_path / "d.npz"))
    assert splits.shape == expected and splits.train.x.shape[1] == int(np.prod(expected))
    assert splits.test.image_shape == expected and splits.valid.image_shape == expected
    assert (splits.train.y == -1).all() and splits.classes is None  # no labels given
    assert [len(s) for s in splits] == [90, 18, 12]  # 10% test, then 1/6 validation


def test_npz_keys_labels_test_split_and_classes(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 20, 28), dtype=np.uint8)
    xt = rng.integers(0, 256, (7, 20, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(60) % 3, x_test=xt, y_test=np.arange(7) % 3,
             classes=np.array(["a", "b", "c"]))
    splits = data.load(str(tmp_path / "d.npz"))
    assert [len(s) for s in splits] == [50, 10, 7]
    assert splits.classes == ("a", "b", "c")
    assert torch.equal(splits.test.x, torch.from_numpy(xt.reshape(7, -1)).float() / 255)
    assert splits.test.y.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert splits.describe() == {"train": 50, "valid": 10, "test": 7, "shape": [1, 20, 28],
                                 "labelled": True, "classes": ["a", "b", "c"]}


def test_npy_file_is_the_images(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((40, 5, 6), dtype=np.uint8))
    assert data.load(str(tmp_path / "d.npy")).shape == (1, 5, 6)


@pytest.mark.parametrize("array,match", [
    (np.full((50, 4, 4), 2.0, np.float32), r"ranges over \[2, 2\].*\[0, 1\]"),
    (np.full((50, 4, 4), -0.5, np.float32), r"\[0, 1\]"),
    (np.full((50, 4, 4), np.nan, np.float32), "NaN"),
    (np.zeros((50, 28, 28, 3), np.uint8), "channel-last"),
    (np.zeros((50, 2, 2, 2, 2), np.uint8), r"\[N, H, W\], \[N, C, H, W\] or \[N, D\]"),
    (np.zeros((50, 4, 4), np.int64), "uint8"),
    (np.zeros((0, 4, 4), np.uint8), "empty"),
])
def test_bad_images_are_one_line_errors(tmp_path, array, match):
    np.savez(tmp_path / "d.npz", x=array)
    with pytest.raises(UserError, match=match) as e:
        data.load(str(tmp_path / "d.npz"))
    assert _one_line(e)


def test_bad_npz_keys_and_labels(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((10, 4, 4), np.uint8))
    with pytest.raises(UserError, match="'x'") as e:
        data.load(str(tmp_path / "a.npz"))
    assert _one_line(e)
    np.savez(tmp_path / "b.npz", x=np.zeros((10, 4, 4), np.uint8), y=np.zeros(9, np.int64))
    with pytest.raises(UserError, match="10 integer labels") as e:
        data.load(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", x=np.zeros((10, 4, 4), np.uint8), x_test=np.zeros((5, 4, 5), np.uint8))
    with pytest.raises(UserError, match="one \\(C, H, W\\)"):
        data.load(str(tmp_path / "c.npz"))
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read") as e:
        data.load(str(tmp_path / "d.npz"))
    assert _one_line(e)


def test_missing_file_and_too_few_rows(tmp_path, capsys):
    with pytest.raises(UserError, match="no file or folder") as e:
        Config(dataset=str(tmp_path / "nope.npz")).validate()
    assert _one_line(e)
    np.savez(tmp_path / "tiny.npz", x=np.zeros((5, 4, 4), np.uint8))
    with pytest.raises(UserError, match="too few"):
        data.load(str(tmp_path / "tiny.npz"))
    np.savez(tmp_path / "small.npz", x=np.zeros((100, 8, 8), np.uint8))
    config = Config(dataset=str(tmp_path / "small.npz"), device="cpu")
    with pytest.raises(UserError, match=r"fewer than batch_size \(--batch-size\) 128"):
        load_splits(config, torch.device("cpu"))
    with pytest.raises(UserError, match="latent_dim \\+ 10"):
        load_splits(config.replace(guide="meanfield", batch_size=10, latent_dim=60),
                    torch.device("cpu"))
    # through the CLI: one line, exit 2, and no run folder left behind
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", str(tmp_path / "small.npz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size" in err
    assert not out.exists()


def test_valid_fraction_is_validated_and_changes_the_split(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((200, 4, 4), np.uint8))
    with pytest.raises(UserError, match="between 0 and 1"):
        Config(valid_fraction=1.5).validate()
    a = data.load(str(tmp_path / "d.npz"), valid_fraction=0.5)
    assert [len(s) for s in a] == [90, 90, 20]


def test_mnist_keeps_its_50k_10k_10k_file_order_split(mnist):
    assert [len(s) for s in mnist] == [50000, 10000, 10000]
    assert mnist.shape == (1, 28, 28) and mnist.classes == tuple("0123456789")


# ---------------------------------------------------------------------------------------
# Fashion-MNIST / KMNIST offline, torchvision classes
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,folder", [("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_builtin_torchvision_sets_fail_fast_naming_the_folder(tmp_path, capsys, name, folder):
    out = tmp_path / "run"
    start = time.perf_counter()
    code = cli.main(["train", "--dataset", name, "--data-dir", str(tmp_path / "data"),
                     "--out", str(out)])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert str(tmp_path / "data" / folder / "raw") in err and "train-images-idx3-ubyte" in err
    assert seconds < 5  # no network attempt
    assert not out.exists()  # no empty run folder


def test_fashion_mnist_loads_from_its_raw_folder(tmp_path):
    x, _ = write_idx_folder(tmp_path / "FashionMNIST" / "raw", n_train=120, n_test=30)
    splits = data.load("fashion_mnist", tmp_path)
    assert [len(s) for s in splits] == [100, 20, 30]
    assert splits.classes[0] == "T-shirt/top" and splits.shape == (1, 28, 28)
    # built-in sets keep file order: the first 100 rows train
    assert torch.equal(splits.train.x, torch.from_numpy(x[:100].reshape(100, -1)).float() / 255)


def test_torchvision_class_by_name_from_files_on_disk(tmp_path):
    write_idx_folder(tmp_path / "FashionMNIST" / "raw", n_train=120, n_test=30, gz=False)
    splits = data.load("torchvision:FashionMNIST", tmp_path)
    assert [len(s) for s in splits] == [100, 20, 30]
    assert splits.classes[-1] == "Ankle boot"
    with pytest.raises(UserError, match="could not load") as e:
        data.load("torchvision:KMNIST", tmp_path)
    assert _one_line(e)
    with pytest.raises(UserError, match="no class 'Nope'"):
        data.load("torchvision:Nope", tmp_path)


def test_train_on_an_npz_records_the_data_in_config_json(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).integers(0, 256, (150, 20, 28), dtype=np.uint8))
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", str(tmp_path / "d.npz"), "--epochs", "1",
                     "--batch-size", "32", "--latent-dim", "4", "--hidden", "16", "--device",
                     "cpu", "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["data"] == {"train": 113, "valid": 22, "test": 15, "shape": [1, 20, 28],
                              "labelled": False, "classes": None}
    assert record["command"] == sys.argv  # the process's command line (here: pytest's)
    assert record["versions"]["git_dirty"] in (True, False, None)
