"""The comparison report: a Markdown table per guide, the gaps, the compute, the settings, the
figures; with several seeds, means and standard deviations over seeds and the paired
differences between guides with their 95% intervals, in numbers and in words.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np

from . import gap_plots, plots
from . import report_tables as rt
from .evaluate import why_no_amortization_gap
from .registry import GUIDES
from .budget_curves import NAMES
from .config import VALID_FIT_STEPS

if TYPE_CHECKING:
    from .results import Comparison, GuideRun


def _and(words: List[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _asked(name: str, what: str, default):
    """What a compared guide's class says of itself (``Guide.settings``, ``described``), by
    its registered name; a user's ``module:Class`` is not imported for it (``default``)."""
    try:
        return getattr(getattr(GUIDES.resolve(name), "piece", None), what, default) \
            if name in GUIDES else default
    except Exception:  # noqa: BLE001 - a guide that cannot be looked up says nothing
        return default


def title(guides: List[str]) -> str:
    """The report's title, from the guides that ran, as each guide's class describes its
    inference ("Amortized, semi-amortized and mean-field inference" for the default three);
    where one says nothing (a user's guide), every guide is named as given."""
    words = [_asked(g, "described", None) for g in guides]
    if all(words):
        text = _and(words) + " inference"
        return text[0].upper() + text[1:]
    return "Inference compared: " + _and([f"`{g}`" for g in guides])


def _setting_words(name: str, c: dict) -> str:
    v = c.get(name)
    if name == "local_lr":
        return f"RowAdam lr {v}"
    if name == "inner_steps":
        return f"{rt.plural(v, 'local-only step')} per minibatch before each joint step"
    if name == "local_init":
        return f"rows initialized by `{v}`"
    if name == "refine_steps":
        return (f"{rt.plural(v, 'refinement step')} of size {c.get('refine_lr')} from the "
                f"encoder's output")
    if name == "refine_lr":
        return ""  # said with refine_steps
    if name == "refine_stop_gradient":
        return ("no gradient through the refinement to the encoder" if v
                else "the encoder's gradient flows through the refinement")
    return f"{name} {v}"


def guide_settings(comparison: "Comparison") -> Dict[str, tuple]:
    """Each compared guide's own settings (``Guide.settings``), as the comparison recorded
    them, else as the guide's class says (built-in names only)."""
    recorded = getattr(comparison, "settings", None) or {}
    out = {}
    for g in comparison.guides:
        if g in recorded:
            out[g] = tuple(recorded[g])
            continue
        out[g] = tuple(_asked(g, "settings", ()))
    return out


def _settings_text(comparison: "Comparison") -> str:
    """"; the meanfield guide: RowAdam lr 0.01, ..." for the guides that read settings of
    their own; nothing for guides that read only the shared ones."""
    parts = []
    for g, names in guide_settings(comparison).items():
        words = [w for w in (_setting_words(n, comparison.config) for n in names) if w]
        if words:
            parts.append(f"the {g} guide: " + ", ".join(words))
    return "; " + "; ".join(parts) if parts else ""


def gap_notes(comparison: "Comparison") -> str:
    """Why a guide's amortization gap is n/a, and what its approximation gap is when its q is
    not in q*'s family (``Scores.local_family``)."""
    notes = []
    for g in comparison.guides:
        runs = comparison.runs_of(g)
        if not runs:
            continue
        r = runs[0]
        table, fam, scores = r.per_datapoint, r.family, r.scores
        q_family = scores.local_family or "diagonal"
        own = scores.amortization_gap is not None or table  # q* in the guide's own family
        called = f" ({fam})" if fam else ""
        if scores.amortization_gap is None and scores.approximation_gap is not None:
            notes.append(f"The {g} guide's amortization gap is n/a: "
                         f"{why_no_amortization_gap(table, fam, q_family)}.")
        if not own and scores.approximation_gap is not None:
            notes.append(f"The {g} guide's approximation gap is log p(x) - L[q*] with a "
                         f"{q_family} q*: the {q_family} family's approximation gap, not "
                         f"that of the {g} guide's own family{called}.")
    return "\n" + "".join(f"- {n}\n" for n in notes) if notes else ""


