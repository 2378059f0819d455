"""Benchmark: ppl_vae's SVI steps against hand-written PyTorch steps and Pyro's tutorial VAE.

Every guide (amortized, per-datapoint, semi-amortized) is timed beside a hand-written PyTorch
step of the same computation (``HandVAE``, ``HandLocal``, ``HandSemi``), eager and as the
default (compiled) step.

Same data (binarized MNIST), architecture (784-400-50 MLPs) and batch sizes; medians over
interleaved repeats after a warm-up; CUDA synchronized before clocks are read. Prints a table
of ms per step with the ratios ppl_vae / hand-written and ppl_vae / plain Pyro, and saves JSON.

    uv run python experiments/bench.py                    # full (CPU; CUDA too when present)
    uv run python experiments/bench.py --smoke            # seconds, for the tests
    uv run python experiments/bench.py --devices cpu --no-logpx --batch-sizes 128 --repeats 21
                                                          # the guard's target, more rounds
    uv run python experiments/bench.py --part guides      # every guide beside its hand-written
                                                          # step: eager, default (compiled)
    uv run python experiments/bench.py --part eval --run runs/x   # q*: eager loop against the
                                                          # compiled step; log p(x), K = 5000
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam as PyroAdam

from ppl_vae import batching, data, guides, nets, objectives, optim, priors, step, train
from ppl_vae.compiled import PAYS_FROM_LOG_PX_ROWS, Compiled, compiles
from ppl_vae.evaluate import chunk_rows, log_px
from ppl_vae.likelihoods import Bernoulli
from ppl_vae.model import VAEModel


class HandVAE(nn.Module):
    """The same VAE written directly in PyTorch: the reference limit."""

    def __init__(self, d=784, h=400, z=50):
        super().__init__()
        self.enc = nets.mlp([d, h, 2 * z])
        self.dec = nets.mlp([z, h, d])

    def loss(self, x):
        loc, raw = self.enc(x).chunk(2, -1)
        scale = F.softplus(raw) + 1e-5
        z = loc + scale * torch.randn_like(loc)
        rec = -F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
        kl = (0.5 * (loc ** 2 + scale ** 2 - 1) - scale.log()).sum()
        return -(rec - kl)


def hand_step(model, opt, x, loss_fn=None):
    opt.zero_grad(set_to_none=True)
    loss = (loss_fn or model.loss)(x)
    loss.backward()
    opt.step()


class TutorialVAE(nn.Module):
    """Pyro's VAE tutorial: pyro.module, SVI + Trace_ELBO + pyro.optim.Adam, a DataLoader."""

    def __init__(self, d=784, h=400, z=50):
        super().__init__()
        self.enc, self.dec, self.z = nets.mlp([d, h, 2 * z]), nets.mlp([z, h, d]), z

    def model(self, x):
        pyro.module("dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z), 1.0).expand([self.z]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("enc", self.enc)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.enc(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-5).to_event(1))


class HandLocal(nn.Module):
    """The per-datapoint VAE written directly in PyTorch: a decoder and an N x 2L table whose
    batch rows get one local-only update with per-row Adam, then a joint step (fused Adam
    for the decoder, per-row Adam for the rows): the reference of ppl_vae's meanfield step
    with inner_steps=1."""

    def __init__(self, n, d=784, h=400, z=50, lr=1e-3, local_lr=0.2):
        super().__init__()
        self.dec = nets.mlp([z, h, d])
        self.n, self.local_lr = n, local_lr
        self.table = torch.zeros(n, 2 * z)
        self.table[:, z:] = nets.softplus_inv(1.0)
        self.m, self.v = torch.zeros(n, 2 * z), torch.zeros(n, 2 * z)
        self.t = torch.zeros(n)
        self.opt = torch.optim.Adam(self.dec.parameters(), lr, fused=True)

    def to(self, device):
        super().to(device)
        for k in ("table", "m", "v", "t"):
            setattr(self, k, getattr(self, k).to(device))
        self.opt = torch.optim.Adam(self.dec.parameters(), self.opt.defaults["lr"], fused=True)
        return self

    def loss(self, rows, x):
        loc, raw = rows.chunk(2, -1)
        scale = F.softplus(raw) + 1e-5
        z = loc + scale * torch.randn_like(loc)
        rec = -F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
        log_ratio = (-0.5 * z ** 2 + 0.5 * ((z - loc) / scale) ** 2 + scale.log()).sum()
        return -(rec + log_ratio) * (self.n / len(x))  # the ELBO scaled to the data set

    @torch.no_grad()
    def row_adam(self, idx, g, b1=0.9, b2=0.999, eps=1e-8):
        """Adam on rows ``idx`` (distinct) alone, each with its own step count."""
        self.t[idx] += 1
        t = self.t[idx].unsqueeze(-1)
        m = self.m[idx].lerp_(g, 1 - b1)
        v = self.v[idx].mul_(b2).addcmul_(g, g, value=1 - b2)
        self.m[idx], self.v[idx] = m, v
        self.table[idx] -= self.local_lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)

    def step(self, idx, x):
        rows = self.table[idx].requires_grad_()
        (g,) = torch.autograd.grad(self.loss(rows, x), [rows])  # local-only update
        self.row_adam(idx, g)
        rows = self.table[idx].requires_grad_()
        self.opt.zero_grad(set_to_none=True)
        self.loss(rows, x).backward()  # the joint step
        self.opt.step()
        self.row_adam(idx, rows.grad)


