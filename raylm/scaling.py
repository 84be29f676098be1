"""Scaling laws from a sweep of pretraining runs: the parametric fit L(N, D) = E + A/N^alpha + B/D^beta
(Chinchilla's approach 3), the IsoFLOP minima (approach 2), the compute-optimal plan they predict,
and the figures of `raylm scale`.

Conventions (Kaplan et al. 2020 for N, Hoffmann et al. 2022 for C):
- N counts the non-embedding parameters: every weight but the token embedding and the output head
  (tied or not); for a mixture of experts only the active experts (top_k of them) count.
- D counts the training tokens, and the training compute is C = 6 N D FLOPs.

The fit minimises the Huber loss (delta 1e-3) of log L between the model and the runs, from the best
starts of a grid of initialisations (the paper's grid, pruned by the objective at each start); the
interval on the exponents is a bootstrap over runs. The optimiser is BFGS (five parameters: the
memory limit of the paper's L-BFGS is moot) with a tight gradient tolerance: scipy's L-BFGS-B
stopped early on the Huber loss's kinks here (its relative-reduction test), and a bootstrap refit
started at the full fit's optimum then barely moved, which shrank the interval to nothing.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Chinchilla's grid of starts: e = log E, a = log A, b = log B.
INIT_GRID = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
OPTIMISER = {"method": "BFGS", "options": {"gtol": 1e-10, "maxiter": 3000}}


# ---- N and C --------------------------------------------------------------------------------------

def non_embedding_params(model_config) -> int:
    """N of a ``TransformerConfig``: its parameters less the token embedding and the output head
    (active experts only for MoE), counted on the meta device (no memory, no init)."""
    import torch

    from raylm.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(model_config)
    n = model.num_params(active=True, embeddings=False)
    if not model_config.tie_embeddings:  # an untied head is a parameter of its own
        n -= model.output.weight.numel()
    return n


def training_flops(n: float, d: float) -> float:
    """C = 6 N D: forward (2 per weight and token) and backward (4)."""
    return 6.0 * n * d


# ---- approach 3: the parametric loss -----------------------------------------------------------

@dataclass
class LossFit:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan  # the summed Huber loss at the optimum
    n_runs: int = 0

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def n_exponent(self) -> float:
        """N_opt grows as C^(beta / (alpha + beta)); D_opt as C^(alpha / (alpha + beta))."""
        return self.beta / (self.alpha + self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """The (N, D) that minimise L under 6 N D = ``flops`` (Hoffmann et al. eq. 4)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n = g * (flops / 6.0) ** self.n_exponent
        return n, flops / (6.0 * n)

    def to_dict(self) -> dict:
        return {**asdict(self), "n_exponent": self.n_exponent}


def _objective(theta, log_n, log_d, log_l, delta):
    """Summed Huber loss of log L and its gradient in theta = (e, a, b, alpha, beta)."""
    e, a, b, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_l
    weights /= total  # d logsumexp / d term
    small = np.abs(residual) <= delta
    value = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta)).sum()
    slope = np.where(small, residual, delta * np.sign(residual))
    grad = np.array([
        (slope * weights[2]).sum(), (slope * weights[0]).sum(), (slope * weights[1]).sum(),
        -(slope * weights[0] * log_n).sum(), -(slope * weights[1] * log_d).sum(),
    ])
    return value, grad


def _grid_objectives(grid: np.ndarray, log_n, log_d, log_l, delta) -> np.ndarray:
    """The objective at every start of ``grid`` [S, 5], vectorised."""
    e, a, b, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    residual = np.logaddexp.reduce(terms, axis=0) - log_l
    huber = np.where(np.abs(residual) <= delta, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))
    return huber.sum(axis=1)


def init_grid() -> np.ndarray:
    return np.array(list(itertools.product(*INIT_GRID.values())), dtype=np.float64)


def fit_loss(n, d, loss, delta: float = 1e-3, starts: int = 20, extra_starts=()) -> LossFit:
    """Fit L(N, D) to runs (arrays of N, D and final loss): BFGS from the ``starts`` best points of
    the initialisation grid (and any ``extra_starts``), the best optimum kept."""
    from scipy.optimize import minimize

    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=np.float64)) for x in (n, d, loss))
    if len(log_n) < 5:
        raise ValueError(f"fitting L(N, D) needs at least 5 runs (5 parameters), got {len(log_n)}")
    grid = init_grid()
    order = np.argsort(_grid_objectives(grid, log_n, log_d, log_l, delta))
    candidates = [grid[i] for i in order[:starts]] + [np.asarray(x, dtype=np.float64) for x in extra_starts]
    best = None
    for x0 in candidates:
        result = minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True, **OPTIMISER)
        if np.all(np.isfinite(result.x)) and (best is None or result.fun < best.fun):
            best = result
    e, a, b, alpha, beta = best.x
    return LossFit(math.exp(e), math.exp(a), math.exp(b), float(alpha), float(beta), float(best.fun), len(log_n))


