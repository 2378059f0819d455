"""ppl_vae.data: the IDX reader, the shipped MNIST, splits, binarization and a user's own
data."""
from __future__ import annotations

import gzip
import json
import sys
import time

import numpy as np
import pytest
import torch

from ppl_vae import batching, cli, data
from ppl_vae.config import Config
from ppl_vae.errors import UserError
from ppl_vae.run_setup import load_splits

from conftest import random_split


RAW = data.PACKAGE_DATA / "MNIST" / "raw"

# The well-known MNIST label counts.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _one_line(e: BaseException) -> bool:
    return "\n" not in str(e) and len(str(e)) > 0


# ---------------------------------------------------------------------------------------
# IDX reader
# ---------------------------------------------------------------------------------------
def test_read_shipped_labels_with_md5():
    train = data.read_idx(RAW / "train-labels-idx1-ubyte.gz", data.MNIST_FILES["train-labels-idx1-ubyte"])
    test = data.read_idx(RAW / "t10k-labels-idx1-ubyte.gz", data.MNIST_FILES["t10k-labels-idx1-ubyte"])
    assert train.shape == (60000,) and test.shape == (10000,)
    assert train.dtype == np.uint8
    assert np.bincount(train).tolist() == TRAIN_COUNTS
    assert np.bincount(test).tolist() == TEST_COUNTS
    assert train[0] == 5 and test[0] == 7  # the famous first digits


def test_read_shipped_test_images_with_md5():
    x = data.read_idx(RAW / "t10k-images-idx3-ubyte.gz", data.MNIST_FILES["t10k-images-idx3-ubyte"])
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert x.max() == 255 and x.min() == 0
    # MNIST digits are centred in a 20x20 box: the border is (nearly) blank
    assert x[:, 0, :].sum() == 0
    assert x[:, :, 0].mean() < 0.01 * x[:, :, 14].mean()


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x0C, ">i4"), (0x0D, ">f4")])
def test_read_idx_handmade(tmp_path, code, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - (0 if code == 0x08 else 7)).astype(dtype)
    raw = _idx_bytes(array, code)
    plain = tmp_path / "a-idx"
    plain.write_bytes(raw)
    zipped = tmp_path / "a-idx.gz"
    zipped.write_bytes(gzip.compress(raw))
    import hashlib
    for path in (plain, zipped):
        out = data.read_idx(path, hashlib.md5(raw).hexdigest())
        assert out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, array)


def test_read_idx_errors(tmp_path):
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    raw = _idx_bytes(array, 0x08)
    truncated = tmp_path / "trunc"
    truncated.write_bytes(raw[:-1])
    with pytest.raises(UserError, match="truncated") as e:
        data.read_idx(truncated)
    assert _one_line(e.value)
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(UserError, match="magic") as e:
        data.read_idx(bad_magic)
    assert _one_line(e.value)
    with pytest.raises(UserError, match="cannot read") as e:
        data.read_idx(tmp_path / "missing.gz")
    assert _one_line(e.value)


