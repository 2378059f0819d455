"""Datasets: their file formats, their train/valid/test splits and their binarization.

A whole split lives as one float tensor in [0, 1] on the training device (``Split``); how
its rows are drawn into minibatches is ``batching``'s (which sits above this module).

MNIST ships inside the package (``ppl_vae/_data/MNIST/raw``: the four original IDX files,
gzip-wrapped) and is checked against the canonical md5 of the *uncompressed* bytes on load.
Other data (``load``): Fashion-MNIST/KMNIST IDX files on disk, any ``torchvision.datasets``
class whose files are on disk, a folder of IDX files, or a ``.npz``/``.npy`` of images; each
``Split`` carries its image shape (C, H, W) and class names. Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from .config import BINARIZE, BUILTIN_DATASETS, check_name
from .errors import UserError, setting

PACKAGE_DATA = Path(__file__).resolve().parent / "_data"

# md5 of the uncompressed IDX bytes (the well-known MNIST checksums).
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
TORCHVISION_FOLDERS = {"fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
# The built-in sets keep the literature's split: the last 10,000 of 60,000 training images.
DEFAULT_VALID_FRACTION = 1 / 6
NPZ_KEYS = ("x", "y", "x_test", "y_test", "classes")
SPLIT_SEED = 0  # the row permutation of a user's data set: fixed, so every run sees one test set
Shape = Tuple[int, int, int]


def infer_shape(dim: int) -> Shape:
    """(1, s, s) for a square number of pixels, else one row (1, 1, D)."""
    s = int(round(dim ** 0.5))
    return (1, s, s) if s * s == dim else (1, 1, dim)


class Split(NamedTuple):
    """One split of a dataset: flattened pixels in [0, 1], integer labels (-1: none), image shape."""

    x: torch.Tensor  # [N, D] float, D = C * H * W
    y: torch.Tensor  # [N] long; -1 for unlabelled rows
    shape: Optional[Shape] = None  # (C, H, W); None: inferred from D (square grayscale)
    classes: Optional[Tuple[str, ...]] = None  # class names, indexed by y

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def image_shape(self) -> Shape:
        return tuple(self.shape) if self.shape is not None else infer_shape(self.x.shape[1])

    def head(self, n: Optional[int]) -> "Split":
        """The first ``n`` rows (all of them when ``n`` is None)."""
        return self if n is None else self.rows(self.x[:n], self.y[:n])

    def to(self, device) -> "Split":
        return self.rows(self.x.to(device), self.y.to(device))

    def rows(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> "Split":
        """Other rows of the same data set: same shape and classes (``_replace`` would trip on
        ``__len__``, which counts rows)."""
        return Split(x, self.y if y is None else y, self.shape, self.classes)


class Splits(NamedTuple):
    train: Split
    valid: Split
    test: Split

    def get(self, name: str) -> Split:
        if name not in self._fields:
            raise UserError(f"unknown split {name!r}; choose one of {', '.join(self._fields)}")
        return getattr(self, name)

    @property
    def shape(self) -> Shape:
        """(channels, height, width) of one image."""
        return self.train.image_shape

    @property
    def classes(self) -> Optional[Tuple[str, ...]]:
        return self.train.classes

    def describe(self) -> dict:
        """What config.json records about the data: split sizes, image shape, classes."""
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test),
                "shape": list(self.shape),
                "labelled": bool((self.train.y >= 0).any()),
                "classes": list(self.classes) if self.classes is not None else None}


class RawData(NamedTuple):
    """A data set as read from disk, before splitting: images in [0, 1] and optional labels."""

    x: torch.Tensor  # [N, D] float
    y: torch.Tensor  # [N] long, -1 where unlabelled
    shape: Shape
    x_test: Optional[torch.Tensor] = None  # the data set's own test split, when it has one
    y_test: Optional[torch.Tensor] = None
    classes: Optional[Tuple[str, ...]] = None


def read_idx(path: Path, md5: Optional[str] = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), checking the md5 of its uncompressed bytes."""
    path = Path(path)
    regular_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise UserError(f"{path} is corrupt: md5 of its uncompressed bytes is not {md5}; "
                        f"copy the original file again")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path} is truncated: its header is cut short")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def _idx_file(root: Path, stem: str) -> Optional[Path]:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    return None


