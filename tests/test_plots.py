"""Figures for images of any (C, H, W) and a latent plot labelled with the data's classes."""
from __future__ import annotations

import numpy as np
import pytest

from ppl_vae import plots


def test_tile_places_non_square_grayscale_images_row_major():
    imgs = np.stack([np.full((1, 20, 28), k / 10) for k in range(5)]).reshape(5, -1)
    mosaic = plots._tile(imgs, 3, (1, 20, 28))
    assert mosaic.shape == (2 * 21 - 1, 3 * 29 - 1)  # 1-pixel gaps between tiles
    for k in range(5):
        r, c = divmod(k, 3)
        tile = mosaic[r * 21:r * 21 + 20, c * 29:c * 29 + 28]
        assert np.allclose(tile, k / 10)
    assert np.allclose(mosaic[20, :], 1.0) and np.allclose(mosaic[-20:, -28:], 1.0)


def test_tile_keeps_colour_channels():
    img = np.zeros((3, 4, 6))
    img[0] = 1.0  # pure red
    img[2, :, :3] = 0.5  # half blue on the left
    mosaic = plots._tile(img.reshape(1, -1), 1, (3, 4, 6))
    assert mosaic.shape == (4, 6, 3)
    assert np.allclose(mosaic[..., 0], 1) and np.allclose(mosaic[..., 1], 0)
    assert np.allclose(mosaic[:, :3, 2], 0.5) and np.allclose(mosaic[:, 3:, 2], 0)


def test_tile_infers_square_shape_without_one():
    assert plots._tile(np.zeros((2, 784)), 2).shape == (28, 57)


def _colorbars(fig_path_fn, monkeypatch):
    captured = {}
    original = plots._save

    def save(fig, path):
        captured["fig"] = fig
        captured["labels"] = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes]
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    fig_path_fn()
    return captured


def test_latent_colour_bar_names_the_classes(tmp_path, monkeypatch):
    pca = np.random.default_rng(0).normal(size=(60, 2))
    labels = np.arange(60) % 3
    got = _colorbars(lambda: plots.latent(pca, labels, tmp_path / "l.png",
                                          classes=["cat", "dog", "owl"]), monkeypatch)
    assert len(got["fig"].axes) == 2  # the scatter and its colour bar
    assert got["labels"][1] == ["cat", "dog", "owl"]
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"


def test_latent_without_labels_has_no_colour_bar(tmp_path, monkeypatch):
    pca = np.random.default_rng(0).normal(size=(60, 2))
    got = _colorbars(lambda: plots.latent(pca, np.full(60, -1), tmp_path / "l.png"), monkeypatch)
    assert len(got["fig"].axes) == 1