def q_star_families(comparison: "Comparison") -> str:
    """Which per-datapoint family each guide's q* was fitted in (``Scores.local_family``)."""
    said = [f"{g}: {runs[0].scores.local_family}" for g in comparison.guides
            for runs in [comparison.runs_of(g)] if runs and runs[0].scores.local_family]
    return (" q* (L[q*], and the proposal of log p(x)) is fitted to each test row with the "
            "decoder frozen, in a per-datapoint family (" + "; ".join(said) + ")."
            if said else "")


def _why_na(r: "GuideRun") -> str:
    q_family = r.scores.local_family or ("diagonal" if r.scores.elbo_local else None)
    return f"n/a ({why_no_amortization_gap(r.per_datapoint, r.family, q_family)})"


def line(who: str, r: "GuideRun") -> str:
    """One guide's numbers in one line, as the comparison logs them."""
    s, local = r.scores, r.local

    def num(est) -> str:
        return "n/a" if est is None else f"{est.mean:.2f}"
    return (f"{who}: ELBO {num(s.elbo)}  L[q*] {num(s.elbo_local)}  log p(x) "
            f"{num(s.log_px)}  approx gap {num(s.approximation_gap)}  amort gap "
            f"{_why_na(r) if s.amortization_gap is None else num(s.amortization_gap)}"
            + ("" if local is None else f"  table rows {local.stored:.2f} -> "
               f"{local.fitted:.2f} after a local fit"))


def gap_curves(gaps: Dict[str, List[dict]], path: Path, tables=None) -> Path:
    return gap_plots.gap_curves(gaps, path, tables=tables)


def _tables(comparison: "Comparison") -> List[str]:
    """The guides that are per-datapoint tables."""
    return sorted({r.guide for r in comparison.runs if r.per_datapoint})


def _na_reasons(comparison: "Comparison") -> Dict[str, str]:
    """Why a guide's amortization gap is n/a, in a few words for the gap figure."""
    out = {}
    for g in comparison.guides:
        runs = comparison.runs_of(g)
        if runs and runs[0].scores.amortization_gap is None:
            out[g] = ("a per-datapoint table: its test q is q* itself" if runs[0].per_datapoint
                      else f"family {runs[0].family or 'unstated'}, not q*'s")
    return out


def curve_unit(comparison: "Comparison") -> str:
    """What the ELBO curves are drawn against: the budget's own unit (epochs, or network
    passes under a budget of evaluations, where guides take different numbers of steps; a
    FLOPs budget is drawn against passes too, which plots.curves can draw)."""
    return "epoch" if comparison.budget.unit == "epochs" else "passes"


