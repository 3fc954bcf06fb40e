#!/usr/bin/env python
"""The LoRA+ paper's toy model (Hayou, Ghosh, Yu 2024, Section 3.2 / Appendix C.1.1), reproduced, and its width law.

    python bench/toy.py            # part 1 (the toy as published) and part 2 (widths 64..2048, GD and Adam)
    python bench/toy.py --quick    # one width, a coarse grid (CI)

Plain torch, no DeepSpeed: this is about the method, not the pipeline.

The model is ``f(x) = W_out ReLU(B A ReLU(W_in x))`` with input dimension ``d = 5``, width ``n`` and LoRA rank
``r = 4``; ``W_in ~ N(0, 1)``, ``W_out ~ N(0, 1/n)``, ``A ~ N(0, 1/n)``, ``B ~ N(0, 1)``, and only ``A`` and
``B`` train. Data: ``X ~ N(0, I_5)``, ``Y = sin(sum(X) / 5)``, 1,000 training and 100 test samples. Full-batch
gradient descent (or Adam) on the mean squared error with separate learning rates ``eta_A`` and ``eta_B``; the
test loss is read after 10 and after 200 steps, averaged over 3 seeds (each seed draws the data and the weights).

Every ``(eta_A, eta_B)`` point of a grid trains at once: the trainable weights carry a leading grid dimension,
and each point's loss depends on its own weights only, so one backward pass gives every point its own gradient.
A point whose loss becomes non-finite (or exceeds ``DIVERGED``) is frozen and counted as diverged.

Part 1 draws the test-loss heatmap over a log grid spanning about 2e-4 to 10 on both axes (the paper's), and
reports the best pair, the best equal-lr point and both losses. Part 2 repeats the search at widths 64..2048 for
gradient descent and for Adam, with a coarse grid and then a finer one around its optimum, reports the optimal
ratio ``eta_B / eta_A`` (with its spread over seeds) and each lr per width, fits the exponent of the ratio
against the width (the theory's is 1: ``eta_A = Theta(1/n)``, ``eta_B = Theta(1)``), and gives the loss gap
between the best ratio and the best equal lr.

Results: ``bench/results/toy.json`` (the optima under ``part1.steps_10``/``steps_200``, the width law under
``part2.rows`` and ``part2.fitted_exponents``), ``toy.md``, ``toy_heatmap.png``, ``toy_width.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
D, RANK, N_TRAIN, N_TEST = 5, 4, 1000, 100
DIVERGED = 1e3  # a test loss above this (the target is in [-1, 1]) is a diverged run
SEEDS = (0, 1, 2)


def draw(seed: int, width: int):
    """Data and initial weights of one seed: (X, Y, X_test, Y_test, W_in, W_out, A, B)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, D, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1) / 5)
    w_in = torch.randn(width, D, generator=g, dtype=torch.float64)
    w_out = torch.randn(1, width, generator=g, dtype=torch.float64) / math.sqrt(width)
    a = torch.randn(RANK, width, generator=g, dtype=torch.float64) / math.sqrt(width)
    b = torch.randn(width, RANK, generator=g, dtype=torch.float64)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], w_in, w_out, a, b


