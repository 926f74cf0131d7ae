"""Step time of every weighting preset against uniform, interleaved step by step in ONE training run.

One ``pretrain_tw.py`` process (same model, data, optimizer, machine state) trains with the
short-context losses precomputed once by a frozen scorer (tools/score_data.py) and changes the
weighting preset every iteration: uniform, dense, sparse, longce, ppmi, npmi, uniform, ... So
every preset's steps are spread over the whole run, next to uniform steps, and noise from other
jobs on the machine hits all presets alike. For each cycle the script takes the ratio of each
preset's step to the mean of the two uniform steps around it, and prints the median ratio (and
the median step times). Every step reads the precomputed losses, uniform ones included: this
measures the weighting's own cost; benchmarks/step_time.py compares the scorers with uniform.

    python benchmarks/preset_overhead.py [--cycles 10] [--seq-length 2048] [--out results.md]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ORDER = ("uniform", "dense", "sparse", "longce", "ppmi", "npmi")


def cycling(forward_step):
    """forward_step that sets the weighting of the current iteration's preset first."""
    from megatron.training import get_args

    from megatron_tw.weighting import build_weighting_config

    configs = [build_weighting_config(name) for name in ORDER]

    def step(*args, **kwargs):
        megatron_args = get_args()
        megatron_args.tw_weighting = configs[megatron_args.curr_iteration % len(ORDER)]
        return forward_step(*args, **kwargs)

    return step


def worker(argv: list[str]) -> None:
    import pretrain_tw

    pretrain_tw.main(argv, wrap_forward_step=cycling)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # the training process: the rest are pretrain_tw.py flags
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cycles", type=int, default=10, help="timed cycles through all presets")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = p.parse_args()

    from step_time import make_scorer, run, step_times, trainee

    n = len(ORDER)
    iters = n * (a.cycles + 1) + 1  # one untimed warm-up cycle, and a closing uniform step
    tmp = tempfile.mkdtemp(prefix="tw-presets-")
    scorer = os.path.join(tmp, "scorer")
    make_scorer(scorer)
    W = a.seq_length // 4
    args = trainee(a.seq_length) + ["--train-iters", str(iters),
                                    "--tw-short-loss-path", os.path.join(tmp, "short_loss"),
                                    "--tw-short-context", str(W), "--tw-short-mode", "sliding"]
    run("tools/score_data.py", args + ["--tw-preset", "dense", "--tw-scorer-load", scorer])
    log = run(__file__, ["--worker"] + args + ["--tw-preset", "dense", "--tw-scorer",
                                                "precomputed"])
    times = step_times(log, warmup=0)  # megatron numbers iterations from 1: index i = iteration i+1
    assert len(times) == iters, f"expected {iters} logged iterations, got {len(times)}"
    # the presets really alternate: only weighted iterations log a weighted loss (megatron prints
    # a key seen before as 0 in an iteration that did not report it)
    lines = re.findall(r"^.*iteration\s+\d+/\s*\d+ \|.*$", log, flags=re.M)
    for i, line in enumerate(lines):
        found = re.search(r"weighted loss: ([-+0-9.E]+)", line)
        weighted = found is not None and float(found.group(1)) != 0.0
        assert weighted == (ORDER[i % n] != "uniform"), (ORDER[i % n], line)
    # iteration i + 1 ran with ORDER[i % n] (curr_iteration counts from 0)
    ratios = {name: [] for name in ORDER[1:]}
    steps = {name: [] for name in ORDER}
    for c in range(1, a.cycles + 1):
        first = c * n
        uniform = (times[first] + times[first + n]) / 2  # the uniform steps around this cycle
        steps["uniform"].append(times[first])
        for k, name in enumerate(ORDER[1:], start=1):
            ratios[name].append(times[first + k] / uniform)
            steps[name].append(times[first + k])
    lines = [f"seq {a.seq_length}, micro-batch 2, trainee 4x256 (vocab 2048), one CPU process; "
             f"presets interleaved step by step in one run, {a.cycles} timed cycles", "",
             "| preset | median step (ms) | median ratio to the neighbouring uniform steps |",
             "|---|---|---|",
             f"| uniform | {statistics.median(steps['uniform']):.1f} | 1.000 |"]
    lines += [f"| {name} | {statistics.median(steps[name]):.1f} | "
              f"{statistics.median(ratios[name]):.3f} |" for name in ORDER[1:]]
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
