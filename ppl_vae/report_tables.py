"""The report's numbers: which quantities its table shows (``ROWS``, each a number a run
has: ``results.GuideRun.numbers``), how a cell and a paired difference are written, and the
per-seed table. The prose around them is ``report.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .evaluate import Scores
from .seeds import MIN_SEEDS, t975

if TYPE_CHECKING:
    from .results import Comparison


# (label, quantity, with its error): a ``Scores`` quantity (named in results.json by
# ``Scores.json_key``) or a number of the run (``GuideRun.numbers``); ``{K}`` in a label is
# the K of the log p(x) estimate
ROWS = [
    ("test ELBO of its own guide, L[q] (nats)", "elbo", True),
    ("test ELBO of the bare encoder (semi-amortized)", "elbo_encoder", True),
    ("test ELBO after local optimization, L[q*]", "elbo_local", True),
    ("log p(x) (IWAE bound, K = {K}: a stochastic lower bound)", "log_px", True),
    ("approximation gap log p(x) - L[q*]", "approximation_gap", True),
    ("amortization gap L[q*] - L[q]", "amortization_gap", True),
    ("amortization gap of the bare encoder", "amortization_gap_encoder", True),
    ("rate KL(q‖p) of its own guide", "rate", False),
    ("distortion -E_q log p(x|z)", "distortion", False),
    ("active units", "active_units", False),
    ("table rows: ELBO as stored at the end of training", "local_stored", False),
    ("table rows: ELBO after a local fit (decoder frozen)", "local_fitted", False),
    ("table rows: local gap, fit - stored", "local_gap", True),
    ("table rows: visits per row in training", "local_visits", False),
    ("epochs", "epochs", False),
    ("optimizer steps", "steps", False),
    ("network passes per optimizer step (fwd + bwd)", "passes_per_step", False),
    ("network passes in all", "total_passes", False),
    ("FLOPs per optimizer step (fwd + bwd)", "flops_per_step", False),
    ("FLOPs in all", "total_flops", False),
    ("training time (s)", "train_seconds", False),
    ("steps per second", "steps_per_second", False),
    ("first epoch (s; holds the compile and warm-up)", "first_epoch_seconds", False),
    ("steady state: seconds per epoch (median of later epochs)", "steady_seconds_per_epoch",
     False),
    ("steady state: steps per second", "steady_steps_per_second", False),
    ("gap curves: seconds", "gap_tracking_seconds", False),
    ("peak RSS during its training and scoring (MiB)", "peak_rss_mb", False),
    ("parameters (MiB)", "param_mb", False),
    ("test-time local inference: steps", "local_steps", False),
    ("test-time local inference: seconds", "local_seconds", False),
    ("log p(x) estimate: seconds", "log_px_seconds", False),
]


COUNTS = {"epochs", "steps", "active_units", "local_steps", "passes_per_step", "total_passes",
          "flops_per_step", "total_flops"}


BIG_COUNTS = {"total_passes", "flops_per_step", "total_flops"}  # written with thousands commas


PAIRED_LABELS = {"log_px": "log p(x)", "elbo_local": "L[q*]", "elbo": "its own test ELBO L[q]",
                 "approximation_gap": "approximation gap", "amortization_gap": "amortization gap"}


PER_SEED = [("L[q]", "elbo"), ("L[q*]", "elbo_local"), ("log p(x)", "log_px"),
            ("approx. gap", "approximation_gap"), ("amort. gap", "amortization_gap"),
            ("table gap", "local_gap"), ("steps", "steps"), ("passes", "total_passes"),
            ("train s", "train_seconds")]


def key(quantity: str) -> str:
    """A quantity's name among a run's numbers: a test score's as results.json names it."""
    return Scores.json_key(quantity, "test")


def plural(n, word: str, many: Optional[str] = None) -> str:
    """``1 epoch``, ``2 epochs``: the count and the word in its number."""
    one = isinstance(n, (int, float)) and not isinstance(n, bool) and float(n) == 1
    return f"{n} {word}" if one else f"{n} {many or word + 's'}"


def number(v, quantity: str = "") -> str:
    if v is None:
        return "n/a"
    if quantity in COUNTS and float(v).is_integer():
        return f"{int(v):,}" if quantity in BIG_COUNTS else str(int(v))
    if isinstance(v, int):
        return str(v)
    return f"{v:.2f}"