def train_grid(seed: int, width: int, eta_a: torch.Tensor, eta_b: torch.Tensor, steps: int, optimizer: str,
               read_at: tuple[int, ...], chunk: int) -> dict[int, torch.Tensor]:
    """Test losses after each step in ``read_at`` for every grid point ``(eta_a[k], eta_b[k])`` (inf: diverged).

    The gradients are written out (the model is four lines; autograd's temporaries cost twice the time here):
    with ``z = h A^T``, ``u = z B^T``, ``out = ReLU(u) w_out^T`` and ``e = out - y``, the loss ``mean(e^2)`` has
    ``du = (2 e / S) w_out * [u > 0]``, ``dL/dB = du^T z`` and ``dL/dA = (du B)^T h``, computed without forming
    ``du``: ``[u > 0]`` is the only ``[g, S, n]`` tensor besides ``u``, and it reuses ``u``'s memory. Float32;
    the losses are compared at a few significant digits."""
    x, y, xt, yt, w_in, w_out, a0, b0 = (t.float() for t in draw(seed, width))
    h, ht = torch.relu(x @ w_in.T), torch.relu(xt @ w_in.T)  # the frozen first layer: [samples, width]
    w = w_out[0]
    hb = h.expand(min(chunk, len(eta_a)), -1, -1)
    out = {s: torch.empty(len(eta_a), dtype=torch.float64) for s in read_at}
    for lo in range(0, len(eta_a), chunk):
        ea = eta_a[lo:lo + chunk].float().view(-1, 1, 1)
        eb = eta_b[lo:lo + chunk].float().view(-1, 1, 1)
        g = len(ea)
        a = a0.expand(g, -1, -1).clone()
        b = b0.expand(g, -1, -1).clone()
        alive = torch.ones(g, dtype=torch.bool)
        state = [torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(b)]
        for step in range(1, steps + 1):
            z = h @ a.transpose(1, 2)  # [g, S, r]
            u = torch.relu_(torch.bmm(z, b.transpose(1, 2)))  # [g, S, n]: the big tensor, the only one
            e = u @ w - y  # [g, S]
            loss = (e * e).mean(1)
            mask = u.sign_()  # [u > 0], in place: memory traffic, not FLOPs, is the cost here
            c = ((2 / len(y)) * e).unsqueeze(-1)  # [g, S, 1]
            gb = torch.bmm((c * z).transpose(1, 2), mask).transpose(1, 2) * w.view(1, -1, 1)  # du^T z
            ga = torch.bmm((c * torch.bmm(mask, w.view(1, -1, 1) * b)).transpose(1, 2), hb[:g])  # (du B)^T h
            del u, mask
            alive &= torch.isfinite(loss) & (loss < DIVERGED)
            if optimizer == "adam":
                ga, gb = _adam(ga, gb, state, step)
            live = alive.view(-1, 1, 1).to(a.dtype)
            a -= live * ea * ga.nan_to_num_(0.0, 0.0, 0.0)
            b -= live * eb * gb.nan_to_num_(0.0, 0.0, 0.0)
            a.nan_to_num_(0.0, 0.0, 0.0)
            b.nan_to_num_(0.0, 0.0, 0.0)
            if step in out:
                test = (torch.relu((ht @ a.transpose(1, 2)) @ b.transpose(1, 2)) @ w - yt).pow(2).mean(1).double()
                ok = alive & torch.isfinite(test) & (test < DIVERGED)
                out[step][lo:lo + g] = torch.where(ok, test, torch.full_like(test, math.inf))
    return out


def _adam(ga, gb, state, step, beta1=0.9, beta2=0.999, eps=1e-8):
    ma, va, mb, vb = state
    ma.mul_(beta1).add_(ga, alpha=1 - beta1)
    va.mul_(beta2).addcmul_(ga, ga, value=1 - beta2)
    mb.mul_(beta1).add_(gb, alpha=1 - beta1)
    vb.mul_(beta2).addcmul_(gb, gb, value=1 - beta2)
    c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
    return (ma / c1) / ((va / c2).sqrt() + eps), (mb / c1) / ((vb / c2).sqrt() + eps)


