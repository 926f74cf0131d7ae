"""benchmarks/gpu_check.sh, the one command of the GPU check, run on this CPU machine as the
maintainer runs it on a GPU (``--allow-cpu --model tiny``): every section's rows come out in
one table with status ok (the FP8 rows skipped with the reason, no Transformer Engine here), a
failing step is reported as failed with its error's first line and exit status 1, and the
pieces the CPU cannot exercise (the host-sync count, the attention reference's sensitivity) are
checked with stand-ins."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time

import pytest

from tests.launch import PYTHON, ROOT, env

pytestmark = pytest.mark.e2e

SECTIONS = ("setup", "attention", "pretrain", "evaluate")
PRETRAIN_OK = ("uniform", "dense-self-sliding", "dense-self-windows", "dense-frozen",
               "score_data (sidecar for sparse-precomputed)", "sparse-precomputed")


def _bench(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def table_rows(table: str) -> dict:
    """(section, name) -> [section, name, status, time, numbers, error] of the one table."""
    rows = {}
    for line in table.splitlines():
        if line.startswith(tuple(f"| {s} |" for s in SECTIONS)):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            assert len(cells) == 6, line
            rows[cells[0], cells[1]] = cells
    return rows


def check(tmp_path, *flags, timeout=600) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--allow-cpu", "--model", "tiny",
                           "--out", str(out), "--log-dir", str(tmp_path / "logs"), *flags],
                          cwd=ROOT, env={**env(), "PYTHON": PYTHON}, capture_output=True,
                          text=True, timeout=timeout)
    table = out.read_text() if out.exists() else ""
    return proc, table_rows(table), table


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("this machine has Transformer Engine: the FP8 rows would run")
    tmp = tmp_path_factory.mktemp("gpu_check")
    t0 = time.monotonic()
    proc, rows, table = check(tmp)
    print(f"gpu_check.sh --allow-cpu --model tiny: {time.monotonic() - t0:.0f} s\n{table}")
    return proc, rows, table, tmp


def test_every_section_runs_on_the_cpu(cpu_check):
    proc, rows, table, tmp = cpu_check
    assert proc.returncode == 0, table + proc.stderr[-4000:]
    assert table.strip() in proc.stdout  # printed, and written to --out
    assert table.count("| section | name | status |") == 1  # ONE table
    by_section = {s: {name: cells for (sec, name), cells in rows.items() if sec == s}
                  for s in SECTIONS}
    assert set(by_section["setup"]) == {"machine", "fixtures (scorer, tokenizer, held-out text)"}
    assert sorted(by_section["attention"]) == sorted(
        f"{kind} {n}" for kind in ("chunk_causal_attention", "sliding_window_attention sink",
                                   "sliding_window_attention no sink") for n in ("512", "1k"))
    assert set(by_section["pretrain"]) == {*PRETRAIN_OK, "fp8-uniform", "fp8-dense"}
    assert list(by_section["evaluate"]) == ["evaluate.py perplexity (uniform checkpoint)"]
    for (section, name), cells in rows.items():
        if name.startswith("fp8-"):
            assert cells[2] == "skipped" and "Transformer Engine not installed" in cells[5]
        else:
            assert cells[2] == "ok" and cells[5] == "", cells

    # the numbers each section promises
    for name, cells in by_section["attention"].items():
        assert re.search(r"max abs err \d\.\d\de-\d\d", cells[4]), cells
    for name in ("uniform", "dense-self-sliding", "dense-self-windows", "dense-frozen",
                 "sparse-precomputed"):
        numbers = by_section["pretrain"][name][4]
        first, last = map(float, re.search(r"lm loss ([\d.]+) -> ([\d.]+)", numbers).groups())
        assert last < first
        assert "tok/s" in numbers and "TFLOP/s" in numbers and "MFU -" in numbers
        assert "syncs/step -" in numbers  # no CUDA: no sync debug mode
        assert (" uniform" in numbers) == (name != "uniform")  # x<ratio> uniform
    assert "6 samples x 256 losses" in by_section["pretrain"][PRETRAIN_OK[4]][4]
    assert re.search(r"ppl [\d.]+ over 4 x 128 tokens on cpu",
                     by_section["evaluate"]["evaluate.py perplexity (uniform checkpoint)"][4])

    data = json.loads((tmp / "gpu_check.json").read_text())
    pre = {r["name"]: r["data"] for r in data["rows"] if r["section"] == "pretrain"}
    for name in ("dense-self-sliding", "sparse-precomputed"):
        assert pre[name]["vs_uniform"] == pytest.approx(
            pre[name]["step_ms"] / pre["uniform"]["step_ms"])
    assert pre["dense-self-windows"]["losses"][0] == pytest.approx(pre["uniform"]["losses"][0])


def test_a_failing_step_is_reported_failed_with_exit_status_1(tmp_path):
    proc, rows, table = check(tmp_path, "--sections", "attention,pretrain", "--rows",
                              "dense-self-windows,fp8-uniform",
                              "--row-extra", "dense-self-windows=--no-such-flag 3",
                              timeout=300)
    assert proc.returncode == 1, table + proc.stderr[-3000:]
    cells = rows["pretrain", "dense-self-windows"]
    assert cells[2] == "failed"
    assert re.match(r"exit \d+: pretrain_tw\.py: error: unrecognized arguments: --no-such-flag 3",
                    cells[5]), cells
    assert "\n" not in cells[5] and "[log: " in cells[5]
    assert rows["pretrain", "fp8-uniform"][2] == "skipped"
    assert all(c[2] == "ok" for (s, _), c in rows.items() if s == "attention")
    assert "1 failed" in proc.stderr


# -- what the CPU run cannot show ---------------------------------------------------------------

SYNC = "called a synchronizing CUDA operation"


def test_sync_count_per_step_from_a_log():
    """Lines with the sync warning between two iteration lines are that step's host syncs;
    iteration 1 (before the debug mode) and lines after the last iteration are not counted."""
    gpu_check = _bench("gpu_check")
    line = ("[2026] iteration {i}/       4 | elapsed time per iteration (ms): {ms} | "
            "lm loss: {loss}E+00 | number of nan iterations:   0 |")
    log = "\n".join([
        f"{SYNC} (before the mode: not counted)",
        line.format(i=1, ms=900.0, loss=6.0),
        "[gpu_check] sync debug mode: warn (from iteration 2)",
        f"[gpu_check] sync: a.py:1: {SYNC}", f"[W] Warning: {SYNC} (function x)",
        line.format(i=2, ms=100.0, loss=5.5),
        *[f"[gpu_check] sync: b.py:2: {SYNC}"] * 4,
        line.format(i=3, ms=120.0, loss=5.0),
        f"[gpu_check] sync: c.py:3: {SYNC}",
        line.format(i=4, ms=110.0, loss=4.0),
        "[gpu_check] sync debug mode: default", f"[gpu_check] sync: save.py:1: {SYNC}"])
    r = gpu_check.parse_log(log, warmup=1)
    assert r["syncs"] == [2, 4, 1] and r["syncs_per_step"] == 2
    assert r["step_ms"] == 110.0 and r["losses"] == [6.0, 5.5, 5.0, 4.0]
    assert r["nan_iterations"] == 0
    assert gpu_check.parse_log(log.replace("sync debug mode: warn", "x"), 1)["syncs"] is None


def test_sync_hook_sets_the_debug_mode_after_iteration_1(monkeypatch, capsys):
    """benchmarks/gpu_check_train.py with stand-ins for torch.cuda and megatron's training_log:
    the mode is "warn" from the end of iteration 1's log to the end of the last one, and every
    sync warning raised in between is printed (not only the first per call site)."""
    import types
    import warnings

    import megatron.training

    train = _bench("gpu_check_train")
    modes = []
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(
        synchronize=lambda: None, set_sync_debug_mode=modes.append))

    def training_log(loss_dict, total, lr, iteration, *rest, **kwargs):
        for _ in range(2):  # the same call site twice
            warnings.warn(f"{SYNC} (Triggered internally)", UserWarning)
        print(f"iteration {iteration}/ 3 |")

    fake_training = types.SimpleNamespace(training_log=training_log)
    monkeypatch.setattr(megatron.training, "get_args",
                        lambda: argparse.Namespace(train_iters=3))
    with warnings.catch_warnings():
        train._install_sync_counter(torch=fake_torch, training=fake_training)
        for it in (1, 2, 3):
            fake_training.training_log({}, {}, 0.1, it)
            assert modes == (["warn"] if it < 3 else ["warn", "default"])
    out = capsys.readouterr()
    assert out.err.count("[gpu_check] sync: ") == 4  # iterations 2 and 3, twice each
    assert "sync debug mode: warn" in out.out and "sync debug mode: default" in out.out


def test_attention_reference_catches_a_mask_off_by_one():
    """The attention section's comparison is sensitive: the kernels pass against the right
    float64 mask and fail against one moved by a single key at each edge (the diagonal, the
    first future key, the window's first key, the sink)."""
    attn = _bench("gpu_check_attention")
    import torch

    a = argparse.Namespace(heads=4, kv_groups=2, head_dim=64, window=96, rows=16, tol=2e-2,
                           seed=0)
    cpu, s, left = torch.device("cpu"), 512, 96 - 2
    assert attn.chunk_case(s, a, cpu)["status"] == "ok"
    for wrong in (lambda q, k: k <= q + 1, lambda q, k: k < q):
        assert attn.chunk_case(s, a, cpu, allowed=wrong)["status"] == "failed"

    def window(lo, sink):
        return lambda q, k: ((k <= q) & (k >= q - lo)) | ((k == 0) if sink else (k < 0))

    for sink in (True, False):
        assert attn.sliding_case(s, sink, a, cpu)["status"] == "ok"
        for wrong in (window(left - 1, sink), window(left + 1, sink), window(left, not sink)):
            assert attn.sliding_case(s, sink, a, cpu, allowed=wrong)["status"] == "failed"