def theta(fit: LossFit) -> np.ndarray:
    return np.array([math.log(fit.E), math.log(fit.A), math.log(fit.B), fit.alpha, fit.beta])


@dataclass
class Bootstrap:
    """Percentile intervals over fits to runs resampled with replacement."""

    samples: int
    confidence: float
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    fits: list[LossFit] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "confidence": self.confidence,
                "intervals": {k: list(v) for k, v in self.intervals.items()}}


def bootstrap_fit(n, d, loss, fit: LossFit, samples: int = 200, confidence: float = 0.95, seed: int = 0,
                  delta: float = 1e-3, starts: int = 1) -> Bootstrap:
    """Refit on ``samples`` resamples of the runs (each from the full fit's optimum and the
    resample's ``starts`` best grid points); percentile intervals of alpha, beta, the N_opt
    exponent beta/(alpha+beta) and E. Resamples with fewer than 5 distinct runs are drawn again."""
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    rng = np.random.default_rng(seed)
    fits = []
    while len(fits) < samples:
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(idx)) < 5:
            continue
        fits.append(fit_loss(n[idx], d[idx], loss[idx], delta, starts, extra_starts=[theta(fit)]))
    tail = (1 - confidence) / 2 * 100
    values = {"alpha": [f.alpha for f in fits], "beta": [f.beta for f in fits],
              "n_exponent": [f.n_exponent for f in fits], "E": [f.E for f in fits]}
    intervals = {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in values.items()}
    return Bootstrap(samples, confidence, intervals, fits)


# ---- approach 2: IsoFLOP profiles ----------------------------------------------------------------

@dataclass
class IsoFLOPMinimum:
    flops: float
    n_opt: float  # the parabola's minimum in log N
    loss_min: float
    coefficients: tuple[float, float, float]  # loss = c0 (log N)^2 + c1 log N + c2

    def loss(self, n):
        return np.polyval(self.coefficients, np.log(n))


