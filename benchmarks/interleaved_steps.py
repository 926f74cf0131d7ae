"""Step time of weighting presets or short-context scorers against uniform, interleaved step by
step in ONE training run.

One ``pretrain_tw.py`` process (same model, data, optimizer, machine state) changes what it
runs every iteration, cycling through the rows of the comparison:

  presets  uniform, dense, sparse, longce, ppmi, npmi, each with the same short-context losses
           precomputed once by a frozen scorer (tools/score_data.py; every step reads them, the
           uniform ones too): the weighting's own cost. Goal: <= 1.02.
  scorers  uniform, then the dense preset with each scorer: precomputed (goal <= 1.02), frozen
           scorer of about 1/4 of the trainee's size, sliding window W = seq/4 (goal <= 1.15),
           self with sliding-window scoring at sequence length 4W (goal <= 1.30), self with
           the reference code's overlapping windows (W, stride W/2).

Every row's steps are spread over the whole run next to uniform steps, so noise from other jobs
hits all rows alike. Each row runs two iterations in a row and only the second is timed: what a
row leaves behind (freed memory, allocator work) lands in the next row's first iteration, and
the timed one is the row's steady state. For each cycle the script takes the ratio of each row's
timed step to the mean of the two timed uniform steps around it and prints the median ratio and
the median step time.

    python benchmarks/interleaved_steps.py --compare presets|scorers [--cycles 20]
        [--seq-length 1024] [--out results.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPEAT = 2  # iterations per row and cycle; the last one is timed
PRESET_ROWS = ("uniform", "dense", "sparse", "longce", "ppmi", "npmi")
# name -> (preset, scorer overrides of the run's flags)
SCORER_ROWS = {
    "uniform": ("uniform", {}),
    "dense, precomputed": ("dense", {"tw_scorer": "precomputed"}),
    "dense, frozen scorer (sliding)": ("dense", {"tw_scorer": "frozen"}),
    "dense, self, sliding (seq = 4W)": ("dense", {"tw_scorer": "self"}),
    "dense, self, windows (stride W/2)": ("dense", {"tw_scorer": "self",
                                                     "tw_short_mode": "windows"}),
}


def rows_of(compare: str, scorer_dir: str, window: int) -> dict:
    """name -> (preset, overrides of megatron's args for that row's iterations)."""
    if compare == "presets":
        return {name: (name, {}) for name in PRESET_ROWS}
    rows = copy.deepcopy(SCORER_ROWS)
    for _, overrides in rows.values():
        if overrides.get("tw_scorer") == "frozen":
            overrides["tw_scorer_load"] = scorer_dir
        if overrides.get("tw_short_mode") == "windows":
            overrides["tw_short_stride"] = window // 2
    return rows


def cycling(rows: dict):
    """Wraps forward_step: each iteration first takes its row's weighting config, flags and
    scorer (one scorer object per row, built on first use and passed to forward_step)."""

    def wrap(forward_step):
        from megatron.core.utils import unwrap_model
        from megatron.training import get_args, get_tokenizer

        from megatron_tw.scoring.scorers import build_scorer, special_token
        from megatron_tw.weighting import build_weighting_config

        names = list(rows)
        configs = {name: build_weighting_config(rows[name][0]) for name in names}
        built = {}

        def step(data_iterator, model, *args, **kwargs):
            megatron_args = get_args()
            name = names[(megatron_args.curr_iteration // REPEAT) % len(names)]
            megatron_args.tw_weighting = configs[name]
            overrides = rows[name][1]
            if overrides:
                if name not in built:
                    row_args = copy.copy(megatron_args)
                    vars(row_args).update(overrides)
                    tokenizer = get_tokenizer()
                    scorer = build_scorer(row_args, bos_id=special_token(tokenizer, "bos"),
                                          vocab_size=tokenizer.vocab_size)
                    scorer.setup(unwrap_model(model))
                    built[name] = (row_args, scorer)
                row_args, scorer = built[name]
                for key in ("tw_scorer", "tw_short_mode", "tw_short_stride"):
                    setattr(megatron_args, key, getattr(row_args, key))
                kwargs["scorer"] = scorer
            return forward_step(data_iterator, model, *args, **kwargs)

        return step

    return wrap


def worker(argv: list[str], compare: str, scorer_dir: str, window: int) -> None:
    import pretrain_tw

    pretrain_tw.main(argv, wrap_forward_step=cycling(rows_of(compare, scorer_dir, window)))


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # the training process: then compare, scorer, W, flags
        compare, scorer_dir, window = sys.argv[2], sys.argv[3], int(sys.argv[4])
        return worker(sys.argv[5:], compare, scorer_dir, window)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--compare", choices=("presets", "scorers"), default="presets")
    p.add_argument("--cycles", type=int, default=20, help="timed cycles through all rows")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = p.parse_args()

    from step_time import emit, make_scorer, run, step_times, trainee

    tmp = tempfile.mkdtemp(prefix="tw-interleaved-")
    scorer_dir = os.path.join(tmp, "scorer")
    scorer_fraction = make_scorer(scorer_dir)
    W = a.seq_length // 4
    rows = rows_of(a.compare, scorer_dir, W)
    names, n = list(rows), len(rows)
    # one untimed warm-up cycle, then the timed ones, and a closing uniform row
    iters = REPEAT * (n * (a.cycles + 1) + 1)
    args = trainee(a.seq_length) + ["--train-iters", str(iters),
                                    "--tw-short-loss-path", os.path.join(tmp, "short_loss"),
                                    "--tw-short-context", str(W), "--tw-short-mode", "sliding"]
    run("tools/score_data.py", args + ["--tw-preset", "dense", "--tw-scorer-load", scorer_dir])
    log = run(__file__, ["--worker", a.compare, scorer_dir, str(W)] + args
              + ["--tw-preset", "dense", "--tw-scorer", "precomputed"])
    every = step_times(log, warmup=0)  # index i: iteration i + 1, row names[(i // REPEAT) % n]
    assert len(every) == iters, f"expected {iters} logged iterations, got {len(every)}"
    # the rows really alternate: only weighted iterations log a weighted loss (megatron prints
    # a key seen before as 0 in an iteration that did not report it)
    lines = re.findall(r"^.*iteration\s+\d+/\s*\d+ \|.*$", log, flags=re.M)
    for i, line in enumerate(lines):
        found = re.search(r"weighted loss: ([-+0-9.E]+)", line)
        weighted = found is not None and float(found.group(1)) != 0.0
        name = names[(i // REPEAT) % n]
        assert weighted == (rows[name][0] != "uniform"), (name, line)
    times = every[REPEAT - 1::REPEAT]  # the timed iteration of each row: index j, row names[j % n]

    ratios = {name: [] for name in names[1:]}
    steps = {name: [] for name in names}
    for c in range(1, a.cycles + 1):
        first = c * n
        uniform = (times[first] + times[first + n]) / 2  # the uniform steps around this cycle
        steps[names[0]].append(times[first])
        for k, name in enumerate(names[1:], start=1):
            ratios[name].append(times[first + k] / uniform)
            steps[name].append(times[first + k])
    header = (f"seq {a.seq_length}, micro-batch 2, trainee 4x256 (vocab 2048), one CPU process; "
              f"rows interleaved step by step in one run, {a.cycles} timed cycles")
    if a.compare == "scorers":
        header += (f"; frozen scorer 3x128 ({scorer_fraction:.2f} of the trainee's parameters), "
                   f"W = {W}")
    lines = [header, "", "| row | median step (ms) | median ratio to the neighbouring uniform "
             "steps |", "|---|---|---|", f"| uniform | {statistics.median(steps[names[0]]):.1f} "
             "| 1.000 |"]
    lines += [f"| {name} | {statistics.median(steps[name]):.1f} | "
              f"{statistics.median(ratios[name]):.3f} |" for name in names[1:]]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
