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