def _find_idx(root: Path, stem: str) -> Path:
    found = _idx_file(root, stem)
    if found is None:
        raise UserError(f"MNIST file {stem}(.gz) not found in {root}; reinstall ppl_vae or pass "
                        f"{setting('data_dir')} pointing at a folder with the four MNIST IDX files")
    return found


def images(array, what: str) -> Tuple[torch.Tensor, Shape]:
    """Images [N, H, W], [N, C, H, W] or [N, D] (uint8 0..255, bool, or float in [0, 1])
    -> (float pixels [N, D] in [0, 1], (C, H, W)); anything else is a one-line ``UserError``."""
    a = np.asarray(array)
    if a.ndim == 2:
        shape = infer_shape(a.shape[1])
    elif a.ndim == 3:
        shape = (1, a.shape[1], a.shape[2])
    elif a.ndim == 4:
        if a.shape[1] not in (1, 3) and a.shape[3] in (1, 3):
            raise UserError(f"{what} has shape {list(a.shape)}, which looks channel-last "
                            f"[N, H, W, C]; store [N, C, H, W] (numpy: x.transpose(0, 3, 1, 2))")
        shape = tuple(int(s) for s in a.shape[1:])
    else:
        raise UserError(f"{what} has shape {list(a.shape)}; images must be [N, H, W], "
                        f"[N, C, H, W] or [N, D]")
    if a.shape[0] == 0 or min(a.shape) == 0:
        raise UserError(f"{what} is empty (shape {list(a.shape)})")
    flat = a.reshape(a.shape[0], -1)
    if a.dtype == np.uint8 or a.dtype == bool:
        x = torch.from_numpy(np.array(flat, dtype=np.float32))
        return (x.div_(255.0) if a.dtype == np.uint8 else x), shape
    if not np.issubdtype(a.dtype, np.floating):
        raise UserError(f"{what} has dtype {a.dtype}; store uint8 (0..255) or float in [0, 1]")
    x = torch.from_numpy(np.array(flat, dtype=np.float32))
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"{what} holds NaN or infinite values; pixels must be finite, in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise UserError(f"{what} ranges over [{lo:g}, {hi:g}]; float pixels must lie in [0, 1] "
                        f"(the likelihoods are on [0, 1]): divide 0..255 values by 255 or store "
                        f"uint8")
    return x, shape


def labels(array, n: int, what: str) -> torch.Tensor:
    """Integer labels [n] (-1 for all when ``array`` is None)."""
    if array is None:
        return torch.full((n,), -1, dtype=torch.long)
    a = np.asarray(array)
    if a.shape != (n,) or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise UserError(f"{what} must be {n} integer labels, one per image; got shape "
                        f"{list(a.shape)}, dtype {a.dtype}")
    if a.size and (a.min() < -1 or a.max() >= MAX_CLASSES):
        raise UserError(f"{what} range over [{a.min()}, {a.max()}]; labels are class indices "
                        f"from 0 to {MAX_CLASSES - 1} (-1: unlabelled)")
    return torch.from_numpy(a.astype(np.int64))


MAX_CLASSES = 100_000  # labels are class indices: the figures colour each class


def _raw(x, y, x_test, y_test, what: str, classes=None) -> RawData:
    xt, shape = images(x, f"{what} images")
    yt = labels(y, len(xt), f"{what} labels")
    if x_test is None:
        if y_test is not None:
            raise UserError(f"{what} has test labels but no test images")
        return RawData(xt, yt, shape, classes=classes)
    xs, test_shape = images(x_test, f"{what} test images")
    if test_shape != shape:
        raise UserError(f"{what}: test images are {list(test_shape)} but training images "
                        f"{list(shape)}; both must have one (C, H, W)")
    ys = labels(y_test, len(xs), f"{what} test labels")
    return RawData(xt, yt, shape, xs, ys, classes)


