"""Figures for images of any (C, H, W) and a latent plot labelled with the data's classes."""
from __future__ import annotations

import numpy as np
import pytest

from ppl_vae import evaluation, gap_plots, plots


@pytest.fixture(autouse=True)
def _close_figures():
    """The *_figure functions hand their Figure over open: close them after each test."""
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


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
    original = plots.save_figure

    def save(fig, path):
        captured["fig"] = fig
        captured["labels"] = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes]
        return original(fig, path)

    monkeypatch.setattr(plots, "save_figure", save)
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
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    rows = [{"epoch": e, "split": s, "amortization_gap": a, "approximation_gap": 3.0 + e / 1e3}
            for e, a in ((1, 250.0), (10, 20.0), (300, 3.0)) for s in ("train", "test")]
    gap_plots.gap_curves({"guide": rows}, tmp_path / "a.png")
    rows[2]["amortization_gap"] = -0.5  # epoch 10, training rows: q* worse than q
    gap_plots.gap_curves({"guide": rows}, tmp_path / "b.png")
    scales = [[ax.get_yscale() for ax in fig.axes] for fig in figures]  # amort. train, test;
    assert scales == [["log", "log", "linear", "linear"],               # approx. train, test
                      ["symlog", "log", "linear", "linear"]]


def test_gap_curves_draw_reference_values_as_dashed_lines(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    rows = [{"epoch": e, "split": s, "amortization_gap": 2.0, "approximation_gap": 3.0}
            for e in (1, 10) for s in ("train", "test")]
    gap_plots.gap_curves({"mine": rows}, tmp_path / "a.png",
                     references={"mine": {"amortization_gap": 1.34}, "other": {"x": 1.0}})
    dashed = [[(line.get_ydata()[0], line.get_color()) for line in ax.get_lines()
               if line.get_linestyle() == "--"] for ax in figures[0].axes]
    curve = figures[0].axes[0].get_lines()[0].get_color()
    assert dashed == [[(1.34, curve)], [(1.34, curve)], [], []]  # amortization panels only


def _figures(monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
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
    gap_plots.gap_curves({"g": rows}, tmp_path / "a.png")
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
    assert gap_plots.table_guides({"mf": table, "enc": encoder}) == ["mf"]
    gap_plots.gap_curves({"mf": table}, tmp_path / "a.png")
    gap_plots.gap_curves({"enc": encoder, "mf": table}, tmp_path / "b.png")
    gap_plots.gap_curves({"mf": table}, tmp_path / "c.png", tables=[])  # the caller says: none
    alone, mixed, told = figures
    assert alone.axes[0].get_title().startswith("local gap of the table rows")
    assert not any(ax.get_title().startswith("amortization gap") for ax in alone.axes)
    assert [line.get_label() for line in mixed.axes[0].get_lines()] == ["enc"]
    assert mixed.axes[0].get_title().startswith("amortization gap")
    (local,) = [ax for ax in mixed.axes if ax.get_title().startswith("local gap")]
    assert [line.get_label() for line in local.get_lines()] == ["mf"]
    assert told.axes[0].get_title().startswith("amortization gap")
    assert "local" not in told.axes[0].get_title()


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


# ---------------------------------------------------------------------------------------
# figures that mislead (a user study): each test fails on the figures as they were
# ---------------------------------------------------------------------------------------
def _texts(fig) -> str:
    """Every piece of text a reader sees on ``fig``: titles, axis labels, legends, notes."""
    out = [t.get_text() for t in fig.texts]
    if getattr(fig, "_suptitle", None) is not None:
        out.append(fig._suptitle.get_text())
    for legend in list(fig.legends) + [ax.get_legend() for ax in fig.axes]:
        if legend is not None:
            out += [t.get_text() for t in legend.get_texts()]
            out.append(legend.get_title().get_text())
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.texts]
    return "\n".join(" ".join(t.split()) for t in out)  # a wrapped note read as one line


def _history(rows):
    return [{"epoch": e, "steps": s, "wall": float(e), "train_elbo": t, "valid_elbo": v}
            for e, s, t, v in rows]


AMORTIZED = _history([(1, 10, -260.0, -200.0), (2, 20, -185.0, -150.0), (3, 30, -180.0, -140.0)])
TABLE = _history([(1, 10, -300.0, -180.0), (2, 20, -160.0, -142.0), (3, 30, -150.0, -132.0)])


def test_curves_say_on_the_figure_which_points_lie_below_the_axis_and_by_how_much():
    """Finding 1: the epoch-1 points were cut off without a word."""
    fig = plots.curves_figure({"amortized": AMORTIZED, "meanfield": TABLE})
    lo, hi = fig.axes[0].get_ylim()
    text = _texts(fig)
    cut = [(line.get_label(), y) for line in fig.axes[0].get_lines()
           for y in np.asarray(line.get_ydata(), dtype=float) if not lo <= y <= hi]
    assert cut, "the test needs points below the axis"
    for label, y in cut:  # each cut point named with its value and its distance below
        assert f"{y:.1f}" in text, (label, y, text)
        assert f"{lo - y:.1f} nats below" in text, (label, y, text)
    # and a marker at the axis' edge where each cut point would be
    edge = [c for c in fig.axes[0].collections if len(c.get_offsets())]
    assert sum(len(c.get_offsets()) for c in edge) == len(cut)


def test_curves_legend_covers_no_data():
    """Finding 2: the legend sat inside the axes over the end of a curve."""
    fig = plots.curves_figure({"amortized": AMORTIZED, "meanfield": TABLE})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_xlabel()


def test_curves_axis_does_not_call_the_training_objective_the_elbo():
    """The train curve is the training objective (IWAE, beta-weighted, ...), not always the
    ELBO; the y-axis said "ELBO per image"."""
    fig = plots.curves_figure({"amortized": AMORTIZED})
    label = " ".join(fig.axes[0].get_ylabel().split())
    assert label == "nats per image (valid: ELBO; train: the training objective)"


def test_short_curves_tick_whole_epochs_only():
    """Finding 3: a two-epoch run had ticks at 1.2, 1.4, ..."""
    fig = plots.curves_figure({"amortized": AMORTIZED[:2]})
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert {1.0, 2.0} <= set(ticks)


def test_curves_draw_against_steps_and_place_a_partial_epoch_where_it_ends():
    """Finding 4: under a budget in network passes the last epoch is partial (4 of 10
    steps here); drawn at epoch 3 it looked whole."""
    partial = AMORTIZED[:2] + [{**AMORTIZED[2], "steps": 24}]
    by_steps = plots.curves_figure({"amortized": partial}, x="steps")
    ax = by_steps.axes[0]
    assert "step" in ax.get_xlabel()
    assert list(ax.get_lines()[0].get_xdata()) == [10, 20, 24]
    by_epoch = plots.curves_figure({"amortized": partial}, x="epoch")
    xs = list(by_epoch.axes[0].get_lines()[0].get_xdata())
    assert xs == pytest.approx([1.0, 2.0, 2.4])
    assert "4 of 10 steps" in _texts(by_epoch)
    passes = plots.curves_figure({"a": partial, "b": partial}, x="passes",
                                 passes_per_step={"a": 4, "b": 19})
    lines = passes.axes[0].get_lines()
    assert list(lines[0].get_xdata()) == [40, 80, 96]
    assert list(lines[2].get_xdata()) == [190, 380, 456]
    assert "network passes" in passes.axes[0].get_xlabel()
    with pytest.raises(ValueError):
        plots.curves_figure({"a": partial}, x="minutes")


def test_a_tables_train_curve_is_explained_on_the_figure():
    """Finding 5: the per-datapoint guide's train curve sat under its valid curve unexplained."""
    fig = plots.curves_figure({"amortized": AMORTIZED, "meanfield": TABLE}, tables=["meanfield"])
    text = _texts(fig)
    assert "meanfield" in text and "as stored when" in text and "visited" in text
    assert "refit" in text and "decoder frozen" in text
    plain = _texts(plots.curves_figure({"amortized": AMORTIZED}))
    assert "as stored when" not in plain


RESULTS = {"amortized": {"approximation_gap": 12.0, "approximation_gap_stderr": 0.5,
                         "amortization_gap": 0.4, "amortization_gap_stderr": 0.1},
           "meanfield": {"approximation_gap": 11.0, "approximation_gap_stderr": 0.5,
                         "amortization_gap": None, "amortization_gap_stderr": None}}


def _panel(fig, word):
    """The axes of the gap named ``word`` (the one axes, when all share one)."""
    found = [ax for ax in fig.axes if word in ax.get_title() + ax.get_ylabel()]
    (ax,) = found or fig.axes
    return ax


def _bar_container(ax, word):
    """The bars of the gap named ``word`` in ``ax``."""
    (container,) = [c for c in ax.containers if word in str(c.get_label())]
    return container


def test_gap_bars_are_one_standard_error_and_say_so():
    """Finding 6: gaps.png used ± 2 standard errors where the table and gap_curves use ± 1."""
    fig = gap_plots.gaps_figure(RESULTS)
    ax = _panel(fig, "approximation")
    container = _bar_container(ax, "approximation")
    segments = container.errorbar.lines[2][0].get_segments()
    assert [(s[0][1], s[1][1]) for s in segments] == [(11.5, 12.5), (10.5, 11.5)]
    assert "± 1 standard error" in _texts(fig)


def test_a_gap_that_is_na_is_written_not_drawn_as_a_zero_bar():
    """Finding 7: the mean-field amortization gap (None) was a bar of height 0."""
    fig = gap_plots.gaps_figure(RESULTS)
    ax = _panel(fig, "amortization")
    bars = list(_bar_container(ax, "amortization gap").patches)
    assert len(bars) == 1 and bars[0].get_height() == pytest.approx(0.4)
    (na,) = [t for t in ax.texts if t.get_text().startswith("n/a")]
    x, _ = na.get_position() if not hasattr(na, "xy") else na.xy
    assert x == pytest.approx(1.0)  # meanfield's place


def test_each_gap_is_drawn_on_its_own_scale():
    """Finding 8: one 12-nat bar squashed a 0.4-nat bar to a sliver."""
    fig = gap_plots.gaps_figure(RESULTS)
    amort, approx = _panel(fig, "amortization"), _panel(fig, "approximation")
    assert amort is not approx
    assert amort.get_ylim()[1] < 1.5  # the 0.4-nat bar fills a good part of its panel
    assert approx.get_ylim()[1] > 12.5
    values = [t.get_text() for t in amort.texts + approx.texts]
    assert "0.40" in values and "12.00" in values  # every value written on its bar


def _gap_rows(epochs=(1, 3, 10), table=False):
    return [{"epoch": e, "split": s, "approximation_gap": 3.0 + 1 / e,
             "approximation_gap_stderr": 0.1,
             "amortization_gap": None if table and s == "test" else (41.0 if table else 2.0) / e,
             "amortization_gap_stderr": 0.1}
            for e in epochs for s in ("train", "test")]


@pytest.mark.parametrize("epochs", [(1, 3, 10), (1, 2, 3), (1, 3, 10, 30, 100)])
def test_gap_curve_epochs_are_plain_integers(epochs):
    """Finding 9: a log axis labelled 2x10^0, 3x10^0."""
    fig = gap_plots.gap_curves_figure({"amortized": _gap_rows(epochs)})
    fig.canvas.draw()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        labels = [t.get_text() for t in ax.get_xticklabels(which="both")
                  if t.get_text() and lo <= t.get_position()[0] <= hi]
        assert all(label.isdigit() for label in labels), labels
    bottom = [t.get_text() for t in fig.axes[-1].get_xticklabels(which="both") if t.get_text()]
    assert [str(e) for e in epochs] == sorted(set(bottom), key=int)


def test_a_tables_local_gap_gets_its_own_panel():
    """Finding 10: a table's 41-nat local gap was drawn on the amortization-gap axis."""
    fig = gap_plots.gap_curves_figure({"amortized": _gap_rows(), "meanfield": _gap_rows(table=True)},
                                  tables=["meanfield"])
    names = {ax: [line.get_label() for line in ax.get_lines()] for ax in fig.axes}
    amortization = [ax for ax in fig.axes if ax.get_title().startswith("amortization gap")]
    local = [ax for ax in fig.axes if ax.get_title().startswith("local gap")]
    assert amortization and local
    for ax in amortization:
        assert not any("meanfield" in n for n in names[ax])
    for ax in local:
        assert all("meanfield" in n for n in names[ax]) and names[ax]
        assert "local gap" in ax.get_ylabel() or "local gap" in ax.get_title()


def test_a_tables_gap_figure_has_no_empty_panel():
    """Finding 11: a per-datapoint run's gaps.png had an empty amortization panel (test rows)."""
    fig = gap_plots.gap_curves_figure({"meanfield": _gap_rows(table=True)})
    for ax in fig.axes:
        assert any(len(line.get_xdata()) for line in ax.get_lines()), ax.get_title()
    text = _texts(fig)
    assert "test rows" in text and "q*" in text  # what is absent, and why


def test_latent_names_its_axes_the_guide_and_the_split():
    """Finding 12: latent.png had no axis labels and named neither guide nor split."""
    pca = np.random.default_rng(0).normal(size=(60, 2))
    fig = plots.latent_figure(pca, np.arange(60) % 3, guide="meanfield", split="test")
    ax = fig.axes[0]
    assert "PC 1" in ax.get_xlabel() and "PC 2" in ax.get_ylabel()
    assert "posterior means" in ax.get_xlabel()
    assert "meanfield" in ax.get_title() and "test" in ax.get_title()
    assert "60" in ax.get_title()  # how many rows


def test_samples_are_titled_as_the_decoder_means_they_are():
    """Finding 13: "samples" showed Bernoulli means of prior draws, not samples of x."""
    fig = plots.samples_figure(np.random.default_rng(0).random((8, 784)))
    title = fig.axes[0].get_title()
    assert "mean" in title and "z ~ p(z)" in title and not title.startswith("samples")


def test_run_figures_name_the_guide_and_explain_a_tables_curves(tmp_path, monkeypatch):
    figures = _figures(monkeypatch)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "arrays.npz", inputs=rng.random((4, 784)),
             reconstructions=rng.random((4, 784)), samples=rng.random((8, 784)),
             pca=rng.normal(size=(30, 2)), labels=np.arange(30) % 3)
    evaluation.run_figures(tmp_path, tmp_path / "arrays.npz", np.arange(30) % 3, "meanfield", TABLE,
                      per_datapoint=True, split="test")
    curves, _, samples, latent = figures
    assert "as stored when" in _texts(curves)
    assert "meanfield" in latent.axes[0].get_title() and "test" in latent.axes[0].get_title()
    assert "z ~ p(z)" in samples.axes[0].get_title()


def test_curves_cut_only_points_far_off_the_rest():
    """A meanfield run of 3 epochs: its epoch-1 valid ELBO lay 1.2 nats under the axis, cut
    for nothing, beside an epoch-1 train ELBO 170 nats under it."""
    run = _history([(1, 16, -410.6, -243.0), (2, 32, -238.8, -196.2), (3, 48, -205.7, -178.6)])
    fig = plots.curves_figure({"meanfield": run})
    lo, hi = fig.axes[0].get_ylim()
    assert lo < -243.0 < hi and lo > -410.6  # the near point shown, the far one cut ...
    assert "-410.6" in _texts(fig) and "-243.0" not in _texts(fig)  # ... and named
