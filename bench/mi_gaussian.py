"""How close do the project's MI estimators get to the truth? Correlated Gaussians, closed-form MI.

X, Y ∈ R^d with X ~ N(0, I) and Y_k = ρ·X_k + √(1−ρ²)·ε_k, so the d coordinate pairs are
independent and each has correlation ρ: I(X; Y) = −d/2 · log(1 − ρ²) nats. Every estimator is
the project's own code, trained on fresh batches from p(x, y) (no sample is seen twice, so a
training-batch estimate is not an in-sample one):

- DV, NWJ: MDM's regulariser (:class:`trainables.regularisers.mdm.MDM`) with ``estimator="kl"``
  (Donsker–Varadhan, Eq. 6) or ``"f"`` (NWJ, Eq. 7), ``output="none"`` (the unbounded critic;
  the paper's sigmoid caps the estimates at 1 and 1 − 1/e nats), dropout ``--dropout`` (0) and
  ``input="unimodal"`` (the critic reads the features given, with no backbone in between).
  X is the "text" features, Y the "audio" ones and "vision" is empty (width 0), so MDM's total
  correlation KL(p(t, a, v) ‖ p(t)p(a)p(v)) is exactly I(X; Y). The joint and product samples
  (rows of each modality permuted independently) and the critic steps are MDM's own
  (``estimator_step``); the critic is the paper's T_θ, d → d/2 → d → d → d/4 → d/4 → 1 on the
  2d-wide pair [x; y] (widths floored at 1, so for d = 1 it has one-unit bottlenecks).
- BA: :class:`BarberAgakov` with the true H(Y) = d/2 · log(2πe) passed in (so only q(y|x) is
  learned; q's Gaussian family contains the true p(y|x)).
- InfoNCE: :class:`InfoNCE` (cosine scores over τ, a linear predictor as in MMIM), at MMIM's
  τ = 1 and at ``--nce-temperature`` (0.1). Cosine scores see only directions: for d = 1 a
  direction is a sign, which caps what InfoNCE can find there whatever τ.
- CLUB: :class:`CLUB` (MIRD's estimator), q(y|x) fitted by likelihood.
- W: MDM with ``estimator="w"`` (gradient penalty, unbounded output). NOT an MI estimate: it is
  the critic's E_p[T] − E_q[T], a Wasserstein-1 distance between p(x, y) and p(x)p(y) (in the
  units of x, y). It is in its own column; it should be ~0 at ρ = 0 and grow with ρ.

What theory promises (up to noise, for a well-trained estimator):

- DV, NWJ, BA and InfoNCE are lower bounds: at or below the truth. DV and NWJ are tight for the
  optimal critic T* = log p/q + c, but their batch estimates have variance growing like e^I
  (McAllester & Stratos 2020), so at high MI they fall well short. NWJ ≤ DV for the same critic.
- InfoNCE ≤ log(batch) always (the table prints log B): it saturates when the truth exceeds it.
- BA is tight when q = p(y|x), which the Gaussian family contains, so BA should be close.
- CLUB is an upper bound when q ≈ p(y|x): at or above the truth. With the exact q it equals
  d·ρ²/(1−ρ²) (column "CLUB(q=p)"), far above the truth at high ρ (9.3 vs 1.2 nats at ρ = 0.95).

Estimate = the mean of the per-step estimate over the last 10% of steps (each on a fresh batch,
computed before that step's update), then mean ± std over ``--seeds`` seeds.

    python bench/mi_gaussian.py                                    # ~3-4 min, 1 thread
    python bench/mi_gaussian.py --dims 1 5 20 --steps 3000 --seeds 5 --out mi.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from trainables.backbones.base import BackboneOutput
from trainables.config import build_dataclass
from trainables.regularisers._estimators import CLUB, BarberAgakov, InfoNCE
from trainables.regularisers.mdm import MDM, MDMConfig

_LOG_2PIE = math.log(2.0 * math.pi * math.e)

#: column key -> header; MI estimates first, the Wasserstein value last
COLUMNS = {
    "dv": "DV (MDM kl)",
    "nwj": "NWJ (MDM f)",
    "ba": "BA",
    "nce1": "InfoNCE τ=1",
    "nce": "InfoNCE τ={tau}",
    "club": "CLUB",
    "w": "W critic (not MI)",
}


def true_mi(d: int, rho: float) -> float:
    return -0.5 * d * math.log(1.0 - rho**2) + 0.0  # + 0.0: no "-0.000" at ρ = 0


def club_ideal(d: int, rho: float) -> float:
    """CLUB with q = p(y|x): per dimension E_q-term minus E_p-term = ρ²/(1−ρ²)."""
    return d * rho**2 / (1.0 - rho**2)


def sample(n: int, d: int, rho: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1.0 - rho**2) * torch.randn(n, d, generator=g)


def as_features(x: torch.Tensor, y: torch.Tensor) -> BackboneOutput:
    """X as "text", Y as "audio", an empty "vision": MDM's total correlation is then I(X; Y)."""
    return BackboneOutput(prediction=torch.zeros(x.shape[0]),
                          features={"text": x, "audio": y, "vision": x.new_zeros(x.shape[0], 0)})