def _idx_folder(root: Path, what: str, md5: bool = False, hint: str = "") -> RawData:
    """IDX files train-images-idx3-ubyte (required), train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
    t10k-labels-idx1-ubyte (optional; each .gz or uncompressed) in ``root``."""
    found = {stem: _idx_file(root, stem) for stem in IDX_STEMS}
    if found[IDX_STEMS[0]] is None:
        raise UserError(f"{what}: no {IDX_STEMS[0]}(.gz) in {root}{hint}")
    arrays = [None if path is None else read_idx(path, MNIST_FILES[stem] if md5 else None)
              for stem, path in found.items()]
    return _raw(*arrays, what=what)


def regular_file(path: Path) -> None:
    """Refuse a path that is not a regular file (a named pipe would hang the read)."""
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file (a folder, pipe or device); give a "
                        f".npz/.npy file or a folder of IDX files")


def _check_npy(f, size: int, what: str) -> None:
    """Refuse a .npy whose header asks for more bytes than ``size`` holds (a 4 KB file may
    claim terabytes) or for Python objects, before anything is allocated."""
    try:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
    except Exception as e:  # numpy raises ValueError, EOFError, SyntaxError, ...
        raise UserError(f"{what} is not a readable .npy array ({type(e).__name__}); save it "
                        f"with numpy.save or numpy.savez") from None
    if dtype.hasobject:
        raise UserError(f"{what} holds Python objects, which are not loaded (they could run "
                        f"code); store numbers: uint8 images, integer labels, string classes")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > size:
        raise UserError(f"{what} is truncated or damaged: its header says {list(shape)} of "
                        f"{dtype} ({need:,} bytes) but it holds {size:,} bytes")


def _npz(path: Path) -> RawData:
    """``.npy``: the images; ``.npz``: keys x (images), y, x_test, y_test, classes (optional).

    Headers are checked before any array is read (``_check_npy``)."""
    import zipfile
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                _check_npy(f, path.stat().st_size, str(path))
        else:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    with z.open(info) as f:
                        _check_npy(f, info.file_size, f"{path} member {info.filename}")
        loaded = np.load(path, allow_pickle=False)
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path} as numpy data: {str(e).splitlines()[0]}") from None
    if isinstance(loaded, np.ndarray):
        return _raw(loaded, None, None, None, str(path))
    with loaded:
        keys = set(loaded.files)
        if "x" not in keys:
            raise UserError(f"{path} has keys {sorted(keys)}; it needs the images under 'x' "
                            f"(optional: 'y', 'x_test', 'y_test', 'classes')")
        unknown = keys - set(NPZ_KEYS)
        if unknown:
            raise UserError(f"{path} has unknown keys {sorted(unknown)}; use x, y, x_test, "
                            f"y_test, classes")
        try:
            get = {k: (loaded[k] if k in keys else None) for k in NPZ_KEYS}
        except Exception as e:  # a damaged member: zlib.error, BadZipFile, ValueError, ...
            raise UserError(f"cannot read {path}: a member is damaged ({type(e).__name__}); "
                            f"save it again with numpy.savez") from None
    classes = None if get["classes"] is None else tuple(str(c) for c in get["classes"])
    return _raw(get["x"], get["y"], get["x_test"], get["y_test"], str(path), classes)


def load_mnist(root: Optional[Path] = None) -> RawData:
    """MNIST from the four IDX files (md5-checked): 60,000 training and 10,000 test images."""
    root = Path(root) if root is not None else PACKAGE_DATA / "MNIST" / "raw"
    if _idx_file(root, IDX_STEMS[0]) is None and (root / "MNIST" / "raw").is_dir():
        root = root / "MNIST" / "raw"
    arrays = [read_idx(_find_idx(root, stem), md5) for stem, md5 in MNIST_FILES.items()]
    return _raw(*arrays, what="mnist", classes=tuple(str(d) for d in range(10)))


