"""tools/long_range_study.py: the launches it makes, and (slow, opt-in) every step end to end
on a tiny budget."""

import json
import os
import subprocess
import sys

import pytest

from tests.launch import ROOT, env

pytestmark = pytest.mark.e2e


def _study(args, timeout=120):
    return subprocess.run([sys.executable, "tools/long_range_study.py", *args], cwd=ROOT,
                          env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def test_print_commands_lists_every_launch(tmp_path):
    proc = _study(["--quick", "--print-commands", "--out", str(tmp_path / "s")])
    assert proc.returncode == 0, proc.stdout
    lines = [l for l in proc.stdout.splitlines() if "torch.distributed.run" in l]
    assert len(lines) == 2 + 1 + 7  # phase 1a and 1b, one frozen scoring, 7 extensions
    score = [l for l in lines if "score_data.py" in l][0]
    assert "--tw-scorer-load" in score and "--tw-short-mode sliding" in score
    drill, natural, *runs = [l for l in lines if "pretrain_tw.py" in l]
    assert "--seq-length 32 " in drill and "--seq-length 64 " in natural
    assert "--pretrained-checkpoint" not in drill and "/drill" in natural
    frozen = [l for l in runs if "--tw-scorer precomputed" in l]
    own = [l for l in runs if "--tw-scorer self" in l]
    assert len(frozen) == 3 and len(own) == 3
    for line in frozen + own:
        assert "--tw-dump-weights" in line and "--pretrained-checkpoint" in line
    # the same seed, so the same data order, in every extension of a seed
    assert all("--seed 1 " in l for l in runs)


def test_presets_restrict_phase_two_and_extension_drills_reach_the_builder(tmp_path):
    proc = _study(["--quick", "--print-commands", "--presets", "uniform,sparse", "--set",
                   "extend_drill_share=0.5", "--set", "extend_near_share=0.75", "--set",
                   "rotary_percent=0.5", "--set", "extend_interpolation=4", "--out",
                   str(tmp_path / "s")])
    assert proc.returncode == 0, proc.stdout
    launches = [l for l in proc.stdout.splitlines() if "torch.distributed.run" in l]
    assert len(launches) == 6  # drill, 1b, the frozen scores, three phase-2 runs
    assert all("--rotary-percent 0.5 " in l for l in launches)  # partial RoPE in every model
    factor = "--rotary-seq-len-interpolation-factor 4 "
    assert [factor in l for l in launches] == [False, False, True, True, True, True]  # phase 2
    runs = [l for l in proc.stdout.splitlines() if "pretrain_tw.py" in l][2:]
    assert len(runs) == 3  # uniform, sparse frozen, sparse self
    assert sum("--tw-preset uniform" in l for l in runs) == 1
    assert sum("--tw-preset sparse" in l for l in runs) == 2
    assert sum("score_data.py" in l for l in proc.stdout.splitlines()) == 1
    extend = [l for l in proc.stdout.splitlines() if "build_planted_data.py" in l
              and "/data/extend " in l][0]
    assert "--drill-share 0.5" in extend and "--drill-records 4" in extend
    assert "--near-share 0.75 --near-max-distance 63" in extend  # quick: W = 64
    others = [l for l in proc.stdout.splitlines() if "build_planted_data.py" in l
              and "/data/extend " not in l]
    assert len(others) == 4 and not any("--near-share" in l for l in others)
    alone = _study(["--quick", "--print-commands", "--presets", "uniform", "--out",
                    str(tmp_path / "u")])
    assert alone.returncode == 0 and "score_data.py" not in alone.stdout
    bad = _study(["--presets", "unifrm", "--print-commands", "--out", str(tmp_path / "b")])
    assert bad.returncode == 2 and "--presets unifrm: expected names from" in bad.stdout


def test_phase_one_length_and_rope_base_reach_the_launches(tmp_path):
    proc = _study(["--quick", "--print-commands", "--presets", "uniform", "--set",
                   "pretrain_length=256", "--set", "pretrain_records=4", "--set",
                   "rotary_base=1000000", "--set", "extend_rotary_base=500000", "--out",
                   str(tmp_path / "s")])
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    drill, natural, extend = [l for l in lines if "pretrain_tw.py" in l]
    assert "--seq-length 32 " in drill and "--seq-length 256 " in natural
    assert "--rotary-base 1000000 " in drill and "--rotary-base 1000000 " in natural
    assert "--rotary-base 500000 " in extend
    build = [l for l in lines if "build_planted_data.py" in l and "/data/pretrain " in l][0]
    # 256-token phase-1b documents whose records and drills all recur within W = 64
    assert "--length 256 --records 4 " in build
    assert "--min-distance 10 --max-distance 53 " in build
    assert "--drill-records 4 --drill-value-length 8 --drill-min-distance 10 " \
        "--drill-max-distance 53" in build
    gate = [l for l in lines if "build_planted_data.py" in l and "/data/heldout_short " in l][0]
    assert "--length 64 " in gate  # the copy gate stays at W
    short = _study(["--quick", "--print-commands", "--set", "pretrain_length=32", "--out",
                    str(tmp_path / "b")])
    assert short.returncode == 1 and "--set pretrain_length=32: expected 0 (W) or at least " \
        "W = 64 tokens" in short.stdout and "Traceback" not in short.stdout


def test_bad_override_is_one_line(tmp_path):
    proc = _study(["--set", "extend_iterz=3", "--print-commands", "--out", str(tmp_path)])
    assert proc.returncode == 2
    assert "--set extend_iterz=3: expected KEY=VALUE" in proc.stdout
    assert "Traceback" not in proc.stdout


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    proc = _study(["--quick", "--out", str(out), "--set", "drill_iters=20", "--set",
                   "pretrain_iters=20", "--set",
                   "extend_iters=4", "--set", "curve_points=2", "--set", "heldout_docs=8",
                   "--set", "natural_sequences=8"], timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 7
    assert set(results["table"]) == {"uniform", "dense (frozen)", "dense (self)",
                                     "sparse (frozen)", "sparse (self)", "longce (frozen)",
                                     "longce (self)"}
    sparse = results["runs"]["sparse-self_s1"]["weights"]
    assert all(stats["zero"] == pytest.approx(0.75, abs=0.01) for stats in sparse.values())
    assert os.path.exists(out / "curve.png")