def write_figures(out: Path, histories, comparison: "Comparison", arrays, gaps=None) -> None:
    """curves.png, gap_bars.png (the final gaps: means and, with several seeds, standard
    deviations over seeds), gap_curves.png and reconstructions.png; curves and images show
    the first seed. The curves are drawn against the budget's unit (``curve_unit``); every
    error bar and band is ± 1 standard error (over seeds: ± 1 standard deviation), as in the
    report's tables."""
    (out / "gaps.png").unlink(missing_ok=True)  # this figure's name before gap_bars.png
    first = comparison.seeds[0]
    unit = curve_unit(comparison)
    passes = {g: comparison.runs_of(g)[0].compute.step.passes for g in comparison.guides
              if comparison.runs_of(g)}
    per_epoch = max([plots.steps_per_epoch(h) or 0 for h in histories.values()] + [0]) or None
    train, batch = (comparison.data or {}).get("train"), comparison.config.get("batch_size")
    if per_epoch is None and train and batch:
        per_epoch = -(-int(train) // int(batch))
    plots.curves(histories, out / "curves.png", "training curves, per guide"
                 + (f" (seed {first})" if comparison.several else ""), x=unit,
                 tables=_tables(comparison), steps_per_epoch=per_epoch,
                 passes_per_step=passes if unit == "passes" else None)
    if comparison.several:
        results = {}
        for g in comparison.guides:
            results[g] = {}
            for name in ("approximation_gap", "amortization_gap", "amortization_gap_encoder"):
                s = comparison.spread(g, rt.key(name))
                results[g].update({name: s.mean, name + "_sd": s.sd} if s is not None else {})
        gap_plots.gaps(results, out / "gap_bars.png", error="_sd", times=1.0,
                   title=f"inference gaps on the test set: mean ± sd over "
                         f"{len(comparison.seeds)} seeds", na=_na_reasons(comparison))
    else:
        gap_plots.gaps({r.guide: r.scores.by_quantity() for r in comparison.runs},
                   out / "gap_bars.png", times=1.0, na=_na_reasons(comparison))
    if gaps:
        gap_plots.gap_curves(gaps, out / "gap_curves.png", tables=_tables(comparison))
    first_arrays = next(iter(arrays.values()))
    rows = {"input": first_arrays["inputs"]}
    tables = _tables(comparison)  # their q of a test image is a fit to that image
    rows.update({f"{g} recon." + ("\n(q fitted to\neach image)" if g in tables else ""):
                 a["reconstructions"] for g, a in arrays.items()})
    plots.image_rows(rows, out / "reconstructions.png",
                     "test images and reconstructions (the decoder's mean at the posterior "
                     "mean)", first_arrays.get("shape"))
    np.savez_compressed(out / "arrays.npz", **{f"{g}_{k}": v for g, a in arrays.items()
                                               for k, v in a.items()})


def _budget(comparison: "Comparison") -> str:
    c = comparison.config
    if comparison.budget.unit == "epochs":
        text = f"the same budget of {rt.plural(c['epochs'], 'epoch')}"
    else:
        each = ", ".join(
            f"{g} {rt.plural(r.compute.steps, 'step')} ({rt.plural(r.compute.epochs, 'epoch')})"
            for g in comparison.guides for r in comparison.runs_of(g)[:1])
        if comparison.budget.unit == "flops":
            text = (f"the same budget of {comparison.budget.amount:,} FLOPs (forward and "
                    f"backward passes, counted on one step of each guide; {each})")
        else:
            text = (f"the same budget of {comparison.budget.amount:,} network passes (forward "
                    f"and backward passes of encoder and decoder over a minibatch; {each})")
    if c["max_seconds"] is not None:
        text += f" or {c['max_seconds']:.0f} s of training, whichever first"
    return text


def _compute(comparison: "Comparison") -> str:
    parts = []
    for g in comparison.guides:
        runs = comparison.runs_of(g)
        if not runs:
            continue
        step = runs[0].compute.step
        nets = ", ".join(f"{n} {rt.number(step.forward[n], 'steps')} forward + "
                         f"{rt.number(step.backward[n], 'steps')} backward" for n in step.forward)
        parts.append(f"{g}: {rt.number(step.passes, 'steps')} per step ({nets}), "
                     f"{step.flops_per_step:,} FLOPs")
    return "; ".join(parts)


def _local(comparison: "Comparison") -> str:
    text = ""
    for g in comparison.guides:
        runs = [r for r in comparison.runs_of(g) if r.local is not None]
        if not runs:
            continue
        stored, fitted, gap = (comparison.spread(g, name) for name in
                               ("local_stored", "local_fitted", "local_gap"))
        r = runs[0].local
        over = (f" (means over {len(runs)} seeds; the gap ranges from {min(gap.values):.2f} "
                f"to {max(gap.values):.2f})" if len(runs) > 1
                else f" (± {r.gap_stderr:.2f} over rows)")
        text += (f"\nThe {g} guide's local budget: each training row was visited "
                 f"{r.visits:.1f} times in training. On its first {r.rows} training rows (as "
                 f"the run saw them), the ELBO of the rows as stored is {stored.mean:.2f}; a "
                 f"fresh local fit of those rows with the decoder frozen (warm-started from the "
                 f"stored rows, the stopping rule of the test-time fit, {rt.plural(r.fit_steps, 'step')}) "
                 f"reaches {fitted.mean:.2f}: the table's rows were {gap.mean:.2f} nats short of "
                 f"a local optimum{over}. Where that gap is large beside the amortization gaps, "
                 f"the comparison at this budget is about the local optimizer's budget as much "
                 f"as about amortization.\n")
    return text


def tracked_epochs(gaps: Dict[str, List[dict]]) -> str:
    """The epochs the gap curves were scored at, read from each guide's ``gaps.jsonl`` rows
    (under a budget in passes or FLOPs, or a run stopped early, the guides' epochs differ):
    one list when the guides share it, else one per guide."""
    lists = {g: ", ".join(map(str, sorted({int(r["epoch"]) for r in rows})))
             for g, rows in gaps.items()}
    if len(set(lists.values())) == 1:
        return next(iter(lists.values()))
    return "; ".join(f"{epochs} ({g})" for g, epochs in lists.items())


def over_budget(curves) -> str:
    """The curves over budget (``budget_curves.Curves``) as a table of log p(x) per tracked
    epoch, mean ± sd over seeds, and a table of the crossings of two guides' rankings."""
    if curves is None:
        return ""
    guides = list(curves.points)
    epochs = sorted({p.epoch for pts in curves.points.values() for p in pts})
    head = "| epoch | " + " | ".join(guides) + " |\n|---|" + "---|" * len(guides) + "\n"
    body = ""
    for e in epochs:
        cells = []
        for g in guides:
            s = next((p.values.get("log_px") for p in curves.points[g] if p.epoch == e), None)
            cells.append("n/a" if s is None else
                         f"{s.mean:.2f}" + (f" ± {s.sd:.2f}" if s.sd is not None else ""))
        body += f"| {e} | " + " | ".join(cells) + " |\n"
    crossed = "".join(
        f"| {NAMES[c.quantity]} | {c.a} × {c.b} | {c.low:,.3g} to {c.high:,.3g} {c.unit} | "
        f"{c.before} | {c.b if c.before == c.a else c.a} |\n" for c in curves.crossings)
    n = len(curves.seeds)
    return (f"\n## Over budget\n\n![curves over budget](budget_curves.png)\n\n"
            f"{curves.split.capitalize()} log p(x) (the gap curves' K and rows) at each tracked "
            f"epoch, mean ± sd over {rt.plural(n, 'seed')}; `results.json` (`curves`) has every "
            f"{curves.split}-row quantity, the budget in steps, passes and FLOPs, and the paired "
            f"differences at each epoch.\n\n{head}{body}\n"
            + ("Rankings that cross (means over seeds; in compute, each guide's curve "
               "interpolated in log compute; a gap ranks lower first):\n\n"
               "| quantity | guides | between | first before | first after |\n"
               "|---|---|---|---|---|\n" + crossed if crossed else
               "No two guides' ranking in any quantity crosses within the tracked budget, in "
               "epochs or in compute.\n"))


def markdown(comparison: "Comparison", gaps: Optional[Dict[str, List[dict]]] = None,
             over=None) -> str:
    """The comparison as Markdown (``gaps``: each guide's gap-curve rows of the first seed,
    when tracked; ``over``: its curves over budget).

    Why so long: it is the report's template, one f-string section after another in the
    order the reader meets them; each section's numbers come from a helper."""
    c = comparison.config
    names = comparison.guides
    n = len(comparison.seeds)
    head = "| quantity | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    body = ""
    for label, quantity, with_error in rt.ROWS:
        if all(comparison.spread(g, rt.key(quantity)) is None for g in names):
            continue
        cells = [rt.cell(comparison, g, quantity, with_error) for g in names]
        body += f"| {label.format(K=comparison.runs[0].scores.num_particles)} | " \
            + " | ".join(cells) + " |\n"
    a = comparison.runs[0].scores
    with_gap_curves = bool(gaps)
    curves = ("\n![gap curves](gap_curves.png)\n\nGap curves: L[q], L[q*] and log p(x) "
              f"(IWAE bound, K = {c['gap_particles']}) on the first {c['gap_rows']} training "
              f"and test rows at epochs {tracked_epochs(gaps or {})}"
              + (f" (seed {comparison.seeds[0]})" if comparison.several else "")
              + "; each guide's `gaps.jsonl` has the numbers.\n" if with_gap_curves else "")
    curves += over_budget(over)
    if comparison.several:
        listed = ", ".join(map(str, comparison.seeds))
        seeds = (f"Every guide is trained from each of {n} seeds ({listed}): "
                 f"a seed sets the decoder's and encoder's initialization, the data order and "
                 f"the training binarization noise; the seeds ran one after another in one "
                 f"process. Under one seed every guide has the same decoder initialization")
        errors = (f"Each cell is the mean ± the standard deviation over the {n} seeds (one "
                  f"number where every seed gave the same); the per-seed values are below and "
                  f"in `results.json`. The error bars of gap_bars.png are ± one standard "
                  f"deviation over seeds, as the cells"
                  + ("; the bands of gap_curves.png (the first seed) are ± one standard error "
                     "over the scored rows" if with_gap_curves else ""))
    else:
        seeds = f"Every guide: same decoder initialization (seed {comparison.seeds[0]})"
        errors = ("Errors are ± one standard error over test images (paired for the gaps); "
                  + ("the error bars of gap_bars.png and the bands of gap_curves.png are ± one "
                     "standard error too" if with_gap_curves else
                     "the error bars of gap_bars.png are ± one standard error too"))
    settings = guide_settings(comparison)
    tables = [g for g in names if g in _tables(comparison)]
    refined = [g for g in names if "refine_steps" in settings[g]]
    refining = (", so differentiating through a refinement counts its passes again"
                if refined else "")
    table_train = (f" (for {_and(tables)}, a per-datapoint table, the ELBO of its table rows "
                   f"as stored when visited: a row is updated only when its minibatch comes "
                   f"round, while its valid curve refits the validation rows every epoch, so "
                   f"its train curve can lie far under its valid curve: that distance is the "
                   f"table's unfinished fit of its rows, not overfitting)" if tables else "")
    if curve_unit(comparison) == "epoch":
        against = "against epochs"
    else:
        against = ("against network passes, the budget's unit (a guide whose step costs more "
                   "passes takes fewer steps; a partial last epoch ends where its passes ran "
                   "out)")
    answers = [f"{g}: its encoder" for g in names if g not in tables + refined]
    answers += [f"{g}: the refined encoder" for g in refined]
    answers += [f"{g}: a per-datapoint fit warm-started from the previous epoch, up to "
                f"{VALID_FIT_STEPS} steps with the decoder frozen" for g in tables]
    answers = f" ({'; '.join(answers)})" if tables or refined else ""
    return f"""# {title(names)}

Date {comparison.date}, device `{comparison.device}`, torch {comparison.versions['torch']}, pyro {comparison.versions['pyro']}, git `{comparison.versions['git']}`: the process that wrote this report (after a `--resume`, runs it kept were trained earlier; each run folder's `config.json` names the versions and commit that last trained it).

{_quick(comparison)}Data: {c['dataset']}, {_sizes(comparison)}; {c['binarize']} binarization for training; the test rows are scored
under one fixed binarization. Model: {c['latent_dim']}-dimensional latent, {c['net']} networks, hidden {c['hidden']} ({c['activation']}),
{c['likelihood']} likelihood, {c['prior']} prior. {seeds},
same data order, {_budget(comparison)}, batch {c['batch_size']}, Adam lr {c['lr']}{_settings_text(comparison)}.
Wall time and steps per second are reported beside the numbers; they are not the budget.

log p(x) is importance-sampled with K = {a.num_particles} particles from {"the locally optimized q*" if a.proposal == "local" else "the guide itself"}
(proposal `{a.proposal}`): the IWAE bound, a stochastic lower bound on log p(x) (its expectation lies
below log p(x), by less as K grows), so the approximation gap log p(x) - L[q*] drawn from it is
a lower estimate too. {errors}.{q_star_families(comparison)}

{head}{body}{gap_notes(comparison)}
Compute, counted on one optimizer step of each guide (a pass is one evaluation of a network
over a minibatch, forward or backward; K particles count K; a backward pass is counted each
time a gradient flows back through a forward pass{refining}): {_compute(comparison)}. Validation and evaluation are not counted.
{_local(comparison)}{rt.differences_table(comparison) if comparison.several else ""}{rt.per_seed_table(comparison) if comparison.several else ""}
Curves, {against}: "train" is the training objective over the epoch's minibatches{table_train}; "valid" is the ELBO on
{_valid_rows(comparison)} validation rows of the guide as it answers for new rows{answers}{f"; seed {comparison.seeds[0]}" if comparison.several else ""}.

![ELBO curves](curves.png)

![gaps](gap_bars.png)
{curves}
![reconstructions](reconstructions.png)
{_cremer(comparison)}"""


def _cremer(comparison: "Comparison") -> str:
    """The paper's MNIST numbers, beside an MNIST comparison only."""
    if str(comparison.config.get("dataset", "")).lower() != "mnist":
        return ""
    return ("\nFor reference, Cremer, Li & Duvenaud (2018) report for MNIST with a factorized "
            "Gaussian\nabout 1.4 nats of approximation gap and 1.3 nats of amortization gap (a "
            "larger model, 3,280\nepochs); `experiments/README.md` compares.\n")


def is_quick(comparison: "Comparison") -> bool:
    """Whether the comparison ran under ``--quick`` (``Comparison.quick``)."""
    return bool(comparison.quick)


def _quick(comparison: "Comparison") -> str:
    if not is_quick(comparison):
        return ""
    c, k = comparison.config, comparison.runs[0].scores.num_particles
    train = (comparison.data or {}).get("train") or c.get("train_size")
    return (f"**A smoke look, not a verdict.** `--quick` trains {rt.plural(c['epochs'], 'epoch')} "
            f"on {_count(train)} training rows "
            f"and scores {comparison.runs[0].scores.rows:,} test rows with K = {k}: enough to "
            f"see every guide train and be scored, too little to rank the guides or to read "
            f"the gaps. Run without `--quick` for numbers to compare.\n\n")


def _count(n) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) else "?"