def load_builtin_torchvision(name: str, root: Path) -> RawData:
    """Fashion-MNIST or KMNIST from IDX files already on disk under ``root/<Folder>/raw``.

    Nothing is downloaded: when the files are absent, the error names the folder they belong
    in (the layout torchvision uses, so ``torchvision.datasets.FashionMNIST(root,
    download=True)`` on a machine with a network fills it).
    """
    folder = TORCHVISION_FOLDERS[name]
    raw = Path(root) / folder / "raw"
    if _idx_file(Path(root), IDX_STEMS[0]) is not None:  # --data-dir is the raw folder itself
        raw = Path(root)
    missing = [stem for stem in IDX_STEMS if _idx_file(raw, stem) is None]
    if missing:
        raise UserError(
            f"{name} is not shipped and {raw} lacks {', '.join(missing)} (.gz or uncompressed); "
            f"put its four IDX files there (torchvision.datasets.{folder}('{root}', download=True) "
            f"does, where there is a network), pass {setting('data_dir')}, or use "
            f"{setting('dataset')} mnist")
    import torchvision.datasets as tvd  # only for the class names; slow to import

    data = _idx_folder(raw, name)
    return RawData(*data[:5], tuple(getattr(tvd, folder).classes))


def load_torchvision(class_name: str, root: Path) -> RawData:
    """Any ``torchvision.datasets`` class whose files are already under ``root`` (no download).

    The class is built with ``train=True/False`` or ``split="train"/"test"`` when it takes
    one, else once (then the test rows are a seeded fraction).
    """
    import inspect

    import torchvision.datasets as tvd

    from torch.utils.data import Dataset
    cls = getattr(tvd, class_name, None) if not class_name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, Dataset)) or cls is tvd.VisionDataset \
            or inspect.isabstract(cls):
        raise UserError(f"torchvision.datasets has no class {class_name!r}; use e.g. "
                        f"torchvision:FashionMNIST or torchvision:CIFAR10 (case matters)")
    params = inspect.signature(cls).parameters

    def build(which: Optional[str]):
        kwargs = {"download": False} if "download" in params else {}
        if which is not None:
            kwargs["train" if "train" in params else "split"] = (
                which == "train" if "train" in params else which)
        try:
            return cls(str(root), **kwargs)
        except Exception as e:  # torchvision raises RuntimeError, OSError, ValueError, ...
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"torchvision's {class_name} could not load its files from {root}: "
                            f"{first}; put them there as torchvision expects (the MNIST family: "
                            f"{Path(root) / class_name / 'raw'}/) or pass {setting('data_dir')}"
                            ) from None

    has_test = "train" in params or "split" in params
    train = build("train" if has_test else None)
    test = build("test") if has_test else None

    def arrays(ds):
        x = getattr(ds, "data", None)
        if x is None:
            x = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.ndim == 4 and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # torchvision keeps CIFAR as [N, H, W, C]
        y = getattr(ds, "targets", getattr(ds, "labels", None))
        y = None if y is None else np.asarray(y.numpy() if isinstance(y, torch.Tensor) else y)
        return x, y

    try:
        x, y = arrays(train)
        x_test, y_test = arrays(test) if test is not None else (None, None)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"torchvision's {class_name} gave no images as arrays "
                        f"({type(e).__name__}); use a class of images such as "
                        f"torchvision:FashionMNIST or torchvision:CIFAR10") from None
    classes = getattr(train, "classes", None)
    return _raw(x, y, x_test, y_test, f"torchvision:{class_name}",
                tuple(str(c) for c in classes) if classes is not None else None)


def read(name: str = "mnist", data_dir: Optional[Path] = None) -> RawData:
    """The named data set as read from disk (see ``load``)."""
    check_name(name)
    if name == "mnist":
        return load_mnist(data_dir)
    root = Path(data_dir) if data_dir is not None else Path.home() / ".cache" / "ppl_vae"
    if name in TORCHVISION_FOLDERS:
        return load_builtin_torchvision(name, root)
    if name.startswith("torchvision:"):
        return load_torchvision(name.split(":", 1)[1], root)
    path = Path(name)
    if not path.is_dir():
        regular_file(path)
    if path.is_dir():
        return _idx_folder(path, str(path), hint=" (a folder data set holds IDX files: that one, "
                           "and optionally train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                           "t10k-labels-idx1-ubyte)")
    if path.suffix in (".npz", ".npy"):
        return _npz(path)
    raise UserError(f"dataset {path} is neither a folder of IDX files nor a .npz/.npy file")


