"""Robustness figures: hostile or broken files per type, kill-and-resume trials, allocator properties.

    python bench/robustness.py            # ~10 fuzz cases per mutation, 12 train + 12 prune + 6 finetune
                                          # + 4 export kill trials
    python bench/robustness.py --quick    # 2 per mutation, fewer trials (a smoke run)
    python bench/robustness.py --only finetune export   # those kill rows only, merged into the JSON

Fixed seeds throughout; the cases are those of tests/hostile.py and tests/interrupt.py (the test
suite runs fewer). Prints the tables and writes bench/results/robustness.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests import hostile, interrupt  # noqa: E402

from common import print_table, write_json  # noqa: E402

FAILURES = ("traceback", "multiline", "wrong", "hang", "memory", "code-ran")


def fuzz(per_mutation: int, workdir: Path) -> tuple[list[dict], list[str]]:
    fuzzer = hostile.Fuzzer(workdir)
    counts: dict[str, Counter] = {}
    failed = []
    for target, mutation, seed in hostile.all_cases(per_mutation):
        outcome = fuzzer.run(target, mutation, seed)
        counts.setdefault(target, Counter())[outcome.verdict] += 1
        if not outcome.ok:
            failed.append(str(outcome))
    rows = []
    for target, c in counts.items():
        rows.append({"file": target, "mutations": len(hostile.TARGETS[target].mutations), "tried": sum(c.values()),
                     "refused": c["refused"], "identical": c["identical"], "accepted": c["accepted"],
                     "failed": sum(c[f] for f in FAILURES), **{f: c[f] for f in FAILURES if c[f]}})
    return rows, failed


def kills(scenario: interrupt.Scenario, workdir: Path, n_start: int, n_busy: int, seed: int) -> tuple[dict, list[str]]:
    """``n_start`` kills at moments spread over a whole run, ``n_busy`` over the part where it writes
    (training epochs and their checkpoints; the output directory); signals rotate."""
    ref, seconds, busy = interrupt.reference(scenario, workdir)
    plan = [("start", d) for d in interrupt.delays(seed, n_start, seconds)]
    plan += [("busy", d) for d in interrupt.delays(seed + 1, n_busy, busy, 0.0)]
    signals = list(interrupt.SIGNALS)
    trials = [interrupt.trial(scenario, workdir, signals[i % 3], d, ref, when) for i, (when, d) in enumerate(plan)]
    left = Counter(t.after_kill for t in trials)
    row = {"command": f"simprune {scenario.name}", "trials": len(trials), "sent": sum(t.sent for t in trials),
           "signals": ", ".join(f"{s} {sum(t.signal == s for t in trials)}" for s in signals),
           "left absent": left["absent"], "left incomplete": left["incomplete"], "left complete": left["complete"],
           "left broken": left["broken"], "messages ok": sum(t.message_ok for t in trials),
           "resumed": sum(t.resumed for t in trials), "identical": sum(t.identical for t in trials),
           "leftovers": sum(bool(t.leftovers) for t in trials), "reference_s": round(seconds, 1),
           "busy_s": round(busy, 2), "each": [str(t) for t in trials]}
    return row, [str(t) for t in trials if not t.ok]


def allocator(examples: int) -> dict:
    os.environ["SIMPRUNE_PROPERTY_EXAMPLES"] = str(examples)
    from tests import test_allocator_properties as props  # noqa: PLC0415 - reads the variable on import

    t0 = time.time()
    try:
        props.test_allocation_meets_target_or_names_the_largest_reachable()
        failures = 0
    except Exception as exc:  # noqa: BLE001 - hypothesis re-raises the falsifying example
        print(f"allocator property failed: {str(exc)[:500]}")
        failures = 1
    return {"examples": examples, "failures": failures, "seconds": round(time.time() - t0, 1)}


def pruned(workdir: Path) -> Path:
    """A pruned ResNet-20 (Fashion-MNIST zoo model, half the MACs) to fine-tune."""
    out = workdir / "pruned"
    done = interrupt.run(interrupt.simprune("prune", "--checkpoint", ROOT / "zoo/resnet20-fashion-mnist", "--criterion",
                                            "l1", "--target-flops", 0.5, "--no-latency", "--out", out))
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return out


def kill_rows(names: list[str], quick: bool, work: Path) -> tuple[list[dict], list[str]]:
    """The kill-and-resume rows named (fixed seeds per command)."""
    data = interrupt.write_tiny_mnist(work / "mnist")
    ckpt = interrupt.write_checkpoint(work / "ckpt")
    plans = {"train": (lambda: interrupt.train_scenario(data, epochs=6), (1, 2) if quick else (3, 9), 1),
             "prune": (lambda: interrupt.prune_scenario(ckpt), (1, 1) if quick else (3, 9), 2),
             "finetune": (lambda: interrupt.finetune_scenario(pruned(work)), (1, 1) if quick else (3, 3), 3),
             "export": (lambda: interrupt.export_scenario(ckpt), (1, 1) if quick else (3, 1), 4)}
    rows, failed = [], []
    for name in names:
        make, (n_start, n_busy), seed = plans[name]
        row, bad = kills(make(), work, n_start, n_busy, seed=seed)
        rows.append(row)
        failed += bad
    return rows, failed


KILLED = ["train", "prune", "finetune", "export"]
COLS = ["command", "trials", "sent", "signals", "left absent", "left incomplete", "left complete", "left broken",
        "messages ok", "resumed", "identical", "leftovers"]


def only(names: list[str], quick: bool) -> int:
    """Rerun some kill rows and put them into the existing robustness.json in place (the rest kept)."""
    import json  # noqa: PLC0415

    path = Path(__file__).resolve().parent / "results" / "robustness.json"
    data = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        rows, failed = kill_rows(names, quick, Path(tmp))
    print_table(rows, COLS)
    for line in failed:
        print("FAILED", line)
    new = {r["command"]: r for r in rows}
    old = {r["command"]: r for r in data["interruption"]}
    merged = [new.get(f"simprune {n}") or old[f"simprune {n}"] for n in KILLED if f"simprune {n}" in new | old]
    kept = [f for f in data["interruption_failures"] if f.split()[0] not in names]
    data = {k: v for k, v in data.items() if k not in ("machine", "command")}
    print(f"wrote {write_json('robustness', {**data, 'interruption': merged, 'interruption_failures': kept + failed})}")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=KILLED, help="rerun only these kill rows, merged into the JSON")
    args = ap.parse_args()
    if args.only:
        return only(args.only, args.quick)
    per, n_alloc = (2, 50) if args.quick else (10, 300)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.time()
        fuzz_rows, fuzz_failed = fuzz(per, work / "fuzz")
        fuzz_s = time.time() - t0
        kill_table, kill_failed = kill_rows(KILLED, args.quick, work)
    alloc = allocator(n_alloc)
    print(f"\nHostile or broken files ({per} seeded cases per mutation, {fuzz_s:.0f} s):")
    print_table(fuzz_rows, ["file", "mutations", "tried", "refused", "identical", "accepted", "failed"])
    print("\nKilled runs, then resumed (or rerun) to the end:")
    print_table(kill_table, COLS)
    print(f"\nAllocator properties: {alloc['examples']} random networks, {alloc['failures']} failures")
    for line in fuzz_failed + kill_failed:
        print("FAILED", line)
    path = write_json("robustness", {"per_mutation": per, "fuzz": fuzz_rows, "fuzz_failures": fuzz_failed,
                                     "interruption": kill_table, "interruption_failures": kill_failed,
                                     "allocator": alloc})
    print(f"wrote {path}")
    return 1 if fuzz_failed or kill_failed or alloc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