def _valid_rows(comparison: "Comparison") -> str:
    """How many validation rows the curves' valid ELBO scores: the first ``valid_size``."""
    size, held = comparison.config.get("valid_size"), (comparison.data or {}).get("valid")
    if size is None or (held is not None and size >= held):
        return _count(held) if held is not None else "all"
    return _count(size)


def _sizes(comparison: "Comparison") -> str:
    """The data's sizes: training, validation and test rows, and how many were scored."""
    d, c = comparison.data or {}, comparison.config
    scored = comparison.runs[0].scores.rows
    parts = []
    if d.get("train") is not None:
        parts.append(f"{_count(d['train'])} training rows"
                     + (" (the first rows of the training split, by --train-size)"
                        if c.get("train_size") is not None else ""))
    if d.get("valid") is not None:
        valid = _valid_rows(comparison)
        parts.append(f"{_count(d['valid'])} validation rows"
                     + (f" (the first {valid} scored each epoch)" if valid != _count(d["valid"])
                        else " (all scored each epoch)"))
    if d.get("test") is not None:
        cut = " rows of the test split, by --test-size" if c.get("test_size") is not None else ""
        parts.append(f"{_count(d['test'])} test rows"
                     + (f" (the first {scored:,} scored)" if scored < d["test"]
                        else f" (the first{cut}; all scored)" if cut else " (all scored)"))
    else:
        parts.append(f"{scored:,} test rows scored")
    shape = d.get("shape")
    if shape:
        parts.append("images of " + " x ".join(str(v) for v in shape))
    return ", ".join(parts)