def split(raw: RawData, valid_fraction: Optional[float] = None, test_fraction: float = 0.1,
          shuffle: bool = True, seed: int = SPLIT_SEED) -> Splits:
    """Train/valid/test from the data: the data set's own test split when it has one, else the
    last ``test_fraction`` of its rows; the validation rows are the last ``valid_fraction`` of
    the remaining ones (1/6 when None). ``shuffle`` permutes the rows first (seeded) so that a
    file sorted by class still gives representative splits."""
    valid_fraction = DEFAULT_VALID_FRACTION if valid_fraction is None else valid_fraction
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise UserError(f"{setting(name)} must lie strictly between 0 and 1, got {value}")
    n = len(raw.x)
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
             else torch.arange(n))
    if raw.x_test is None:
        n_test = int(round(test_fraction * n))
        if n_test < 1 or n - n_test < 2:
            raise UserError(f"{n} images are too few to split off a test set with "
                            f"{setting('test_fraction')} {test_fraction}; give more rows")
        test_x, test_y, order = raw.x[order[n - n_test:]], raw.y[order[n - n_test:]], order[:n - n_test]
    else:
        test_x, test_y = raw.x_test, raw.y_test
    m = len(order)
    n_valid = int(round(valid_fraction * m))
    if n_valid < 1 or n_valid >= m:
        raise UserError(f"{m} training images are too few for {setting('valid_fraction')} "
                        f"{valid_fraction:g} ({n_valid} validation rows); give more rows or "
                        f"change the fraction")

    def part(x, y) -> Split:
        return Split(x.contiguous(), y.contiguous(), raw.shape, raw.classes)

    train_idx, valid_idx = order[:m - n_valid], order[m - n_valid:]
    if not shuffle:  # plain slices: no copy of the whole training set
        return Splits(part(raw.x[:m - n_valid], raw.y[:m - n_valid]),
                      part(raw.x[m - n_valid:m], raw.y[m - n_valid:m]), part(test_x, test_y))
    return Splits(part(raw.x[train_idx], raw.y[train_idx]),
                  part(raw.x[valid_idx], raw.y[valid_idx]), part(test_x, test_y))


def load(name: str = "mnist", data_dir: Optional[Path] = None,
         valid_fraction: Optional[float] = None, test_fraction: float = 0.1) -> Splits:
    """The data set's train/valid/test splits on the CPU.

    ``name``: ``mnist`` (shipped, md5-checked), ``fashion_mnist``, ``kmnist`` (IDX files under
    ``data_dir/FashionMNIST/raw`` or ``data_dir/KMNIST/raw``), ``torchvision:<Class>`` (files
    under ``data_dir``), a folder of IDX files, or a ``.npz``/``.npy`` file (``read``). The
    built-in sets keep their file order (MNIST: first 50k train, last 10k valid, t10k test);
    a user's rows are permuted with a fixed seed before splitting (``split``).
    """
    raw = read(name, data_dir)
    return split(raw, valid_fraction, test_fraction, shuffle=name not in BUILTIN_DATASETS)


def static_binarize(split: Split, seed: int) -> Split:
    """One seeded Bernoulli draw of every pixel, fixed for the whole run."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.bernoulli(split.x.cpu(), generator=g).to(split.x.device)
    return split.rows(x)


class Binarize:
    """Turns grayscale rows into the pixels the likelihood sees.

    ``dynamic`` draws x ~ Bernoulli(pixel) afresh for every minibatch (Burda et al. 2016);
    ``static`` uses one seeded draw; ``none`` keeps grayscale values in [0, 1].

    The dynamic noise comes from its own generator on the CPU (uniforms, moved to the data's
    device), so every guide sees the same pixels and a checkpoint's generator state resumes
    on any device with the same pixels.
    """

    MODES = BINARIZE

    def __init__(self, mode: str, generator: Optional[torch.Generator] = None):
        if mode not in self.MODES:
            raise UserError(f"unknown binarization {mode!r}; choose one of {', '.join(self.MODES)}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("Binarize takes a CPU generator (its state is then portable)")
        self.mode = mode
        self.generator = generator

    def prepare(self, split: Split, seed: int) -> Split:
        return static_binarize(split, seed) if self.mode == "static" else split

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            u = torch.rand(x.shape, generator=self.generator, dtype=x.dtype)
            return (u.to(x.device) < x).to(x.dtype)
        return x
