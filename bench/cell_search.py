"""What a smart search saves, per cell: the paper's grid against TPE + pruning, cell by cell.

The table of a paper is one row per cell (backbone x regulariser variant, e.g. MDM's L_kl / L_f /
L_W), each with its own configuration chosen on validation. This bench runs the MDM space's grid
(``--sampler grid``: every cell its own grid points) and a per-cell smart search (``--sampler tpe
--trials-per-cell N`` with a per-cell pruner) on the same backbones, all trials training with the
same seed (``--train-seed``), then, for each cell, re-trains the configuration each search chose
with other seeds (``--noise-seeds``) and says whether the smart choice is within noise of the
grid's. It reports the fraction of the grid's trial-epochs the smart search spent.

Within noise: the two choices' best validation MAE over the noise seeds do not differ by a
two-sided Mann-Whitney U test at 5% (scipy), and the difference of their means is within two
standard errors. A cell where both searches chose the same configuration is within noise by
construction (trained once).

    python bench/cell_search.py                                     # ef_lstm, 4 cells, 8 epochs
    python bench/cell_search.py --backbone ef_lstm --backbone tfn --trials-per-cell 5
    python bench/cell_search.py --grid-from bench_out/cell_search/grid-X.json

Target (issue 24): <= 10% of the grid's trial-epochs, every cell within noise. Trial-epochs do
not depend on the machine's load; take wall times only on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from bench.search_efficiency import (  # noqa: E402
    SearchResult, Trial, chosen_point, describe, load_search, machine, reseed, run_search,
    save_search, search_args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", action="append", help="backbones of the mdm space (repeatable; "
                   "default ef_lstm)")
    p.add_argument("--data", default="synthetic:mosi")
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--set", action="append", default=[],
                   help="extra space overrides for every search (e.g. grid.lr=[0.002,0.0005])")
    p.add_argument("--train-seed", type=int, default=0,
                   help="every trial of both searches trains with this seed (fixed.seed)")
    p.add_argument("--trials-per-cell", type=int, default=4)
    p.add_argument("--sampler", default="tpe")
    p.add_argument("--pruner", default="median")
    p.add_argument("--grace", type=int, default=2, help="epochs before a trial may be pruned")
    p.add_argument("--seed", type=int, default=0, help="the smart search's sampler seed")
    p.add_argument("--noise-seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                   help="seeds each cell's chosen configurations are re-trained with")
    p.add_argument("--grid-from", type=Path, help="a grid-*.json stored by an earlier run")
    p.add_argument("--workdir", default="bench_out/cell_search")
    args = p.parse_args(argv)
    if len(args.noise_seeds) < 2:
        p.error("--noise-seeds: give at least 2 seeds (the spread is the noise)")
    args.backbone = args.backbone or ["ef_lstm"]
    return args


def common_flags(args: argparse.Namespace) -> list[str]:
    data = args.data if args.data.startswith("synthetic:") else str(Path(args.data).resolve())
    common = ["--space", "mdm", "--data", data, "--max-epochs", str(args.max_epochs),
              "--set", f"fixed.patience={args.max_epochs}", "--set",
              f"fixed.seed={args.train_seed}"]
    for backbone in args.backbone:
        common += ["--backbone", backbone]
    for override in args.set:
        common += ["--set", override]
    return common


def by_cell(space, result: SearchResult) -> dict[tuple, list[Trial]]:
    cells: dict[tuple, list[Trial]] = {}
    for trial in result.trials:
        cells.setdefault(space.cell(trial.params), []).append(trial)
    return cells


def within_noise(grid: list[float], smart: list[float]) -> tuple[bool, float, float]:
    """(within noise, Mann-Whitney p, difference of means in standard errors)."""
    from scipy.stats import mannwhitneyu

    if grid == smart:
        return True, 1.0, 0.0
    p = float(mannwhitneyu(grid, smart, alternative="two-sided").pvalue)
    se = (statistics.variance(grid) / len(grid) + statistics.variance(smart) / len(smart)) ** 0.5
    z = (statistics.fmean(smart) - statistics.fmean(grid)) / se if se > 0 else 0.0
    return p >= 0.05 and abs(z) <= 2, p, z


def main(argv: list[str] | None = None) -> int:
    import os

    from tuner.search import prepare_space
    from tuner.spaces import cell_label

    args = parse_args(argv)
    if args.grid_from is not None:
        args.grid_from = args.grid_from.resolve()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = common_flags(args)
    space = prepare_space(search_args(common, [], "plan"))
    meta = {"version": 1, "space": "mdm", "backbones": args.backbone, "data": args.data,
            "max_epochs": args.max_epochs, "set": list(args.set), "train_seed": args.train_seed}

    if args.grid_from is not None:
        grid = load_search(args.grid_from, meta)
    else:
        flags = ["--sampler", "grid", "--pruner", "none"]
        grid = run_search(common, flags, f"grid-{stamp}")
        save_search(Path(f"grid-{stamp}.json"), meta, grid, common + flags)
    smart_flags = ["--sampler", args.sampler, "--pruner", args.pruner, "--seed", str(args.seed),
                   "--trials-per-cell", str(args.trials_per_cell),
                   "--set", f"search.grace_epochs={args.grace}"]
    smart = run_search(common, smart_flags, f"cells-{stamp}")
    save_search(Path(f"cells-{stamp}.json"), meta, smart, common + smart_flags)

    grid_cells, smart_cells = by_cell(space, grid), by_cell(space, smart)
    fraction = smart.trial_epochs / grid.trial_epochs
    lines = [f"# Per-cell grid vs per-cell {args.sampler} + {args.pruner} pruning ({stamp})", "",
             f"Backbones {', '.join(args.backbone)} of the mdm space, {args.max_epochs} epochs at "
             f"most, every trial trained with seed {args.train_seed}; {machine()}.", "",
             f"Grid: {len(grid.trials)} trials, {grid.trial_epochs} trial-epochs. Smart "
             f"({args.trials_per_cell} trials per cell, grace {args.grace}): {len(smart.trials)} "
             f"trials ({smart.pruned} pruned), {smart.trial_epochs} trial-epochs = "
             f"**{fraction:.1%}** of the grid's.", "",
             f"Each cell's choices re-trained with seeds {' '.join(map(str, args.noise_seeds))} "
             "(best valid MAE, mean ± std):", "",
             "| cell | grid trials / epochs | smart trials / epochs | grid's choice | smart's "
             "choice | grid | smart | MW p | Δ/SE | within noise |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    all_within = True
    for cell in space.cells_of_space("grid"):
        g_trials, s_trials = grid_cells.get(cell, []), smart_cells.get(cell, [])
        if not g_trials or not s_trials:
            lines.append(f"| {cell_label(cell)} | {len(g_trials)} | {len(s_trials)} | "
                         "| | | | | | no trials |")
            all_within = False
            continue
        g_point = chosen_point(space, min(g_trials, key=lambda t: t.best))
        s_point = chosen_point(space, min(s_trials, key=lambda t: t.best))
        print(f"re-training {cell_label(cell)} ...", flush=True)
        g_values = reseed(common, g_point, args.noise_seeds)
        s_values = g_values if s_point == g_point else reseed(common, s_point, args.noise_seeds)
        ok, p, z = within_noise(g_values, s_values)
        all_within &= ok
        lines.append(
            f"| {cell_label(cell)} | {len(g_trials)} / {sum(t.epochs for t in g_trials)} | "
            f"{len(s_trials)} / {sum(t.epochs for t in s_trials)} | {describe(g_point)} | "
            f"{describe(s_point)} | {statistics.fmean(g_values):.4f} ± "
            f"{statistics.stdev(g_values):.4f} | {statistics.fmean(s_values):.4f} ± "
            f"{statistics.stdev(s_values):.4f} | {p:.2f} | {z:+.1f} | {'yes' if ok else 'NO'} |")
    met = "met" if fraction <= 0.10 else "not met"
    lines += ["", f"Target: <= 10% of the grid's trial-epochs ({met}: {fraction:.1%}), every "
              "cell within noise "
              f"({'met' if all_within else 'not met'})."]
    text = "\n".join(lines) + "\n"
    out = Path(f"cell_search-{stamp}.md")
    out.write_text(text)
    print(text)
    print(f"Written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