def formatted(v, stderr=None, quantity: str = "") -> str:
    if v is None:
        return "n/a"
    return f"{number(v, quantity)} ± {stderr:.2f}" if stderr is not None else number(v, quantity)


def cell(comparison: "Comparison", guide: str, quantity: str, with_error: bool) -> str:
    """One guide's ``quantity``: value ± standard error over test rows (one seed), or mean ±
    standard deviation over seeds (one value when every seed gave the same)."""
    name = key(quantity)
    if comparison.several:
        s = comparison.spread(guide, name)
        if s is None:
            return "n/a"
        if len(set(s.values)) == 1:
            return number(s.values[0], quantity)
        return f"{number(s.mean, quantity)} ± {s.sd:.2f}"
    runs = comparison.runs_of(guide)
    numbers = runs[0].numbers() if runs else {}
    return formatted(numbers.get(name), numbers.get(key(quantity + "_stderr")) if with_error
                else None, quantity)


def signed(v: float) -> str:
    return f"{v:+.2f}"


def differences_table(comparison: "Comparison") -> str:
    diffs = comparison.differences()
    if not diffs:
        return ""
    n = len(comparison.seeds)
    judged = n >= MIN_SEEDS
    head = ("| quantity | difference | mean | sd | 95% interval | per seed | settled |\n"
            "|---|---|---|---|---|---|---|\n")
    body, settled, open_, excluding = "", [], [], []
    for d in diffs:
        label = next((v for q, v in PAIRED_LABELS.items() if key(q) == d.quantity), d.quantity)
        interval = "n/a" if d.low is None else f"[{d.low:.2f}, {d.high:.2f}]"
        per_seed = ", ".join(signed(v) for v in d.values)
        verdict = ({True: "yes", False: "no", None: "n/a"}[d.excludes_zero] if judged
                   else f"not judged ({plural(n, 'seed')})")
        body += (f"| {label} | {d.a} − {d.b} | {signed(d.mean)} | "
                 f"{'n/a' if d.sd is None else f'{d.sd:.2f}'} | {interval} | {per_seed} | "
                 f"{verdict} |\n")
        words = f"{d.a} − {d.b} in {label}: {signed(d.mean)} nats {interval}"
        (settled if judged and d.settled else open_).append(words)
        if not judged and d.excludes_zero:
            excluding.append(words)
    text = (f"\n## Paired differences between guides over {n} seeds\n\nEach difference is "
            f"taken seed by seed (the two guides share that seed's decoder initialization, "
            f"data order and noise, and the same test rows), then averaged; the interval is "
            f"mean ± t(0.975, {n - 1}) × sd / √{n}. A difference is settled when its interval "
            f"excludes 0 and it rests on {MIN_SEEDS} seeds or more.\n\n{head}{body}\n")
    if not judged:
        dof = plural(n - 1, "degree") + " of freedom"
        text += (f"Settled: none. With {plural(n, 'seed')} each interval rests on {dof} "
                 f"(its half-width is t(0.975, {n - 1}) = {t975(n - 1):.2f} times sd / √{n}, "
                 f"with the sd estimated from {n} values), too little to tell a difference between the "
                 f"guides from the seeds' noise, so this report calls a difference settled "
                 f"only from {MIN_SEEDS} seeds up (`--seeds {MIN_SEEDS}`).\n\n")
        text += ("Not settled: every difference above"
                 + (f"; the interval excludes 0 at {plural(n, 'seed')} for "
                    + "; ".join(excluding) if excluding else "") + ".\n")
        return text
    text += ("Settled: " + "; ".join(settled) + ".\n\n" if settled else
             "Settled: none of the differences.\n\n")
    text += ("Not settled (the interval includes 0; more seeds or a longer budget would be "
             "needed to tell): " + "; ".join(open_) + ".\n" if open_ else
             "Not settled: none; every difference above excludes 0.\n")
    return text


def per_seed_table(comparison: "Comparison") -> str:
    head = ("| guide | seed | " + " | ".join(label for label, _ in PER_SEED) + " |\n|---|---|"
            + "---|" * len(PER_SEED) + "\n")
    body = ""
    for g in comparison.guides:
        for r in comparison.runs_of(g):
            numbers = r.numbers()
            body += (f"| {g} | {r.seed} | "
                     + " | ".join(number(numbers.get(key(q)), q) for _, q in PER_SEED) + " |\n")
    return f"\nPer seed (each run's folder is `<guide>/seed<S>`):\n\n{head}{body}"