def test_corrupted_copy_raises_one_line_user_error(tmp_path):
    """A copy whose uncompressed bytes differ in one byte fails the md5 check."""
    stem = "t10k-labels-idx1-ubyte"
    raw = bytearray(gzip.decompress((RAW / f"{stem}.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # still a valid label, only the checksum can tell
    bad = tmp_path / f"{stem}.gz"
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(UserError, match="corrupt") as e:
        data.read_idx(bad, data.MNIST_FILES[stem])
    assert _one_line(e.value)
    # the same through load(): a folder with one corrupted and three good files
    for other in data.MNIST_FILES:
        if other != stem:
            (tmp_path / f"{other}.gz").symlink_to(RAW / f"{other}.gz")
    with pytest.raises(UserError, match="corrupt") as e:
        data.load("mnist", tmp_path)
    assert _one_line(e.value)


def test_truncated_gzip_and_missing_files_raise_user_error(tmp_path):
    stem = "train-images-idx3-ubyte"
    blob = (RAW / f"{stem}.gz").read_bytes()
    (tmp_path / f"{stem}.gz").write_bytes(blob[: len(blob) // 50])
    with pytest.raises(UserError) as e:
        data.read_idx(tmp_path / f"{stem}.gz", data.MNIST_FILES[stem])
    assert _one_line(e.value)
    with pytest.raises(UserError, match="not found") as e:
        data.load("mnist", tmp_path / "empty")
    assert _one_line(e.value)


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="unknown dataset"):
        data.load("cifar")
    s = data.Split(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(UserError, match="unknown split"):
        data.Splits(s, s, s).get("training")


# ---------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------
def test_splits_are_50k_10k_10k_and_exactly_the_idx_files(mnist):
    assert [len(mnist.train), len(mnist.valid), len(mnist.test)] == [50000, 10000, 10000]
    for split in mnist:
        assert split.x.shape[1] == 784 and split.x.dtype == torch.float32
        assert split.y.dtype == torch.long
        assert float(split.x.min()) == 0.0 and float(split.x.max()) == 1.0
    images = data.read_idx(RAW / "train-images-idx3-ubyte.gz", data.MNIST_FILES["train-images-idx3-ubyte"])
    labels = data.read_idx(RAW / "train-labels-idx1-ubyte.gz")
    flat = torch.from_numpy(images.reshape(60000, 784).astype(np.float32)) / 255.0
    # first 50k -> train, last 10k -> valid, in file order (deterministic, no shuffling)
    assert torch.equal(mnist.train.x, flat[:50000])
    assert torch.equal(mnist.valid.x, flat[50000:])
    assert torch.equal(mnist.train.y, torch.from_numpy(labels[:50000].astype(np.int64)))
    assert torch.equal(mnist.valid.y, torch.from_numpy(labels[50000:].astype(np.int64)))
    counts = (torch.bincount(mnist.train.y, minlength=10) + torch.bincount(mnist.valid.y, minlength=10))
    assert counts.tolist() == TRAIN_COUNTS
    assert torch.bincount(mnist.test.y).tolist() == TEST_COUNTS
    # pixel values are k / 255 exactly
    k = mnist.test.x[:100] * 255
    assert torch.allclose(k, k.round(), atol=1e-4)


def test_splits_deterministic_between_loads(mnist):
    again = data.load("mnist")
    for a, b in zip(mnist, again):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


# ---------------------------------------------------------------------------------------
# minibatches
# ---------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------
# binarization
# ---------------------------------------------------------------------------------------
def test_binarize_none_is_identity():
    x = torch.rand(4, 6)
    assert torch.equal(data.Binarize("none")(x), x)
    split = data.Split(x, torch.zeros(4, dtype=torch.long))
    assert data.Binarize("none").prepare(split, 0) is split
    assert data.Binarize("dynamic").prepare(split, 0) is split


def test_binarize_unknown_mode():
    with pytest.raises(UserError, match="unknown binarization"):
        data.Binarize("threshold")


def test_static_binarization_is_a_deterministic_bernoulli_draw():
    n, d = 4000, 8
    p = torch.linspace(0.05, 0.95, d)
    split = data.Split(p.expand(n, d).clone(), torch.zeros(n, dtype=torch.long))
    a = data.Binarize("static").prepare(split, seed=7)
    b = data.Binarize("static").prepare(split, seed=7)
    c = data.Binarize("static").prepare(split, seed=8)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert torch.equal(a.y, split.y)
    assert set(a.x.unique().tolist()) <= {0.0, 1.0}
    # mean of each column ~ its intensity: within 4 binomial standard errors
    se = (p * (1 - p) / n).sqrt()
    assert ((a.x.mean(0) - p).abs() < 4 * se).all()
    # static: calling the binarizer on the prepared rows leaves them unchanged
    assert torch.equal(data.Binarize("static")(a.x), a.x)
    # the global RNG is untouched by a seeded static draw
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    data.static_binarize(split, 1)
    assert torch.equal(torch.rand(3), before)


def test_dynamic_binarization_mean_matches_intensity():
    n, d = 5000, 6
    p = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
    x = p.expand(n, d).clone()
    binarize = data.Binarize("dynamic", torch.Generator().manual_seed(0))
    first = binarize(x)
    second = binarize(x)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)  # fresh draw every call
    se = (p * (1 - p) / n).sqrt()
    assert ((first.mean(0) - p).abs() <= 4 * se + 1e-7).all()
    assert torch.equal(first[:, 0], torch.zeros(n)) and torch.equal(first[:, -1], torch.ones(n))
    # same generator seed -> same draws
    again = data.Binarize("dynamic", torch.Generator().manual_seed(0))(x)
    assert torch.equal(first, again)


def test_dynamic_minibatches_on_real_pixels(mnist):
    """Averaged over many draws, a dynamically binarized batch recovers the grayscale image."""
    split = data.Split(mnist.train.x[:20], mnist.train.y[:20])
    binarize = data.Binarize("dynamic", torch.Generator().manual_seed(0))
    draws = torch.stack([next(iter(batching.minibatches(split, 20, binarize, shuffle=False))).x
                         for _ in range(400)])
    p = split.x
    se = (p * (1 - p) / 400).sqrt()
    assert ((draws.mean(0) - p).abs() <= 5 * se + 1e-6).all()


def test_read_idx_truncated_header_is_a_user_error(tmp_path):
    path = tmp_path / "short-idx"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big"))  # 3 dims, 1 given
    with pytest.raises(UserError):
        data.read_idx(path)


def test_training_rows_are_scored_on_the_pixels_the_model_trained_on():
    """Gap rows of the training set: under static binarization the very draw the run trained
    on (a different draw of the same images would be held-out data to the model)."""
    from ppl_vae.config import Config
    from ppl_vae.heldout import eval_pixels, train_pixels
    split = random_split(50, 6)
    static = Config(binarize="static", seed=5)
    trained_on = data.Binarize("static").prepare(split, static.seed).x
    assert torch.equal(train_pixels(static, split, 20), trained_on[:20])
    assert not torch.equal(eval_pixels(static, split, 20), trained_on[:20])
    dynamic = Config(binarize="dynamic", seed=5)
    assert torch.equal(train_pixels(dynamic, split, 20), eval_pixels(dynamic, split, 20))


def _idx_u8_bytes(array: np.ndarray) -> bytes:
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
        raw = _idx_u8_bytes(a)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]


def _one_line_raised(e) -> bool:
    return "\n" not in str(e.value) and len(str(e.value)) > 10


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
    assert _one_line_raised(e)


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
    assert _one_line_raised(e)


def test_bad_npz_keys_and_labels(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((10, 4, 4), np.uint8))
    with pytest.raises(UserError, match="'x'") as e:
        data.load(str(tmp_path / "a.npz"))
    assert _one_line_raised(e)
    np.savez(tmp_path / "b.npz", x=np.zeros((10, 4, 4), np.uint8), y=np.zeros(9, np.int64))
    with pytest.raises(UserError, match="10 integer labels") as e:
        data.load(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", x=np.zeros((10, 4, 4), np.uint8), x_test=np.zeros((5, 4, 5), np.uint8))
    with pytest.raises(UserError, match="one \\(C, H, W\\)"):
        data.load(str(tmp_path / "c.npz"))
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read") as e:
        data.load(str(tmp_path / "d.npz"))
    assert _one_line_raised(e)


def test_missing_file_and_too_few_rows(tmp_path, capsys):
    with pytest.raises(UserError, match="no file or folder") as e:
        Config(dataset=str(tmp_path / "nope.npz")).validate()
    assert _one_line_raised(e)
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
    assert _one_line_raised(e)
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
