"""Wall time to reach the MDM grid's best within 1%: our search versus a serial random search.

Ours: the smart search of ``bench/search_efficiency.py`` (TPE + ASHA pruning by default), trials
side by side, one CPU each (2 at once on 2 cores). Theirs, as MMSA's tuning mode works: random
configurations from the same space, one trial at a time with every CPU, each trained for all its
epochs (no pruning). Each search ends at its first report within 1% of the grid's best
validation MAE, or when it has spent the budget (trial-epochs; default: as many as the grid).
The clock of each starts before its Ray does. A search that does not reach it is reported as
"> its wall time", and the speed-up as a lower bound. Because the grid's best can be one lucky
draw that no search reaches, the time to equal quality is reported too: how long the serial
random search took to reach the best value each of our searches found.

    python bench/search_speed.py --grid-from bench_out/search_efficiency/grid-X.json
    python bench/search_speed.py --grid-from G.json --ours-from S0.json --random-from R0.json

Target (issue 9): ours >= 4x faster on 2 CPU cores. Wall times depend on the machine's load:
compare runs made under the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from bench.search_efficiency import (  # noqa: E402
    SearchResult, add_grid_flags, add_smart_flags, common_args, enter_workdir, machine,
    resolve_paths, seed_of, seeded_searches, smart_flags, the_grid,
)


def random_flags(args: argparse.Namespace, seed: int) -> list[str]:
    """A serial random search: one trial at a time on every CPU, full epochs, no pruning."""
    cpus = str(args.random_cpus or os.cpu_count() or 1)
    return ["--sampler", "random", "--pruner", "none", "--seed", str(seed),
            "--max-concurrent", "1", "--cpus-per-trial", cpus,
            "--num-samples", str(args.num_samples)]


def time_to_reach(result: SearchResult, target: float) -> tuple[float, bool]:
    """Seconds to the first report within the target; else the whole wall time (a bound)."""
    _, seconds = result.reach(target)
    return (seconds, True) if seconds is not None else (result.wall, False)


def equal_quality_lines(our: list[SearchResult], their: list[SearchResult]) -> list[str]:
    """Time to equal quality: how long each serial random search took to reach the best
    validation value each of our searches found, against the time ours took to find it. Unlike
    the grid's best (one lucky draw can put it out of every search's reach), this target is
    always reached by ours, so the speed-up exists whenever the random search gets there too
    (else it is a lower bound)."""
    lines = ["", "Time to equal quality (the best valid MAE each of our searches found; how long "
             "each serial random search took to reach it):", "",
             "| ours seed | ours best valid MAE | ours wall to it (s) | random seed | "
             "random wall to it (s) | speed-up |", "| --- | --- | --- | --- | --- | --- |"]
    ratios: list[float] = []
    bound = False
    for mine in our:
        _, ours_seconds = mine.reach(mine.best)
        for other in their:
            seconds, reached = time_to_reach(other, mine.best)
            ratio = seconds / max(ours_seconds, 1e-9)
            ratios.append(ratio)
            bound |= not reached
            mark = "" if reached else "> "
            lines.append(f"| {seed_of(mine)} | {mine.best:.4f} | {ours_seconds:.0f} | "
                         f"{seed_of(other)} | {mark}{seconds:.0f} | {mark.replace('> ', '≥ ')}"
                         f"{ratio:.1f}x |")
    if ratios:
        median = statistics.median(ratios)
        lines += ["", f"Median speed-up to equal quality: {'at least ' if bound else ''}"
                      f"{median:.1f}x over {len(ratios)} pairs (target >= 4x: "
                      f"{'met' if median >= 4 else 'not shown' if bound else 'missed'})."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_flags(p)
    add_smart_flags(p)
    p.add_argument("--budget", type=float, default=1.0,
                   help="trial-epochs each search may spend, as a fraction of the grid's")
    p.add_argument("--budget-trial-epochs", type=int, help="the same as a number")
    p.add_argument("--random-cpus", type=int,
                   help="CPUs of each random-search trial (default: all of this machine's)")
    p.add_argument("--ours-from", type=Path, nargs="+",
                   help="stored searches of ours (smart-*.json of search_efficiency.py too)")
    p.add_argument("--random-from", type=Path, nargs="+", help="stored random searches")
    p.add_argument("--random-only", action="store_true",
                   help="only run and store the random searches (needs --budget-trial-epochs)")
    args = p.parse_args(argv)
    if args.random_only and not args.budget_trial_epochs:
        p.error("--random-only needs --budget-trial-epochs")
    args.ours_from, args.random_from = resolve_paths(args.ours_from), resolve_paths(args.random_from)

    workdir = enter_workdir(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = common_args(args)

    def theirs(seed: int) -> list[str]:
        return random_flags(args, seed)

    def ours(seed: int) -> list[str]:
        return smart_flags(args, seed)

    if args.random_only:
        seeded_searches("random", theirs, args, common, stamp, args.budget_trial_epochs, None,
                        None)
        return 0
    grid = the_grid(args, common, stamp)
    target = grid.best * 1.01
    budget = args.budget_trial_epochs or max(1, int(args.budget * grid.trial_epochs))
    our = seeded_searches("smart", ours, args, common, stamp, budget, target, args.ours_from)
    their = seeded_searches("random", theirs, args, common, stamp, budget, target,
                            args.random_from)

    label = f"{args.sampler} + {args.pruner}"
    lines = [
        f"MDM space, backbone {args.backbone}, {args.max_epochs} epochs max, data {args.data}; "
        f"target valid MAE <= {target:.4f} (grid best {grid.best:.4f} + 1%); budget {budget} "
        "trial-epochs per search",
        f"Machine: {machine()}",
        "",
        "| search | seed | trials | trial-epochs run | trial-epochs to target | "
        "wall to target (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    times: dict[str, list[tuple[float, bool]]] = {}
    for name, results in ((f"ours: {label}, 2 trials at once", our),
                          ("serial random search, no pruning", their)):
        times[name] = []
        for result in results:
            seconds, reached = time_to_reach(result, target)
            times[name].append((seconds, reached))
            spent = result.reach(target)[0]
            lines.append(f"| {name} | {seed_of(result)} | {len(result.trials)} | "
                         f"{result.trial_epochs} | {spent if reached else '> budget'} | "
                         f"{'' if reached else '> '}{seconds:.0f} |")
    (ours_t, theirs_t) = times.values()
    lines.append("")
    if all(r for _, r in ours_t):
        ours_median = statistics.median(s for s, _ in ours_t)
        theirs_median = statistics.median(s for s, _ in theirs_t)
        bound = "" if all(r for _, r in theirs_t) else "at least "
        ratio = theirs_median / ours_median
        lines.append(f"Median wall to target: ours {ours_median:.0f} s, serial random "
                     f"{bound}{theirs_median:.0f} s: ours is {bound}{ratio:.1f}x faster "
                     f"(target >= 4x: {'met' if ratio >= 4 else 'not shown' if bound else 'missed'}).")
    else:
        lines.append("Ours did not reach the target in every seed: no speed-up is claimed.")
    lines += equal_quality_lines(our, their)
    lines.append("Wall times depend on the machine's load.")
    print("\n".join(lines))
    (workdir / f"speed-{stamp}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