def _mdm_trace(estimator: str, d: int, rho: float, args, seed: int) -> list[float]:
    torch.manual_seed(seed)
    cfg = build_dataclass(MDMConfig, {"estimator": estimator, "output": "none", "input": "unimodal",
                                      "dropout": args.dropout, "critic_lr": args.lr})
    reg = MDM(cfg, {"text": d, "audio": d, "vision": 0})
    reg.build_optimizer(cfg.estimator_lr)
    reg.train()
    g = torch.Generator().manual_seed(10_000 + seed)
    trace = []
    for _ in range(args.steps):
        # D on this batch (MDM's joint / product samples), then one critic step maximising it
        trace.append(reg.estimator_step(as_features(*sample(args.batch, d, rho, g)), None)["mdm_dependency"])
    return trace


def _trace(kind: str, d: int, rho: float, args, seed: int) -> list[float]:
    """Per-step estimates of one estimator on fresh batches."""
    if kind in ("dv", "nwj", "w"):
        return _mdm_trace({"dv": "kl", "nwj": "f", "w": "w"}[kind], d, rho, args, seed)
    torch.manual_seed(seed)
    h_y = torch.tensor(0.5 * d * _LOG_2PIE)  # the true H(Y), Y ~ N(0, I_d)
    if kind == "ba":
        est = BarberAgakov(d, d, hidden=args.hidden)
    elif kind == "club":
        est = CLUB(d, d, hidden=args.hidden)
    else:
        est = InfoNCE(d, d, temperature=1.0 if kind == "nce1" else args.nce_temperature)
    opt = torch.optim.AdamW(est.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(10_000 + seed)
    trace = []
    for _ in range(args.steps):
        x, y = sample(args.batch, d, rho, g)
        loss = est.learning_loss(x, y)
        if kind == "ba":  # BA = H(Y) + E log q = H(Y) − loss
            value = float(h_y) - loss.item()
        elif kind == "club":
            with torch.no_grad():
                value = est(x, y).item()
        else:  # InfoNCE's loss is minus its estimate
            value = -loss.item()
        trace.append(value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return trace


def final_estimate(trace: list[float]) -> float:
    tail = trace[-max(1, len(trace) // 10):]
    return sum(tail) / len(tail)


def _fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if not math.isfinite(mean):
        return "nan"
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def run(args) -> tuple[list[dict], float]:
    rows = []
    start = time.perf_counter()
    for d in args.dims:
        for rho in args.rhos:
            row = {"d": d, "rho": rho, "true": true_mi(d, rho), "club_ideal": club_ideal(d, rho)}
            for kind in args.estimators:
                row[kind] = [final_estimate(_trace(kind, d, rho, args, seed)) for seed in range(args.seeds)]
            rows.append(row)
            print(f"# d={d} rho={rho} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return rows, time.perf_counter() - start


def table(rows: list[dict], args, wall_s: float) -> str:
    heads = [COLUMNS[k].format(tau=args.nce_temperature) for k in args.estimators]
    lines = [
        f"Correlated Gaussians, I(X;Y) = −d/2·log(1−ρ²) nats. {args.steps} steps, batch {args.batch} "
        f"(log B = {math.log(args.batch):.3f}, InfoNCE's ceiling), lr {args.lr}, {args.seeds} seed(s); "
        f"estimate = mean over the last 10% of steps, mean ± std over seeds. torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {os.cpu_count()} logical CPUs, Python {platform.python_version()}; "
        f"wall {wall_s:.0f} s.",
        "",
        "| d | ρ | true MI | " + " | ".join(heads) + " | CLUB(q=p) |",
        "|---:|---:|---:|" + "---:|" * len(heads) + "---:|",
    ]
    for r in rows:
        cells = [_fmt(r[k]) for k in args.estimators]
        lines.append(f"| {r['d']} | {r['rho']:g} | {r['true']:.3f} | " + " | ".join(cells)
                     + f" | {r['club_ideal']:.3f} |")
    lines += [
        "",
        "Lower bounds (should be ≤ true MI up to noise): DV, NWJ, BA, InfoNCE (also ≤ log B). "
        "Upper bound (≥ true MI when q fits): CLUB; CLUB(q=p) = d·ρ²/(1−ρ²) is its value with the exact "
        "conditional. W critic: MDM's Wasserstein estimator E_p[T] − E_q[T] with a 1-Lipschitz critic, "
        "a distance in data units, not an MI estimate (compare it only across ρ: ~0 at ρ = 0).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--dims", type=int, nargs="+", default=[1, 5], help="d values (default 1 5)")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.95],
                   help="per-dimension correlations (default 0 0.5 0.8 0.95)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per estimator (default 1000)")
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW lr of every estimator (default 5e-3)")
    p.add_argument("--hidden", type=int, default=32, help="hidden width of BA / CLUB's q (default 32)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout of MDM's critic (default 0; the paper's 0.4 adds noise)")
    p.add_argument("--nce-temperature", type=float, default=0.1,
                   help="τ of the second InfoNCE column (default 0.1; the first is MMIM's τ = 1)")
    p.add_argument("--estimators", nargs="+", choices=list(COLUMNS), default=list(COLUMNS),
                   help="columns to run (default all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if any(not -1.0 < r < 1.0 for r in args.rhos):
        p.error("--rhos: each ρ must lie in (−1, 1)")
    if args.batch < 2 or args.steps < 1 or args.seeds < 1:
        p.error("--batch >= 2, --steps >= 1 and --seeds >= 1")

    torch.set_num_threads(max(1, args.threads))
    rows, wall_s = run(args)
    text = table(rows, args, wall_s)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