def isoflop_minimum(flops: float, n, loss) -> IsoFLOPMinimum:
    """A parabola in log N through one budget's final losses, and its minimum. Needs three model
    sizes or more, and a parabola that opens upwards (else the budget's runs have no minimum)."""
    n, loss = np.asarray(n, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(np.unique(n)) < 3:
        raise ValueError(f"the IsoFLOP profile at C={flops:.3g} needs 3 model sizes or more, got {len(np.unique(n))}")
    c = np.polyfit(np.log(n), loss, 2)
    if c[0] <= 0:
        raise ValueError(f"the IsoFLOP profile at C={flops:.3g} curves downwards (no minimum): its smallest "
                         "or largest model is not past the optimum; widen the sizes")
    x = -c[1] / (2 * c[0])
    return IsoFLOPMinimum(float(flops), float(math.exp(x)), float(np.polyval(c, x)), tuple(float(v) for v in c))


@dataclass
class PowerLaw:
    """y = k * C^exponent, fitted in log-log space."""

    k: float
    exponent: float

    def __call__(self, flops):
        return self.k * np.power(flops, self.exponent)


def fit_power_law(flops, values) -> PowerLaw:
    flops, values = np.asarray(flops, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if len(np.unique(flops)) < 2:
        raise ValueError("a power law in C needs two FLOP budgets or more")
    exponent, log_k = np.polyfit(np.log(flops), np.log(values), 1)
    return PowerLaw(float(math.exp(log_k)), float(exponent))


# ---- figures (raylm.plots' conventions: Agg, one PNG per figure) ---------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_loss_curves(curves: list[dict], path: Path) -> Path:
    """Training loss against tokens seen, one line per run (``curves``: {label, n, tokens, loss,
    check}); colour by model size, the check run in black."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({c["n"] for c in curves if not c.get("check")})
    cmap = plt.get_cmap("viridis")
    for c in curves:
        if c.get("check"):
            ax.plot(c["tokens"], c["loss"], color="black", lw=2, label=c["label"])
        else:
            shade = sizes.index(c["n"]) / max(len(sizes) - 1, 1)
            ax.plot(c["tokens"], c["loss"], color=cmap(shade), alpha=0.8, label=c["label"])
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("scale: loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_isoflops(profiles: dict[float, tuple[list, list]], minima: list[IsoFLOPMinimum], path: Path,
                  fit: LossFit | None = None) -> Path:
    """Final validation loss against N per FLOP budget (``profiles``: C -> (Ns, losses)), its
    parabola and minimum; dashed: approach 3's L(N, C/6N)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("plasma")
    budgets = sorted(profiles)
    by_budget = {m.flops: m for m in minima}
    for i, flops in enumerate(budgets):
        colour = cmap(i / max(len(budgets), 1))
        ns, losses = profiles[flops]
        ax.scatter(ns, losses, color=colour, label=f"C={flops:.2g}")
        grid = np.geomspace(min(ns) / 1.5, max(ns) * 1.5, 100)
        if flops in by_budget:
            m = by_budget[flops]
            ax.plot(grid, m.loss(grid), color=colour)
            ax.scatter([m.n_opt], [m.loss_min], color=colour, marker="*", s=160, edgecolor="black")
        if fit is not None:
            ax.plot(grid, fit.loss(grid, flops / (6 * grid)), color=colour, ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation loss")
    ax.set_title("scale: IsoFLOP profiles (stars: minima; dashed: parametric fit)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _real_frontier(fit: LossFit, grid: np.ndarray) -> np.ndarray | None:
    """N_opt over ``grid`` for ``fit``, or None where the fit's optimum is not a finite real number."""
    with np.errstate(all="ignore"):
        n = np.asarray(fit.optimal(grid)[0])
    return n if np.isrealobj(n) and np.all(np.isfinite(n)) else None


def plot_frontier(minima: list[IsoFLOPMinimum], path: Path, fit: LossFit | None = None,
                  isoflop_law: PowerLaw | None = None, bootstrap: Bootstrap | None = None,
                  check: dict | None = None) -> Path:
    """The compute-optimal frontier: N_opt against C from the IsoFLOP minima and their power law
    (approach 2) and from the parametric fit with its bootstrap band (approach 3); the check run's
    N at its budget. Right: the predicted loss at the optimum against C, and the check run's."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    budgets = [m.flops for m in minima] + ([check["flops"]] if check else [])
    if not budgets:
        budgets = [1.0]
    grid = np.geomspace(min(budgets) / 2, max(budgets) * 2, 100)
    if minima:
        left.scatter([m.flops for m in minima], [m.n_opt for m in minima], color="C0", label="IsoFLOP minima", zorder=3)
    if isoflop_law is not None:
        left.plot(grid, isoflop_law(grid), color="C0", label=f"approach 2: N_opt ~ C^{isoflop_law.exponent:.2f}")
    if fit is not None and _real_frontier(fit, grid) is not None:
        left.plot(grid, fit.optimal(grid)[0], color="C1", label=f"approach 3: N_opt ~ C^{fit.n_exponent:.2f}")
        right.plot(grid, fit.loss(*fit.optimal(grid)), color="C1", label="approach 3: L(N_opt, D_opt)")
        # a resampled fit whose optimum has no real value (a negative or zero A / B term) has no curve
        band = [n for n in (_real_frontier(f, grid) for f in (bootstrap.fits if bootstrap else [])) if n is not None]
        if band:
            tail = (1 - bootstrap.confidence) / 2 * 100
            left.fill_between(grid, np.percentile(band, tail, axis=0), np.percentile(band, 100 - tail, axis=0),
                              color="C1", alpha=0.2, label=f"{bootstrap.confidence:.0%} bootstrap "
                              f"({len(band)} of {len(bootstrap.fits)} fits)")
    if minima:
        right.scatter([m.flops for m in minima], [m.loss_min for m in minima], color="C0", label="IsoFLOP minima")
    if check:
        left.scatter([check["flops"]], [check["n"]], color="black", marker="X", s=90, label="check run", zorder=4)
        right.scatter([check["flops"]], [check["actual_loss"]], color="black", marker="X", s=90, label="check run (actual)")
        right.scatter([check["flops"]], [check["predicted_loss"]], color="C1", marker="o", s=50,
                      facecolor="none", label="check run (predicted)")
    for ax, ylabel in ((left, "compute-optimal N"), (right, "loss at the optimum")):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs C = 6ND")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    left.set_yscale("log")
    left.set_title("scale: compute-optimal frontier")
    right.set_title("scale: predicted loss")
    return _save(fig, path)