def grid_losses(width: int, axis_a: torch.Tensor, axis_b: torch.Tensor, steps: int, optimizer: str,
                read_at: tuple[int, ...], seeds=SEEDS) -> dict[int, torch.Tensor]:
    """Per reading step: test losses ``[seeds, len(axis_a), len(axis_b)]``."""
    ea, eb = torch.meshgrid(axis_a, axis_b, indexing="ij")
    chunk = max(1, int(2e8 // (4 * N_TRAIN * width * 2)))  # each chunk's two [g, S, n] tensors: ~200 MB
    per_seed = [train_grid(s, width, ea.flatten(), eb.flatten(), steps, optimizer, read_at, chunk) for s in seeds]
    return {s: torch.stack([p[s].view(len(axis_a), len(axis_b)) for p in per_seed]) for s in read_at}


def optimum(losses: torch.Tensor, axis_a: torch.Tensor, axis_b: torch.Tensor) -> dict:
    """Best pair and best equal-lr point of the seed-mean losses ``[seeds, A, B]``; per-seed best ratios."""
    mean = losses.mean(0)
    i, j = divmod(int(torch.argmin(mean)), mean.shape[1])
    per_seed = []
    for s in range(losses.shape[0]):
        si, sj = divmod(int(torch.argmin(losses[s])), mean.shape[1])
        per_seed.append(float(axis_b[sj] / axis_a[si]))
    best = {"eta_A": float(axis_a[i]), "eta_B": float(axis_b[j]), "ratio": float(axis_b[j] / axis_a[i]),
            "test_loss": float(mean[i, j]), "test_loss_seeds": [float(v) for v in losses[:, i, j]],
            "ratio_per_seed": per_seed, "on_grid_edge": i in (0, mean.shape[0] - 1) or j in (0, mean.shape[1] - 1)}
    # equal learning rates: the grid points where eta_A == eta_B (the axes share their values there)
    eq = [(k, m) for k in range(len(axis_a)) for m in range(len(axis_b))
          if math.isclose(float(axis_a[k]), float(axis_b[m]), rel_tol=1e-9)]
    if eq:
        k, m = min(eq, key=lambda km: float(mean[km]))
        best["equal"] = {"eta": float(axis_a[k]), "test_loss": float(mean[k, m])}
    return best


def log_axis(lo: float, hi: float, per_decade: int) -> torch.Tensor:
    n = int(round(math.log10(hi / lo) * per_decade)) + 1
    return torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)


def part1(args) -> dict:
    axis = log_axis(2e-4, 10.0, args.per_decade)
    t0 = time.time()
    losses = grid_losses(args.width, axis, axis, 200, "gd", (10, 200))
    res = {"width": args.width, "grid": [float(v) for v in axis], "seconds": round(time.time() - t0, 1)}
    for s in (10, 200):
        res[f"steps_{s}"] = optimum(losses[s], axis, axis)
        res[f"steps_{s}"]["mean_test_loss"] = [[float(v) for v in row] for row in losses[s].mean(0)]
    return res


def equal_lr_best(width: int, optimizer: str, steps: int, lo: float, hi: float, per_decade: int) -> dict:
    """The best single lr (eta_A = eta_B) on a 1-D log grid, 3 seeds."""
    axis = log_axis(lo, hi, per_decade)
    losses = torch.stack([train_grid(s, width, axis, axis, steps, optimizer, (steps,), 64)[steps] for s in SEEDS])
    mean = losses.mean(0)
    k = int(torch.argmin(mean))
    return {"eta": float(axis[k]), "test_loss": float(mean[k])}


def part2(args) -> dict:
    """Per optimizer and width: a coarse grid (1 point a decade, seed 0), then a fine one (4 a decade, 3 seeds) over
    half a decade either side of its optimum; and the best equal lr on a 1-D grid (2 a decade, 3 seeds). The best
    pair is the better of the fine grid's and the equal lr's; ``ratio_per_seed`` is each seed's fine-grid best."""
    rows = {}
    ranges = {"gd": ((1e-5, 1.0), (1e-3, 30.0)), "adam": ((1e-5, 0.1), (1e-4, 1.0))}
    for optimizer in ("gd", "adam"):
        (alo, ahi), (blo, bhi) = ranges[optimizer]
        for width in args.widths:
            t0 = time.time()
            ca, cb = log_axis(alo, ahi, 1), log_axis(blo, bhi, 1)
            c = optimum(grid_losses(width, ca, cb, args.steps, optimizer, (args.steps,), seeds=SEEDS[:1])[args.steps],
                        ca, cb)  # one seed to locate the optimum; the fine grid has all three
            fa = log_axis(c["eta_A"] / 10 ** 0.5, c["eta_A"] * 10 ** 0.5, 4)
            fb = log_axis(c["eta_B"] / 10 ** 0.5, c["eta_B"] * 10 ** 0.5, 4)
            fine = optimum(grid_losses(width, fa, fb, args.steps, optimizer, (args.steps,))[args.steps], fa, fb)
            eq = equal_lr_best(width, optimizer, args.steps, min(alo, blo), max(ahi, bhi), 2)
            if eq["test_loss"] < fine["test_loss"]:  # equal lrs are pairs too: the 2-D search missed them
                fine = {**fine, "eta_A": eq["eta"], "eta_B": eq["eta"], "ratio": 1.0, "test_loss": eq["test_loss"],
                        "on_grid_edge": False}
            rows.setdefault(optimizer, []).append({
                "width": width, "eta_A": fine["eta_A"], "eta_B": fine["eta_B"], "ratio": fine["ratio"],
                "ratio_per_seed": fine["ratio_per_seed"], "test_loss": fine["test_loss"],
                "on_fine_grid_edge": fine["on_grid_edge"], "coarse": {k: c[k] for k in ("eta_A", "eta_B")},
                "best_equal_lr": eq["eta"], "best_equal_lr_test_loss": eq["test_loss"],
                "loss_gap_equal_minus_best": eq["test_loss"] - fine["test_loss"],
                "seconds": round(time.time() - t0, 1)})
            print(f"  {optimizer} width {width}: ratio {fine['ratio']:.3g} (eta_A {fine['eta_A']:.3g}, eta_B "
                  f"{fine['eta_B']:.3g}) loss {fine['test_loss']:.4g}; equal lr {eq['eta']:.3g} loss "
                  f"{eq['test_loss']:.4g} ({time.time() - t0:.0f} s)", flush=True)
    fits = {}
    for optimizer, rs in rows.items():
        fits[optimizer] = {name: _slope([r["width"] for r in rs], [r[name] for r in rs])
                           for name in ("ratio", "eta_A", "eta_B")}
        per_seed = [_slope([r["width"] for r in rs], [r["ratio_per_seed"][s] for r in rs]) for s in range(len(SEEDS))]
        fits[optimizer]["ratio_per_seed"] = per_seed
    return {"steps": args.steps, "widths": args.widths, "rows": rows, "fitted_exponents": fits}


PAPER_POINT = (1.3e-4, 2.8)  # (eta_A, eta_B): where the README's reading of the paper's Fig. 2 puts its optimum


def part3(args) -> dict:
    """Per seed, at the paper's width and 200 GD steps, on a fine grid (``--edge-per-decade``): the optimum and the
    stability edge (for each eta_A, the smallest eta_B that diverged; the largest eta_A that ever trains), and the
    test loss at the paper's reported point, so the comparison with Sec. 3.2 rests on resolved figures."""
    axis_a = log_axis(1e-4, 3e-2, args.edge_per_decade)
    axis_b = log_axis(1e-2, 10.0, args.edge_per_decade)
    t0 = time.time()
    losses = grid_losses(args.width, axis_a, axis_b, 200, "gd", (200,))[200]
    step = 10 ** (1 / args.edge_per_decade)
    seeds = []
    pa = int(torch.argmin((axis_a.log() - math.log(PAPER_POINT[0])).abs()))
    pb = int(torch.argmin((axis_b.log() - math.log(PAPER_POINT[1])).abs()))
    for k, seed in enumerate(SEEDS):
        loss = losses[k]
        i, j = divmod(int(torch.argmin(loss)), loss.shape[1])
        # The edge above the optimum: at its eta_A, the first larger eta_B that diverged; at its eta_B, the first
        # larger eta_A. (Divergence is not monotone over the whole grid: near the largest eta_A, a small eta_B can
        # diverge where a larger one trains.)
        dead_b = [b for b in range(j + 1, len(axis_b)) if not math.isfinite(float(loss[i, b]))]
        dead_a = [a for a in range(i + 1, len(axis_a)) if not math.isfinite(float(loss[a, j]))]
        trains = [a for a in range(len(axis_a)) if math.isfinite(float(loss[a].min()))]
        seeds.append({"seed": seed, "eta_A": float(axis_a[i]), "eta_B": float(axis_b[j]),
                      "ratio": float(axis_b[j] / axis_a[i]), "best_test_loss": float(loss[i, j]),
                      "on_grid_edge": i in (0, len(axis_a) - 1) or j in (0, len(axis_b) - 1),
                      "edge_eta_B_at_best_eta_A": float(axis_b[dead_b[0]]) if dead_b else None,
                      "edge_eta_A_at_best_eta_B": float(axis_a[dead_a[0]]) if dead_a else None,
                      "largest_training_eta_A": float(axis_a[max(trains)]) if trains else None,
                      "diverged_fraction": float((~torch.isfinite(loss)).double().mean()),
                      "paper_point_test_loss": float(loss[pa, pb]),
                      "test_loss": [[float(v) for v in row] for row in loss]})
    return {"width": args.width, "steps": 200, "optimizer": "gd", "per_decade": args.edge_per_decade,
            "grid_step": step, "axis_a": [float(v) for v in axis_a], "axis_b": [float(v) for v in axis_b],
            "paper_point": PAPER_POINT, "paper_point_on_grid": (float(axis_a[pa]), float(axis_b[pb])),
            "seeds": seeds, "seconds": round(time.time() - t0, 1)}


def train_dora_grid(seed: int, width: int, lr_a: torch.Tensor, ratio: float, mag_ratio: torch.Tensor, steps: int
                    ) -> torch.Tensor:
    """The toy with DoRA's decomposition on a base weight: ``f(x) = w_out ReLU(W' h)``, ``h = ReLU(W_in x)``,
    ``W' = m * (W0 + B A) / ||W0 + B A||`` (row norms, treated as constants in the backward pass as DoRA and PEFT
    do), ``W0 ~ N(0, 1/n)``, ``m`` starting at W0's row norms, ``A ~ N(0, 1/n)``, ``B = 0`` (LoRA's init: training
    starts from the base model). Adam on A (lr_a), B (ratio x lr_a) and m (mag_ratio x lr_a), every grid point at
    once through autograd. Returns the test loss after ``steps`` per point (inf: diverged)."""
    x, y, xt, yt, w_in, w_out, a0, _ = (t.float() for t in draw(seed, width))
    g = torch.Generator().manual_seed(10_000 + seed)
    w0 = torch.randn(width, width, generator=g) / math.sqrt(width)
    h, ht = torch.relu(x @ w_in.T), torch.relu(xt @ w_in.T)
    w = w_out[0]
    n_points = len(lr_a)
    a = a0.expand(n_points, -1, -1).clone().requires_grad_(True)
    b = torch.zeros(n_points, width, RANK, requires_grad=True)
    m = w0.norm(dim=1).expand(n_points, -1).clone().requires_grad_(True)
    lrs = [lr_a.float().view(-1, 1, 1), (ratio * lr_a).float().view(-1, 1, 1), (mag_ratio * lr_a).float().view(-1, 1)]
    params = [a, b, m]
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    alive = torch.ones(n_points, dtype=torch.bool)

    def forward(inp):
        v = w0 + torch.bmm(b, a)  # [G, n, n]
        scale = (m / v.norm(dim=2).detach()).unsqueeze(-1)
        return torch.relu(torch.bmm(inp.expand(n_points, -1, -1), (scale * v).transpose(1, 2))) @ w

    for step in range(1, steps + 1):
        loss = ((forward(h) - y) ** 2).mean(1)
        alive &= torch.isfinite(loss) & (loss < DIVERGED)
        grads = torch.autograd.grad(loss.nan_to_num(0.0, 0.0, 0.0).sum(), params)
        with torch.no_grad():
            for p, gr, lr, (mom, var) in zip(params, grads, lrs, state):
                gr = gr.nan_to_num(0.0, 0.0, 0.0)
                mom.mul_(0.9).add_(gr, alpha=0.1)
                var.mul_(0.999).addcmul_(gr, gr, value=0.001)
                upd = (mom / (1 - 0.9 ** step)) / ((var / (1 - 0.999 ** step)).sqrt() + 1e-8)
                live = alive.view(-1, *[1] * (p.dim() - 1)).float()
                p -= live * lr * upd
                p.nan_to_num_(0.0, 0.0, 0.0)
    with torch.no_grad():
        test = ((forward(ht) - yt) ** 2).mean(1).double()
    ok = alive & torch.isfinite(test) & (test < DIVERGED)
    return torch.where(ok, test, torch.full_like(test, math.inf))


def part4(args) -> dict:
    """DoRA's magnitude lr, for ``optim.dora_magnitude_ratio``: per lambda (1, 16) and magnitude ratio, the best
    test loss over a grid of lr_A (2 a decade), per seed, at each width of ``--dora-widths`` (Adam, 200 steps)."""
    lrs = log_axis(1e-4, 1e-1, 2)
    mags = [0.0, 0.25, 1.0, 4.0, 16.0, 64.0]
    rows = []
    for width in args.dora_widths:
        for ratio in (1.0, 16.0):
            t0 = time.time()
            la = lrs.repeat_interleave(len(mags))
            mr = torch.tensor(mags, dtype=torch.float64).repeat(len(lrs))
            per_seed = torch.stack([train_dora_grid(s, width, la, ratio, mr, args.dora_steps) for s in SEEDS])
            grid = per_seed.view(len(SEEDS), len(lrs), len(mags))  # [seeds, lr_A, magnitude ratio]
            mean = grid.mean(0)
            for k, mag in enumerate(mags):
                best = int(torch.argmin(mean[:, k]))
                rows.append({"width": width, "lambda": ratio, "magnitude_ratio": mag, "lr_A": float(lrs[best]),
                             "test_loss": float(mean[best, k]),
                             "test_loss_seeds": [float(v) for v in grid[:, best, k]],
                             "best_per_seed": [float(grid[s, :, k].min()) for s in range(len(SEEDS))]})
            print(f"  dora width {width} lambda {ratio:g}: " + ", ".join(
                f"m{r['magnitude_ratio']:g} {r['test_loss']:.4g}" for r in rows[-len(mags):])
                + f" ({time.time() - t0:.0f} s)", flush=True)
    return {"steps": args.dora_steps, "lr_grid": [float(v) for v in lrs], "magnitude_ratios": mags, "rows": rows}


def _slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def plots(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    p1 = res["part1"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    grid = np.array(p1["grid"])
    for ax, s in zip(axes, (10, 200)):
        m = np.log10(np.minimum(np.array(p1[f"steps_{s}"]["mean_test_loss"]), DIVERGED))
        im = ax.pcolormesh(grid, grid, m.T, shading="nearest", cmap="viridis")
        ax.set_xscale("log")
        ax.set_yscale("log")
        best = p1[f"steps_{s}"]
        ax.plot(best["eta_A"], best["eta_B"], "r*", markersize=12, label=f"best: ratio {best['ratio']:.3g}")
        ax.plot(grid, grid, "w--", linewidth=0.8, label="eta_A = eta_B")
        ax.set_xlabel("eta_A")
        ax.set_ylabel("eta_B")
        ax.set_title(f"log10 test loss after {s} steps (GD, n={p1['width']})")
        ax.legend(fontsize=7, loc="lower right")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_heatmap.png")
    plt.close(fig)

    if "part2" not in res:
        return
    p2 = res["part2"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for optimizer, rs in p2["rows"].items():
        w = [r["width"] for r in rs]
        lo = [min(r["ratio_per_seed"]) for r in rs]
        hi = [max(r["ratio_per_seed"]) for r in rs]
        ratio = [r["ratio"] for r in rs]
        k = p2["fitted_exponents"][optimizer]["ratio"]
        # the seed-mean optimum can lie outside the per-seed optima's range (or be the equal-lr point)
        axes[0].errorbar(w, ratio, yerr=[[max(0.0, r - a) for r, a in zip(ratio, lo)],
                                         [max(0.0, b - r) for r, b in zip(ratio, hi)]],
                         marker="o", capsize=3, label=f"{optimizer}: fitted exponent {k:.2f}")
        axes[1].plot(w, [r["loss_gap_equal_minus_best"] for r in rs], marker="o", label=optimizer)
    w = p2["widths"]
    axes[0].plot(w, [p2["rows"]["gd"][0]["ratio"] * x / w[0] for x in w], "k:", label="exponent 1 (theory)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("width n")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("optimal eta_B / eta_A (seed range)")
    axes[1].set_ylabel("test loss: best equal lr - best pair")
    axes[1].set_yscale("symlog", linthresh=1e-4)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_width.png")
    plt.close(fig)


def table(res: dict) -> str:
    """The markdown summary of a results file (``toy.md``)."""
    p1 = res["part1"]
    lines = [f"Measured {res['date']} on {res['machine']} (`{res['command']}`, {res['seconds'] / 60:.0f} min).", "",
             f"Part 1: the toy as published (n = {p1['width']}, gradient descent, 3 seeds, "
             f"{len(p1['grid'])} x {len(p1['grid'])} log grid from {p1['grid'][0]:.0e} to {p1['grid'][-1]:.0f}):", "",
             "| steps | best eta_A | best eta_B | ratio | test loss | best equal lr | its test loss |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in (10, 200):
        b = p1[f"steps_{s}"]
        lines.append(f"| {s} | {b['eta_A']:.3g} | {b['eta_B']:.3g} | {b['ratio']:.3g} | {b['test_loss']:.4g} | "
                     f"{b['equal']['eta']:.3g} | {b['equal']['test_loss']:.4g} |")
    if "part2" in res:
        p2 = res["part2"]
        lines += ["", f"Part 2: the width law ({p2['steps']} steps, 3 seeds):", "",
                  "| optimizer | width | eta_A | eta_B | ratio | ratio by seed | test loss | best equal lr | "
                  "its test loss | gap |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for optimizer, rows in p2["rows"].items():
            for r in rows:
                seeds = ", ".join(f"{x:.3g}" for x in r["ratio_per_seed"])
                lines.append(f"| {optimizer} | {r['width']} | {r['eta_A']:.3g} | {r['eta_B']:.3g} | {r['ratio']:.3g} | "
                             f"{seeds} | {r['test_loss']:.4g} | {r['best_equal_lr']:.3g} | "
                             f"{r['best_equal_lr_test_loss']:.4g} | {r['loss_gap_equal_minus_best']:.4g} |")
        lines += ["", "Fitted exponents (least squares of log value against log width; theory: ratio 1, eta_A -1, "
                      "eta_B 0):", "", "| optimizer | ratio | eta_A | eta_B | ratio, per seed |", "|---|---:|---:|---:|---|"]
        for optimizer, f in p2["fitted_exponents"].items():
            lines.append(f"| {optimizer} | {f['ratio']:.2f} | {f['eta_A']:.2f} | {f['eta_B']:.2f} | "
                         + ", ".join(f"{x:.2f}" for x in f["ratio_per_seed"]) + " |")
    if "part3" in res:
        p3 = res["part3"]
        lines += ["", f"Part 3: optimum and stability edge per seed (n = {p3['width']}, GD, {p3['steps']} steps, "
                      f"{p3['per_decade']} points a decade: neighbours differ by x{p3['grid_step']:.2f}; eta_A "
                      f"{p3['axis_a'][0]:.0e}..{p3['axis_a'][-1]:.0e}, eta_B {p3['axis_b'][0]:.0e}..{p3['axis_b'][-1]:.0f}):",
                  "", "| seed | best eta_A | best eta_B | ratio | test loss | at that eta_A, eta_B diverges from | "
                      "at that eta_B, eta_A diverges from | largest eta_A that trains | grid diverged | "
                      "test loss at the paper's point |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def edge(v):
            return "none on grid" if v is None else f"{v:.3g}"

        for r in p3["seeds"]:
            lines.append(f"| {r['seed']} | {r['eta_A']:.3g} | {r['eta_B']:.3g} | {r['ratio']:.3g} | "
                         f"{r['best_test_loss']:.4g} | {edge(r['edge_eta_B_at_best_eta_A'])} | "
                         f"{edge(r['edge_eta_A_at_best_eta_B'])} | {r['largest_training_eta_A']:.3g} | "
                         f"{100 * r['diverged_fraction']:.0f}% | {r['paper_point_test_loss']:.4g} |")
        pa, pb = p3["paper_point_on_grid"]
        lines += ["", f"The paper's point is read at the nearest grid point (eta_A {pa:.3g}, eta_B {pb:.3g}); inf: "
                      "diverged."]
    if "part4" in res:
        p4 = res["part4"]
        lines += ["", f"Part 4: DoRA's magnitude lr (Adam, {p4['steps']} steps, 3 seeds; each row at its best lr_A "
                      f"of {len(p4['lr_grid'])} from {p4['lr_grid'][0]:.0e} to {p4['lr_grid'][-1]:.0e}):", "",
                  "| width | lambda | magnitude lr / lr_A | best lr_A | test loss (mean) | by seed |",
                  "|---:|---:|---:|---:|---:|---|"]
        for r in p4["rows"]:
            lines.append(f"| {r['width']} | {r['lambda']:g} | {r['magnitude_ratio']:g} | {r['lr_A']:.3g} | "
                         f"{r['test_loss']:.4g} | " + ", ".join(f"{v:.4g}" for v in r["test_loss_seeds"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one width, a coarse grid, part 1 only (CI)")
    ap.add_argument("--width", type=int, default=100, help="part 1's width (the paper's 100)")
    ap.add_argument("--per-decade", type=int, default=4, help="part 1's grid points per decade of lr")
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048],
                    help="part 2's widths (4096 doubles the run's time)")
    ap.add_argument("--steps", type=int, default=200, help="part 2's steps")
    ap.add_argument("--edge-per-decade", type=int, default=12, help="part 3's grid points per decade of lr")
    ap.add_argument("--dora-widths", type=int, nargs="+", default=[128, 512], help="part 4's widths")
    ap.add_argument("--dora-steps", type=int, default=200, help="part 4's steps")
    ap.add_argument("--parts", default="1,2,3,4",
                    help="which parts to run; the others are kept from an existing OUT.json")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "toy"))
    ap.add_argument("--table", action="store_true", help="only rewrite OUT.md and the plots from OUT.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        res = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(table(res))
        plots(res, out)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    parts = {int(p) for p in args.parts.split(",")}
    if args.quick:
        args.per_decade, args.edge_per_decade, args.dora_widths, args.dora_steps = 1, 2, [32], 20
        parts = {1, 3, 4}
    t0 = time.time()
    res = json.loads(out.with_suffix(".json").read_text()) if parts != {1, 2, 3, 4} and out.with_suffix(
        ".json").is_file() else {}
    command = "python bench/toy.py" + (" --quick" if args.quick else "")
    if parts != {1, 2, 3, 4} and not args.quick:
        command += f" --parts {args.parts}"
    res.update({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores"})
    res.setdefault("commands", {})
    if 1 in parts:
        res["part1"] = part1(args)
        b = res["part1"]["steps_200"]
        print(f"part 1 (n={args.width}, GD, 200 steps): best eta_A {b['eta_A']:.3g}, eta_B {b['eta_B']:.3g} (ratio "
              f"{b['ratio']:.3g}), test loss {b['test_loss']:.4g}; best equal lr {b['equal']['eta']:.3g}, test loss "
              f"{b['equal']['test_loss']:.4g}", flush=True)
    if 2 in parts:
        res["part2"] = part2(args)
    if 3 in parts:
        res["part3"] = part3(args)
        for r in res["part3"]["seeds"]:
            print(f"part 3 seed {r['seed']}: best eta_A {r['eta_A']:.3g} eta_B {r['eta_B']:.3g} loss "
                  f"{r['best_test_loss']:.4g}; eta_B diverges from {r['edge_eta_B_at_best_eta_A']} at that eta_A; "
                  f"paper's point loss {r['paper_point_test_loss']:.4g}", flush=True)
    if 4 in parts:
        res["part4"] = part4(args)
    for k in parts:
        res["commands"][f"part{k}"] = command
    res["command"] = res["commands"].get("part1", command)
    elapsed = round(time.time() - t0, 1)
    res.setdefault("seconds_by_parts", {})[",".join(map(str, sorted(parts)))] = elapsed
    if "seconds" not in res or {1, 2} <= parts:
        res["seconds"] = elapsed  # the table's header: parts 1 and 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(res))
    plots(res, out)
    print(f"done in {elapsed:.0f} s: {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