class HandSemi(HandVAE):
    """The semi-amortized VAE (Kim et al. 2018) written directly in PyTorch: the encoder's
    q, K reparameterized gradient steps on each row's ELBO (analytic KL) with
    create_graph=True, each row's gradient clipped to norm 10, then the ELBO of the refined
    q differentiated end to end: the reference of ppl_vae's semiamortized step."""

    def __init__(self, d=784, h=400, z=50, steps=5, step_size=0.05, max_norm=10.0):
        super().__init__(d, h, z)
        self.steps, self.step_size, self.max_norm = steps, step_size, max_norm

    def refine(self, x, loc, raw):
        for _ in range(self.steps):
            scale = F.softplus(raw) + 1e-5
            z = loc + scale * torch.randn_like(loc)
            rec = -F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
            kl = (0.5 * (loc ** 2 + scale ** 2 - 1) - scale.log()).sum()
            g_loc, g_raw = torch.autograd.grad(rec - kl, [loc, raw], create_graph=True)
            norm = torch.cat([g_loc, g_raw], -1).norm(dim=-1, keepdim=True)
            clip = (self.max_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
            loc = loc + self.step_size * clip * g_loc
            raw = raw + self.step_size * clip * g_raw
        return loc, raw

    def loss(self, x):
        loc, raw = self.refine(x, *self.enc(x).chunk(2, -1))
        scale = F.softplus(raw) + 1e-5
        z = loc + scale * torch.randn_like(loc)
        rec = -F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
        log_ratio = (-0.5 * z ** 2 + 0.5 * ((z - loc) / scale) ** 2 + scale.log()).sum()
        return -(rec + log_ratio)


def guide_cases(device, b, x, idx, n, compile_default=True):
    """Per guide: the hand-written PyTorch step, ppl_vae's eager step and its default step
    (compiled: what ``compile auto`` runs for a run that repays the compile), as the
    training loop takes them (guarded, the verdict kept on the device)."""
    cases, compile_s = {}, {}
    for guide_name in ("amortized", "meanfield", "semiamortized"):
        if guide_name == "amortized":
            hand = HandVAE().to(device)
            opt = torch.optim.Adam(hand.parameters(), 1e-3, fused=True)
            cases[(guide_name, "hand")] = lambda hand=hand, opt=opt: hand_step(hand, opt, x)
        elif guide_name == "meanfield":
            hand = HandLocal(n).to(device)
            cases[(guide_name, "hand")] = lambda hand=hand: hand.step(idx, x)
        else:
            hand = HandSemi().to(device)
            opt = torch.optim.Adam(hand.parameters(), 1e-3, fused=True)
            cases[(guide_name, "hand")] = lambda hand=hand, opt=opt: hand_step(hand, opt, x)
        batch = batching.Batch(x, idx, n)
        for kind in ("eager", "default") if compile_default else ("eager",):
            model, guide, opts = built(guide_name, n, device)
            objective = Compiled(objectives.ELBO()) if kind == "default" else objectives.ELBO()
            cases[(guide_name, kind)] = (
                lambda m=model, g=guide, o=opts, obj=objective:
                step.step_on_device(m, g, obj, batch, o))
            if kind == "default":
                t = time.perf_counter()
                for _ in range(2):  # the first call traces and compiles
                    cases[(guide_name, kind)]()
                compile_s[guide_name] = time.perf_counter() - t
    return cases, compile_s


def built(guide_name, n, device):
    """Model, guide and optimizers of ``ppl-vae train --guide guide_name`` (784-400-50)."""
    torch.manual_seed(0)
    model = VAEModel(nets.Decoder(50, [400], 784), Bernoulli(), priors.StandardNormal(50)).to(device)
    if guide_name == "meanfield":
        guide = guides.LocalNormal(n, 50).to(device)
        return model, guide, optim.make_optimizers(model, guide, 1e-3, 0.2, inner_steps=1)
    encoder = nets.Encoder(784, [400], 50)
    guide = (guides.AmortizedNormal(encoder) if guide_name == "amortized" else
             guides.SemiAmortizedNormal(encoder, model, steps=5, step_size=0.05)).to(device)
    return model, guide, optim.make_optimizers(model, guide, 1e-3)


def bench_guides(device, batch_sizes, repeats, steps, compile_default=True):
    """Every guide's step beside its hand-written reference, interleaved per batch size."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    train_x = data.load("mnist").train.x.to(device)
    rows, compile_seconds = {}, {}
    for b in batch_sizes:
        g = torch.Generator().manual_seed(b)
        idx = torch.randperm(len(train_x), generator=g)[:b].to(device)  # distinct rows
        x = torch.bernoulli(train_x[idx])
        cases, compile_seconds[b] = guide_cases(device, b, x, idx, len(train_x), compile_default)
        for fn in cases.values():  # warm-up
            for _ in range(3):
                fn()
        times = {k: [] for k in cases}
        names = list(cases)
        for r in range(repeats):  # interleaved, each round starting one case later
            for k in names[r % len(names):] + names[:r % len(names)]:
                times[k].append(timed(cases[k], sync, steps))
        rows[b] = {f"{g} {k}": 1e3 * statistics.median(v) for (g, k), v in times.items()}
    return {"ms_per_step": rows, "compile_seconds": compile_seconds}


def guides_table(name, result) -> str:
    """Markdown: per guide and batch, ms per step and the ratios to the hand-written step."""
    lines = [f"### {name}: every guide beside its hand-written PyTorch step", "",
             "| guide | batch | hand-written ms | ours eager ms | ours default ms | "
             "eager / hand | default / hand | compile s |", "|---" * 8 + "|"]
    for guide_name in ("amortized", "meanfield", "semiamortized"):
        for b, row in result["ms_per_step"].items():
            hand, eager = row[f"{guide_name} hand"], row[f"{guide_name} eager"]
            default = row.get(f"{guide_name} default", math.nan)
            compile_s = result["compile_seconds"][b].get(guide_name, math.nan)
            lines.append(f"| {guide_name} | {b} | {hand:.2f} | {eager:.2f} | {default:.2f} | "
                         f"{eager / hand:.2f} | {default / hand:.2f} | {compile_s:.1f} |")
    return "\n".join(lines)


def timed(fn, sync, n):
    """Median over ``n`` calls of one call's seconds."""
    out = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def ours(n, device, local=False):
    model = VAEModel(nets.Decoder(50, [400], 784), Bernoulli(), priors.StandardNormal(50)).to(device)
    if local:
        guide = guides.LocalNormal(n, 50).to(device)
        opts = optim.make_optimizers(model, guide, 1e-3, 0.1, inner_steps=0)
    else:
        guide = guides.AmortizedNormal(nets.Encoder(784, [400], 50)).to(device)
        opts = optim.make_optimizers(model, guide, 1e-3)
    return model, guide, opts


def bench_device(device, batch_sizes, repeats, steps, local_sizes, epoch, logpx_k, logpx_rows):
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    splits = data.load("mnist")
    train_x = splits.train.x.to(device)
    binar = data.Binarize("dynamic")
    rows, compile_seconds = {}, {}
    for b in batch_sizes:
        g = torch.Generator().manual_seed(b)
        idx = torch.randint(len(train_x), (b,), generator=g).to(device)
        x = torch.bernoulli(train_x[idx])
        hand = HandVAE().to(device)
        hand_opt = torch.optim.Adam(hand.parameters(), 1e-3, fused=True)  # fastest plain Adam
        tut = TutorialVAE().to(device)
        pyro.clear_param_store()
        svi = SVI(tut.model, tut.guide, PyroAdam({"lr": 1e-3}), Trace_ELBO())
        model, guide, opts = ours(len(train_x), device)
        objective = objectives.ELBO()
        batch = batching.Batch(x, idx, len(train_x))
        cmodel, cguide, copts = ours(len(train_x), device)
        compiled = Compiled(objectives.ELBO())
        chand = HandVAE().to(device)
        chand_opt = torch.optim.Adam(chand.parameters(), 1e-3, fused=True)
        chand_loss = torch.compile(chand.loss)
        cases = {
            "hand-written PyTorch": lambda: hand_step(hand, hand_opt, x),
            "hand-written, torch.compile": lambda: hand_step(chand, chand_opt, x, chand_loss),
            "plain Pyro (tutorial)": lambda: svi.step(x),
            # the step the training loop takes: guarded, the verdict kept on the device
            "ppl_vae amortized": lambda: step.step_on_device(model, guide, objective, batch,
                                                              opts),
            "ppl_vae amortized, compiled": (
                lambda: step.step_on_device(cmodel, cguide, compiled, batch, copts)),
            "compiled, guard read every step": (  # the guard as it was: a host sync per step
                lambda: step.step(cmodel, cguide, compiled, batch, copts)),
            "compiled, no divergence guard": (  # what the guard costs (the references have none)
                lambda: step.step(cmodel, cguide, compiled, batch, copts, guard=False)),
        }
        compile_s = {}
        for name in ("hand-written, torch.compile", "ppl_vae amortized, compiled"):
            sync()
            t = time.perf_counter()
            for _ in range(2):  # the first call traces and compiles
                cases[name]()
            sync()
            compile_s[name] = time.perf_counter() - t
        for n in local_sizes:
            m, gd, o = ours(n, device, local=True)
            bidx = torch.randint(n, (b,), generator=g).to(device)
            cases[f"ppl_vae per-datapoint N={n:,}"] = (
                lambda m=m, gd=gd, o=o, bidx=bidx, n=n:
                step.step_on_device(m, gd, objective, batching.Batch(x, bidx, n), o))
        times = {k: [] for k in cases}
        for fn in cases.values():  # warm-up
            for _ in range(5):
                fn()
        names = list(cases)
        for r in range(repeats):  # interleaved, each round starting one case later, so no
            for k in names[r % len(names):] + names[:r % len(names)]:  # case always
                times[k].append(timed(cases[k], sync, steps))  # follows the same one
        rows[b] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        compile_seconds[b] = compile_s
    result = {"ms_per_step": rows, "compile_seconds": compile_seconds}
    if epoch:
        result["seconds_per_epoch"] = epoch_times(device, train_x, binar, sync)
    if logpx_k:
        model, guide, _ = ours(len(train_x), device)
        x_test = torch.bernoulli(splits.test.x[:logpx_rows].to(device))
        sub = x_test[:max(1, logpx_rows // 20)]
        for compile in (False, True):  # eager against compiled on a twentieth of the rows
            sync()
            t = time.perf_counter()
            log_px(model, guide, sub, logpx_k, compile=compile)
            sync()
            result[f"log_px_seconds_subset_{'compiled' if compile else 'eager'}"] = (
                time.perf_counter() - t)
        sync()
        t = time.perf_counter()
        log_px(model, guide, x_test, logpx_k)  # the default: compiled at this size
        sync()
        result["log_px_seconds"] = time.perf_counter() - t
        result["log_px_setting"] = {"K": logpx_k, "rows": len(x_test), "subset_rows": len(sub)}
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


def epoch_times(device, train_x, binar, sync, batch_size=128):
    """One epoch of each: ppl_vae's fit (eager; compiled, whose first epoch pays the compile
    and whose second is timed) and the tutorial's SVI loop over a DataLoader."""
    split = data.Split(train_x, torch.zeros(len(train_x), dtype=torch.long, device=device))
    model, guide, opts = ours(len(train_x), device)
    sync()
    t = time.perf_counter()
    train.fit(model, guide, objectives.ELBO(), split, opts, 1, batch_size, binar, progress=False)
    sync()
    ours_s = time.perf_counter() - t
    model, guide, opts = ours(len(train_x), device)
    history = train.fit(model, guide, Compiled(objectives.ELBO()), split, opts, 2, batch_size,
                        binar, progress=False, log=lambda _: None)
    tut = TutorialVAE().to(device)
    pyro.clear_param_store()
    svi = SVI(tut.model, tut.guide, PyroAdam({"lr": 1e-3}), Trace_ELBO())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_x.cpu()),
                                         batch_size=batch_size, shuffle=True)
    sync()
    t = time.perf_counter()
    for (x,) in loader:
        svi.step(torch.bernoulli(x.to(device)))
    sync()
    return {"ppl_vae": ours_s, "ppl_vae compiled": history[1].seconds,
            "ppl_vae compiled, first epoch": history[0].seconds,
            "plain Pyro (tutorial)": time.perf_counter() - t}


def table(name, result) -> str:
    """Markdown: ms per step for each case, then the ratios the targets are stated in."""
    rows = result["ms_per_step"]
    cases = list(next(iter(rows.values())))
    local = [c for c in cases if c.startswith("ppl_vae per-datapoint")]
    ratios = ["ours/hand", "ours/Pyro", "compiled/hand", "compiled/Pyro", "host-guard/hand",
              "unguarded/hand"]
    if local:
        ratios += ["local/ours", "local N max/min"] if len(local) > 1 else ["local/ours"]
    lines = [f"### {name}", "", "| batch | " + " | ".join(cases + ratios) + " |",
             "|---" * (len(cases) + len(ratios) + 1) + "|"]
    for b, row in rows.items():
        ours_ms = row["ppl_vae amortized"]
        comp_ms = row["ppl_vae amortized, compiled"]
        values = [ours_ms / row["hand-written PyTorch"], ours_ms / row["plain Pyro (tutorial)"],
                  comp_ms / row["hand-written PyTorch"], comp_ms / row["plain Pyro (tutorial)"],
                  row["compiled, guard read every step"] / row["hand-written PyTorch"],
                  row["compiled, no divergence guard"] / row["hand-written PyTorch"]]
        if local:
            values.append(row[local[0]] / ours_ms)
            if len(local) > 1:
                values.append(row[local[-1]] / row[local[0]])
        lines.append(f"| {b} | " + " | ".join(f"{row[c]:.2f}" for c in cases) + " | "
                     + " | ".join(f"{v:.2f}" for v in values) + " |")
    if "seconds_per_epoch" in result:
        e = result["seconds_per_epoch"]
        pyro_s = e["plain Pyro (tutorial)"]
        lines.append(f"\nepoch (50k rows, batch 128): plain Pyro {pyro_s:.2f} s; ppl_vae "
                     f"{e['ppl_vae']:.2f} s (ratio {e['ppl_vae'] / pyro_s:.2f}); compiled "
                     f"{e['ppl_vae compiled']:.2f} s (ratio {e['ppl_vae compiled'] / pyro_s:.2f}; "
                     f"its first epoch, with the compile, {e['ppl_vae compiled, first epoch']:.2f} s)")
    lines.append("\ncompile seconds (first two calls) by batch: " + "; ".join(
        f"{b}: " + ", ".join(f"{k} {v:.1f}" for k, v in c.items())
        for b, c in result["compile_seconds"].items()))
    if "log_px_seconds" in result:
        s = result["log_px_setting"]
        lines.append(f"\nlog p(x), K={s['K']} over {s['rows']:,} test rows: {result['log_px_seconds']:.1f} s "
                     f"(compiled, the default at this size). On {s['subset_rows']:,} rows: eager "
                     f"{result['log_px_seconds_subset_eager']:.1f} s, compiled (with its compile) "
                     f"{result['log_px_seconds_subset_compiled']:.1f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# evaluation: q* (test-time local inference) and log p(x)
# ---------------------------------------------------------------------------------------
def eval_model(run_dir, device):
    """A trained run's model, amortized guide and fixed-binarization test rows; without a
    run, untrained networks (log p(x)'s time does not depend on the weights, q*'s does)."""
    from ppl_vae import heldout, run_setup
    if run_dir:
        tr = run_setup.load_trained(Path(run_dir), device=device.type, warn=lambda *a, **k: None)
        return tr.model, tr.guide, heldout.eval_pixels(tr.config, tr.splits.test)
    model, guide, _ = ours(1, device)
    x = data.static_binarize(data.load("mnist").test, 1234).x.to(device)
    return model, guide, x


def _alternating(cases: dict, repeats: int, sync, run):
    """Time ``run(value)`` for every case, rounds alternating the order (so a drift of the
    machine's load hits every case alike); returns (seconds per case, last result per case)."""
    seconds, results = {k: [] for k in cases}, {}
    for r in range(repeats):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            sync()
            t = time.perf_counter()
            results[name] = run(cases[name])
            sync()
            seconds[name].append(time.perf_counter() - t)
    return seconds, results


def bench_eval(device, run_dir, q_rows, repeats, logpx_k, logpx_rows, logpx_repeats):
    """Interleaved: q* on ``q_rows`` test rows, eager loop (``compile=False``, the path before
    issue 23) and compiled step (the default), ``repeats`` rounds each, with L[q*] of both;
    then log p(x) with K = ``logpx_k`` on ``logpx_rows`` rows, plain and default chunks."""
    from ppl_vae.evaluate import elbo_parts, Estimate
    from ppl_vae.local_fit import local_inference
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model, guide, x_all = eval_model(run_dir, device)
    x = x_all[:q_rows]
    out = {"q_rows": len(x), "run": str(run_dir) if run_dir else None}
    t = time.perf_counter()  # the compile, once per process and shape
    local_inference(model, x[:min(len(x), 5000)], init=guide, max_steps=2, compile=True)
    out["q_compile_seconds"] = time.perf_counter() - t
    cases = {"eager (before)": False, "compiled (default)": True}
    seconds, fits = _alternating(
        cases, repeats, sync, lambda c: local_inference(model, x, init=guide, compile=c))
    for name, fit in fits.items():
        elbo = Estimate.of(elbo_parts(model, fit.guide, x, num_particles=10, seed=0).elbo)
        out[name] = {"seconds": seconds[name], "median_seconds": statistics.median(seconds[name]),
                     "steps": fit.steps, "L_q_star": elbo.mean, "L_q_star_stderr": elbo.stderr}
    a, b = (fits[k].guide.params for k in cases)
    out["q_max_abs_param_diff"] = float((a - b).detach().abs().max())
    if logpx_k:
        xs = x_all[:logpx_rows]
        compiled = compiles("auto", logpx_k * len(xs), PAYS_FROM_LOG_PX_ROWS)
        rows = chunk_rows(compiled)  # log_px's chunks, which the floor takes too
        lp = {DEFAULT: {}, FLOOR: None}
        if logpx_repeats > 1:  # the chunks before issue 30, interleaved
            lp["2 ** 15 rows a chunk (before)"] = dict(max_rows=2 ** 15)
        res, vals = _alternating(
            lp, logpx_repeats, sync, lambda kw: decoder_floor(model, len(xs), logpx_k, rows)
            if kw is None else log_px(model, guide, xs, logpx_k, **kw))
        out["log_px"] = {k: {"seconds": v, "mean": float(vals[k].double().mean())}
                         for k, v in res.items() if k != FLOOR}
        out["log_px_floor_seconds"] = res[FLOOR]
        out["log_px_over_floor"] = (statistics.median(res[DEFAULT])
                                    / statistics.median(res[FLOOR]))
        out["log_px_setting"] = {"K": logpx_k, "rows": len(xs), "compiled": compiled,
                                 "chunk_rows": rows}
    return out


FLOOR = "the decoder's matrix products alone (floor)"
DEFAULT = "log_px as evaluate runs it (default chunks)"


@torch.no_grad()
def decoder_floor(model, rows: int, k: int, max_rows: int = 2 ** 15) -> torch.Tensor:
    """The matrix products of the decoder's linear layers over the K x rows latent draws of
    a log p(x) estimate, in ``log_px``'s chunks, and nothing else (no bias, activation,
    sampling, likelihood or log-sum-exp): work that any exact estimate must do, so a floor
    for its time on this machine. A decoder without linear layers runs whole."""
    per_chunk = max(1, min(rows, max_rows // min(k, max_rows))) * min(k, max_rows)
    device = next(model.decoder.parameters()).device
    z = torch.randn(per_chunk, model.prior().event_shape[0], device=device)
    weights = [m.weight.T for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    outs = [torch.empty(per_chunk, w.shape[1], device=device, dtype=w.dtype) for w in weights]
    total, h = rows * k, None
    for start in range(0, total, per_chunk):
        n = min(per_chunk, total - start)
        if not weights:
            h = model.decoder(z[:n])
            continue
        h = z[:n]
        for w, out in zip(weights, outs):
            h = torch.mm(h, w, out=out[:n])
    return h


def eval_table(name, r) -> str:
    lines = [f"### {name}: evaluation ({r['q_rows']:,} test rows, run {r['run']})", "",
             "| q* | median s | runs (s) | steps | L[q*] |", "|---|---|---|---|---|"]
    for k in ("eager (before)", "compiled (default)"):
        c = r[k]
        lines.append(f"| {k} | {c['median_seconds']:.1f} | "
                     + ", ".join(f"{s:.1f}" for s in c["seconds"])
                     + f" | {c['steps']} | {c['L_q_star']:.3f} ± {c['L_q_star_stderr']:.3f} |")
    e, c = r["eager (before)"], r["compiled (default)"]
    lines.append(f"\nq* compiled / eager: {c['median_seconds'] / e['median_seconds']:.2f}; "
                 f"compile (once per process and shape) {r['q_compile_seconds']:.1f} s; "
                 f"largest difference of a fitted parameter {r['q_max_abs_param_diff']:.2g}")
    if "log_px" in r:
        s = r["log_px_setting"]
        lines.append(f"\nlog p(x), K = {s['K']} on {s['rows']:,} rows: " + "; ".join(
            f"{k} " + ", ".join(f"{t:.1f}" for t in v["seconds"]) + f" s (mean {v['mean']:.3f})"
            for k, v in r["log_px"].items()) + f"; {FLOOR} " + ", ".join(
            f"{t:.1f}" for t in r["log_px_floor_seconds"]) + " s"
            + f"; log p(x) / floor (medians): {r['log_px_over_floor']:.2f} (target: 1.3 at most; "
              f"{s['chunk_rows']} decoder rows a chunk, compiled: {s['compiled']})")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny settings, seconds")
    p.add_argument("--out", type=Path, default=Path("runs/bench.json"))
    p.add_argument("--no-logpx", action="store_true", help="skip the K=5000 log p(x) timing")
    p.add_argument("--devices", default="cpu,cuda",
                   help="comma-separated; cuda is skipped where it is not available")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated (default 32,128,512; --smoke: 32)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds of 20 steps per case (default 7; --smoke: 2)")
    p.add_argument("--part", choices=("all", "amortized", "guides", "eval"), default="all",
                   help="amortized: the amortized step against the references; guides: every "
                        "guide's step against its hand-written step (default: both); eval: "
                        "q* (eager loop against compiled step) and log p(x), interleaved")
    p.add_argument("--run", default=None,
                   help="--part eval: a trained run folder (default: untrained networks)")
    p.add_argument("--q-rows", type=int, default=2000, help="--part eval: rows for q*")
    p.add_argument("--logpx-rows", type=int, default=10_000,
                   help="--part eval: rows for log p(x) with K = 5000 (0: skip it)")
    p.add_argument("--logpx-repeats", type=int, default=1,
                   help="--part eval: rounds of log p(x); from 2, interleaved with the "
                        "chunks before issue 30 (2 ** 15 rows)")
    args = p.parse_args(argv)
    if args.smoke:
        kw = dict(batch_sizes=[32], repeats=2, steps=2, local_sizes=[1000], epoch=False,
                  logpx_k=10, logpx_rows=20)
    else:
        kw = dict(batch_sizes=[32, 128, 512], repeats=7, steps=20,
                  local_sizes=[50_000, 1_000_000], epoch=True,
                  logpx_k=0 if args.no_logpx else 5000, logpx_rows=10_000)
    if args.batch_sizes:
        kw["batch_sizes"] = [int(b) for b in args.batch_sizes.split(",")]
    if args.repeats:
        kw["repeats"] = args.repeats
    devices = [torch.device(d) for d in args.devices.split(",")
               if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    ev = dict(q_rows=20, repeats=1, logpx_k=10, logpx_rows=20, logpx_repeats=1) \
        if args.smoke else dict(q_rows=args.q_rows, repeats=args.repeats or 2,
                                logpx_k=5000 if args.logpx_rows else 0,
                                logpx_rows=args.logpx_rows, logpx_repeats=args.logpx_repeats)
    doc = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "pyro": pyro.__version__, "date": time.strftime("%Y-%m-%d"),
           "settings": ev if args.part == "eval" else kw}  # what this part ran with
    for device in devices:
        if args.part == "eval":
            doc[f"{device.type}_eval"] = bench_eval(device, args.run, **ev)
            print(eval_table(device.type, doc[f"{device.type}_eval"]), flush=True)
            continue
        if args.part in ("all", "amortized"):
            doc[device.type] = bench_device(device, **kw)
            print(table(device.type, doc[device.type]), flush=True)
        if args.part in ("all", "guides"):  # the smoke leaves the compiles to the unit tests
            doc[f"{device.type}_guides"] = bench_guides(
                device, kw["batch_sizes"], kw["repeats"], kw["steps"],
                compile_default=not args.smoke)
            print(guides_table(device.type, doc[f"{device.type}_guides"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
