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

Each search's best validation MAE is printed, and the best it had reached at fixed points: wall
seconds from its start (``--at-seconds``) and trial-epochs spent (``--at-trial-epochs``, default a
quarter, half and all of the budget). Run in one go, every search has the same trial-epoch budget
and the same CPU threads in all (ours: one trial per CPU, 1 thread each; random: one trial with
every CPU's thread); ``--full`` lets every search spend its whole budget instead of ending at the
target, so that the best values compare at equal budgets. Searches loaded from files were run
separately: the printout says which conditions then differ.

    python bench/search_speed.py --grid-from bench_out/search_efficiency/grid-X.json --full
    python bench/search_speed.py --grid-from G.json --ours-from S0.json --random-from R0.json

Target (issue 9): ours >= 4x faster on 2 CPU cores. Wall times depend on the machine's load:
compare runs made under the same load.
"""

from __future__ import annotations

import argparse
import json
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


#: wall seconds (from each search's start) at which its best so far is printed
DEFAULT_AT_SECONDS = (60, 120, 300, 600)


def best_at(result: SearchResult, seconds: float | None = None,
            trial_epochs: int | None = None) -> tuple[float | None, bool]:
    """The best validation value a search had reported by ``seconds`` from its start, or within
    its first ``trial_epochs`` reports (in time order); None before its first report. The flag
    says the search had already ended there (at the target or its budget): the value is final."""
    events = sorted((ts, value) for t in result.trials for ts, _, value in t.history)
    if seconds is not None:
        seen = [value for ts, value in events if ts - result.started <= seconds]
        ended = seconds > result.wall
    else:
        seen = [value for _, value in events[:trial_epochs]]
        ended = trial_epochs > len(events)
    return (min(seen) if seen else None), ended


def _flag(flags: list[str], name: str) -> str | None:
    """The value of the last ``name`` in a tuner.search argument list, else None."""
    found = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == name]
    return found[-1] if found else None


def conditions(path: Path, result: SearchResult) -> dict:
    """What a search ran under, from the JSON it was stored as: its trial-epoch budget, whether
    it ended at the target, trials at once and threads per trial (CPUs per trial; the mdm space's
    1 unless set; at once: the Ray's CPUs over that, capped by --max-concurrent)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: not a stored search ({exc})") from None
    meta, flags = raw.get("meta", {}), raw.get("flags", [])
    per_trial = float(_flag(flags, "--cpus-per-trial") or next(
        (f.split("=", 1)[1] for f in flags if f.startswith("resources.cpu=")), 1))
    cap = int(_flag(flags, "--max-concurrent") or 0)
    at_once = None
    if result.cpus:
        at_once = max(1, int(result.cpus // per_trial))
        at_once = min(at_once, cap) if cap else at_once
    return {"budget": meta.get("budget"), "stop_at": meta.get("stop_at", "?"),
            "at_once": at_once, "threads": max(1, int(per_trial))}


def setup_cell(c: dict) -> str:
    at_once = "?" if c["at_once"] is None else c["at_once"]
    total = "?" if c["at_once"] is None else c["at_once"] * c["threads"]
    return f"{at_once} × {c['threads']} = {total}"


def conditions_lines(setups: list[tuple[str, SearchResult, dict]], loaded: bool) -> list[str]:
    """One plain statement: did every search run at the same budget and threads, in one run?"""
    budgets = {c["budget"] for _, _, c in setups}
    totals = {None if c["at_once"] is None else c["at_once"] * c["threads"]
              for _, _, c in setups}
    ends = {c["stop_at"] is None for _, _, c in setups}
    why = []
    if len(budgets) > 1 or None in budgets:
        why.append("trial-epoch budgets differ ("
                   + ", ".join(f"{n} s{seed_of(r)}: {c['budget'] if c['budget'] is not None else 'not recorded'}"
                               for n, r, c in setups) + ")")
    if len(totals) > 1 or None in totals:
        why.append("threads in all differ or were not recorded ("
                   + ", ".join(f"{n} s{seed_of(r)}: {setup_cell(c)}" for n, r, c in setups) + ")")
    if loaded:
        why.append("some searches were loaded from files (--ours-from/--random-from), so they "
                   "did not run in this run, under this load")
    if ends != {True}:
        why.append("some searches ended at the target (or did not record whether) rather than "
                   "spending their budget (--full compares best values at equal budgets)")
    if not why:
        (budget,), (total,) = budgets, totals
        return ["", f"Equal conditions: every search ran in this run with a budget of {budget} "
                f"trial-epochs, spent in full, and {total} CPU threads in all."]
    return ["", "Not equal conditions: " + "; ".join(why) + "."]


def checkpoint_lines(setups: list[tuple[str, SearchResult, dict]], at_seconds: list[float],
                     at_trial_epochs: list[int]) -> list[str]:
    """The best validation MAE each search had reached at fixed wall times and trial-epochs."""
    head = ([f"{s:g} s" for s in at_seconds] + [f"{k} trial-epochs" for k in at_trial_epochs])
    lines = ["", "Best valid MAE so far at fixed points (wall seconds from the search's start; "
             "trial-epochs spent, in time order; †: the search had ended before, its final "
             "best):", "", "| search | seed | " + " | ".join(head) + " |",
             "| --- | --- | " + " | ".join("---" for _ in head) + " |"]
    for name, result, _ in setups:
        cells = []
        for point in [("s", v) for v in at_seconds] + [("e", k) for k in at_trial_epochs]:
            value, ended = (best_at(result, seconds=point[1]) if point[0] == "s"
                            else best_at(result, trial_epochs=point[1]))
            cells.append("–" if value is None else f"{value:.4f}{' †' if ended else ''}")
        lines.append(f"| {name} | {seed_of(result)} | " + " | ".join(cells) + " |")
    return lines


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
    p.add_argument("--full", action="store_true",
                   help="every search spends its whole budget instead of ending at the target "
                        "(slower; compares the best values at equal budgets)")
    p.add_argument("--at-seconds", type=float, nargs="+", default=list(DEFAULT_AT_SECONDS),
                   help="wall seconds at which to print each search's best so far "
                        f"(default {' '.join(map(str, DEFAULT_AT_SECONDS))})")
    p.add_argument("--at-trial-epochs", type=int, nargs="+",
                   help="trial-epochs at which to print each search's best so far (default: a "
                        "quarter, half and all of the budget)")
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
    stop_at = None if args.full else target
    our = seeded_searches("smart", ours, args, common, stamp, budget, stop_at, args.ours_from)
    their = seeded_searches("random", theirs, args, common, stamp, budget, stop_at,
                            args.random_from)
    paths = {"smart": args.ours_from or [Path(f"smart-{stamp}-s{k}.json") for k in args.seeds],
             "random": args.random_from or [Path(f"random-{stamp}-s{k}.json") for k in args.seeds]}

    label = f"{args.sampler} + {args.pruner}"
    lines = [
        f"MDM space, backbone {args.backbone}, {args.max_epochs} epochs max, data {args.data}; "
        f"target valid MAE <= {target:.4f} (grid best {grid.best:.4f} + 1%); budget {budget} "
        "trial-epochs per search",
        f"Machine: {machine()}",
        "",
        "| search | seed | trials | trial-epochs run | trial-epochs to target | "
        "wall to target (s) | best valid MAE | wall (s) | budget (trial-epochs) | "
        "trials at once × threads each = threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    times: dict[str, list[tuple[float, bool]]] = {}
    setups: list[tuple[str, SearchResult, dict]] = []
    for name, kind, results in ((f"ours: {label}, a trial per CPU", "smart", our),
                                ("serial random search, no pruning", "random", their)):
        times[name] = []
        for result, path in zip(results, paths[kind]):
            seconds, reached = time_to_reach(result, target)
            times[name].append((seconds, reached))
            spent = result.reach(target)[0]
            setup = conditions(path, result)
            setups.append((name.split(":")[0].split(" search")[0], result, setup))
            lines.append(f"| {name} | {seed_of(result)} | {len(result.trials)} | "
                         f"{result.trial_epochs} | {spent if reached else '> budget'} | "
                         f"{'' if reached else '> '}{seconds:.0f} | {result.best:.4f} | "
                         f"{result.wall:.0f} | {setup['budget'] or '?'} | {setup_cell(setup)} |")
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
    lines += conditions_lines(setups, bool(args.ours_from or args.random_from))
    at_epochs = args.at_trial_epochs or sorted({max(1, budget // 4), max(1, budget // 2), budget})
    lines += checkpoint_lines(setups, args.at_seconds, at_epochs)
    lines += equal_quality_lines(our, their)
    lines.append("Wall times depend on the machine's load.")
    print("\n".join(lines))
    (workdir / f"speed-{stamp}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