@pytest.mark.parametrize("shape", [(1, 20, 28), (3, 32, 32)])
def test_image_figures_of_any_shape_are_written(tmp_path, shape):
    imgs = np.random.default_rng(0).random((16, int(np.prod(shape))))
    plots.image_rows({"input": imgs, "recon": imgs}, tmp_path / "r.png", "t", shape)
    plots.samples(np.concatenate([imgs] * 4), tmp_path / "s.png", shape=shape)
    for name in ("r.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_gap_curves_take_a_log_axis_when_the_gaps_span_decades(monkeypatch, tmp_path):
    """Hundreds of nats in the first epochs must not flatten the late gaps of a few nats."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    rows = [{"epoch": e, "split": s, "amortization_gap": a, "approximation_gap": 3.0 + e / 1e3}
            for e, a in ((1, 250.0), (10, 20.0), (300, 3.0)) for s in ("train", "test")]
    plots.gap_curves({"guide": rows}, tmp_path / "a.png")
    rows[2]["amortization_gap"] = -0.5  # epoch 10, training rows: q* worse than q
    plots.gap_curves({"guide": rows}, tmp_path / "b.png")
    scales = [[ax.get_yscale() for ax in fig.axes] for fig in figures]  # amort. train, test;
    assert scales == [["log", "log", "linear", "linear"],               # approx. train, test
                      ["symlog", "log", "linear", "linear"]]


def test_gap_curves_draw_reference_values_as_dashed_lines(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    rows = [{"epoch": e, "split": s, "amortization_gap": 2.0, "approximation_gap": 3.0}
            for e in (1, 10) for s in ("train", "test")]
    plots.gap_curves({"mine": rows}, tmp_path / "a.png",
                     references={"mine": {"amortization_gap": 1.34}, "other": {"x": 1.0}})
    dashed = [[(line.get_ydata()[0], line.get_color()) for line in ax.get_lines()
               if line.get_linestyle() == "--"] for ax in figures[0].axes]
    curve = figures[0].axes[0].get_lines()[0].get_color()
    assert dashed == [[(1.34, curve)], [(1.34, curve)], [], []]  # amortization panels only


def _figures(monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def test_curves_show_a_point_of_every_curve_they_list(monkeypatch, tmp_path):
    """compare --quick: the amortized training curve (about -180) lay below a y-axis cut 40
    nats under the best validation ELBO (-130), while its legend entry stayed."""
    figures = _figures(monkeypatch)
    amortized = [{"epoch": e, "wall": e, "train_elbo": t, "valid_elbo": v}
                 for e, t, v in ((1, -260.0, -200.0), (2, -185.0, -150.0), (3, -180.0, -140.0))]
    meanfield = [{"epoch": e, "wall": e, "train_elbo": t, "valid_elbo": v}
                 for e, t, v in ((1, -300.0, -180.0), (2, -140.0, -135.0), (3, -128.0, -130.0))]
    plots.curves({"amortized": amortized, "meanfield": meanfield}, tmp_path / "c.png")
    ax = figures[0].axes[0]
    lo, hi = ax.get_ylim()
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["amortized train", "amortized valid", "meanfield train", "meanfield valid"]
    for line in ax.get_lines():
        later = np.asarray(line.get_ydata())[1:]  # after the first epoch: all of it shown
        assert ((later >= lo) & (later <= hi)).all(), (line.get_label(), lo, hi)
    assert lo > -260  # the first epoch's hundreds do not flatten the rest


def test_curves_of_two_epochs_show_both(monkeypatch, tmp_path):
    """compare --quick trains 2 epochs: cutting the first would leave each line a sliver."""
    figures = _figures(monkeypatch)
    history = [{"epoch": 1, "wall": 1, "train_elbo": -246.0, "valid_elbo": -195.0},
               {"epoch": 2, "wall": 2, "train_elbo": -181.0, "valid_elbo": -165.0}]
    plots.curves({"amortized": history}, tmp_path / "c.png")
    lo, hi = figures[0].axes[0].get_ylim()
    assert lo < -246 and hi > -165


def test_gap_curves_band_is_one_standard_error_and_says_so(monkeypatch, tmp_path):
    figures = _figures(monkeypatch)
    rows = [{"epoch": e, "split": s, "amortization_gap": 5.0, "amortization_gap_stderr": 1.0,
             "approximation_gap": 3.0, "approximation_gap_stderr": 0.5}
            for e in (1, 10) for s in ("train", "test")]
    plots.gap_curves({"g": rows}, tmp_path / "a.png")
    fig = figures[0]
    (band,) = fig.axes[0].collections
    ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
    assert ys.min() == pytest.approx(4.0) and ys.max() == pytest.approx(6.0)  # ± 1 s.e.
    assert "± 1 s.e." in fig._suptitle.get_text()


def test_gap_curves_call_a_tables_training_row_gap_the_local_gap(monkeypatch, tmp_path):
    """A per-datapoint table's records: L[q*] - L[q] on training rows, none on test rows."""
    figures = _figures(monkeypatch)
    table = [{"epoch": e, "split": s, "approximation_gap": 3.0,
              "amortization_gap": 2.0 if s == "train" else None}
             for e in (1, 10) for s in ("train", "test")]
    encoder = [{**r, "amortization_gap": 1.5} for r in table]
    assert plots.table_guides({"mf": table, "enc": encoder}) == ["mf"]
    plots.gap_curves({"mf": table}, tmp_path / "a.png")
    plots.gap_curves({"enc": encoder, "mf": table}, tmp_path / "b.png")
    plots.gap_curves({"mf": table}, tmp_path / "c.png", tables=[])  # the caller says: none
    alone, mixed, told = (fig.axes[0] for fig in figures)
    assert "local gap of the table rows" in alone.get_title()
    assert not alone.get_title().startswith("amortization gap")
    assert [line.get_label() for line in mixed.get_lines()] == [
        "enc", "mf: local gap of the table rows"]
    assert "local gap" in mixed.get_title()
    assert told.get_title().startswith("amortization gap") and "local" not in told.get_title()


def test_vectors_are_drawn_as_rectangles_not_one_pixel_strips(tmp_path):
    vectors = np.random.default_rng(0).random((4, 700))
    assert plots.image_shape(vectors) == (1, 25, 28)
    assert plots.image_shape(vectors, (1, 1, 700)) == (1, 25, 28)  # a saved strip shape
    assert plots.rectangle(701) == (26, 27)  # a prime length: padded after its end
    mosaic = plots._tile(np.random.default_rng(0).random((3, 701)), 3)
    assert mosaic.shape == (26, 3 * 28 - 1)
    assert np.allclose(mosaic[-1, 27 - (26 * 27 - 701):27], 1.0)  # the padding: white
    plots.image_rows({"input": vectors, "recon": vectors}, tmp_path / "r.png", "t", (1, 1, 700))
    from PIL import Image
    with Image.open(tmp_path / "r.png") as image:
        width, height = image.size
    assert height > width / 8  # not a strip
