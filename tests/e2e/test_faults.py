"""Faults during training lose nothing: one job, interrupted every way a cluster interrupts it.

A chain of real ``torchrun pretrain_tw.py`` processes sharing one checkpoint folder, like a
scheduler's auto-resume loop (``--save ck --load ck``), compared step for step with one
uninterrupted reference run of the same flags:

1. ``kill -9`` between two checkpoints (after iteration 2 is saved, during iteration 3);
2. ``--load``: resumes from 2, then SIGTERM to every process of the job (as SLURM sends it on
   preemption: torchrun, which forwards it, and the workers): ``--exit-signal-handler`` saves a
   checkpoint and the workers exit cleanly;
3. ``--load``: resumes, saves every iteration, and is killed (SIGKILL) in the middle of a save:
   the new ``iter_*`` folder exists, incomplete, while the tracker file still names the previous
   one;
4. the incomplete folder fails at start-up with a message naming the missing files and the
   complete checkpoint to resume from; ``--load`` resumes from the tracker's and runs to the end.

Every resumed run reproduces the reference's losses, weighted loss, weight statistics, learning
rate and gradient norm at every step: data order, LR schedule (warm-up then cosine) and the
sparse weighting's tie-break survive every interruption. The sparse preset keeps 48 of 64
tokens while only the 32 beyond the short context (W = 32) have |d| > 0, so 16 are picked among
32 ties by the seeded tie-break each step, and the weighted loss depends on which.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time

import psutil
import pytest

from tests.launch import (PYTHON, ROOT, TINY_MODEL, env, free_port, iteration_logs, pretrain,
                          tensorboard_scalars, write_random_corpus)

pytestmark = pytest.mark.e2e

STEPS = 12
TAGS = ("lm loss", "weighted loss", "weight mean", "weight std", "weight max",
        "effective tokens frac", "zero weight frac", "weight share beyond short ctx",
        "long-context gain", "learning-rate", "grad-norm")
CONSOLE = ("lm loss", "weighted loss", "learning rate")


def _args(corpus: str) -> list[str]:
    return [*TINY_MODEL,
            "--micro-batch-size", "2", "--global-batch-size", "8",
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", "3", "--lr-decay-iters", "30",
            "--data-path", corpus, "--split", "100,0,0",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--make-vocab-size-divisible-by", "64", "--seed", "1234",
            "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
            # Long enough that no interrupted run ends by itself; --exit-interval ends the others.
            "--train-iters", "200", "--ckpt-format", "torch_dist",
            "--tw-preset", "sparse", "--tw-short-context", "32", "--tw-sparsity", "0.75"]


class Job:
    """``torchrun pretrain_tw.py`` in its own process group, its output read line by line."""

    def __init__(self, args: list[str], nproc: int = 1):
        cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "pretrain_tw.py", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 240):
        regex, end = re.compile(pattern), time.time() + timeout
        seen = 0
        while time.time() < end:
            for line in self.lines[seen:]:
                if regex.search(line):
                    return line
            seen = len(self.lines)
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.01)
        self.kill()
        raise AssertionError(f"no line matching {pattern!r}:\n{self.output[-6000:]}")

    def processes(self) -> list[psutil.Process]:
        """torchrun and everything under it (torchrun starts each worker in its own session, so
        a process-group signal would not reach them)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal_all(self, sig):
        """Signal every process of the job, as a scheduler does (SLURM signals all of a step's
        processes)."""
        for p in self.processes():
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def kill(self):
        self.signal_all(signal.SIGKILL)
        self.finish(timeout=60)

    def finish(self, timeout: float = 240) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc


def _tracker(ck) -> str:
    with open(os.path.join(ck, "latest_checkpointed_iteration.txt")) as f:
        return f.read().strip()


def _iterations(ck) -> set[int]:
    return {int(n[5:]) for n in os.listdir(ck) if n.startswith("iter_")}


def _stop_mid_save(job: Job, ck: str, after: int, tries: int = 5) -> tuple[int, str]:
    """Freeze the job (SIGSTOP, every process) as soon as a new ``iter_*`` folder above ``after``
    appears; if its save had already finished (the tracker names it), let the job go on to the
    next one. Returns (the folder's iteration, the tracker's text while frozen); the job stays
    frozen, for the caller to SIGKILL."""
    seen = set(_iterations(ck))
    end = time.time() + 240
    while tries and time.time() < end:
        new = sorted(i for i in _iterations(ck) - seen if i > after)
        if not new:
            if job.proc.poll() is not None:
                break
            time.sleep(0.002)
            continue
        frozen = job.processes()
        for p in frozen:
            p.send_signal(signal.SIGSTOP)
        tracker = _tracker(ck)
        if tracker != str(new[-1]):
            return new[-1], tracker
        seen.update(new)
        tries -= 1
        for p in frozen:
            p.send_signal(signal.SIGCONT)
    job.kill()
    raise AssertionError(f"never caught a save in progress:\n{job.output[-4000:]}")


def _console(output: str) -> dict[int, dict[str, float]]:
    """Per-step values from the console of a killed run (its TensorBoard events are buffered and
    die with it). megatron keeps a process's first iteration in the logging accumulators
    ("log stats but don't reset"), so the console line of its second iteration averages both:
    that line is left out."""
    logs = iteration_logs(output)
    if len(logs) >= 2:
        del logs[sorted(logs)[1]]
    return logs


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    corpus = write_random_corpus(tmp / "corpus", n_docs=300)
    args, ck = _args(corpus), str(tmp / "ck")
    facts = {"ck": ck, "args": args}

    facts["ref"] = tensorboard_scalars(_train(args + ["--exit-interval", str(STEPS)], tmp / "ref"))

    # 1. kill -9 after checkpoint 2 is written, while iteration 3 trains.
    job = Job(args + ["--save", ck, "--save-interval", "2"])
    job.wait_for(r"successfully saved checkpoint from iteration\s+2 ")
    job.wait_for(r"iteration\s+3/")
    job.kill()
    facts["kill9"] = {"console": _console(job.output), "tracker": _tracker(ck),
                      "iterations": _iterations(ck)}

    # 2. resume, then SIGTERM to every process of the job two iterations later.
    k1 = int(facts["kill9"]["tracker"])
    job = Job(args + ["--load", ck, "--save", ck, "--save-interval", "100",
                      "--exit-signal-handler", "--tensorboard-dir", str(tmp / "term")])
    job.wait_for(rf"iteration\s+{k1 + 2}/")
    job.signal_all(signal.SIGTERM)
    rc = job.finish(timeout=120)
    facts["term"] = {"rc": rc, "output": job.output, "tracker": _tracker(ck),
                     "tb": tensorboard_scalars(tmp / "term")}

    # 3. resume, save every iteration, SIGKILL in the middle of the first save.
    k2 = int(facts["term"]["tracker"])
    job = Job(args + ["--load", ck, "--save", ck, "--save-interval", "1"])
    saving, tracker = _stop_mid_save(job, ck, after=k2)
    from megatron_tw.reliability.preflight import checkpoint_problems

    facts["midsave"] = {"saving": saving, "tracker_frozen": tracker,
                        "problems": checkpoint_problems(os.path.join(ck, f"iter_{saving:07d}"))}
    job.kill()
    facts["midsave"].update(console=_console(job.output), tracker=_tracker(ck))

    # 4a. the incomplete folder, asked for by --ckpt-step: refused before anything runs.
    facts["startup"] = subprocess.run(
        [PYTHON, "pretrain_tw.py", *args, "--load", ck, "--ckpt-step", str(saving)], cwd=ROOT,
        env={**env(), "WORLD_SIZE": "1", "RANK": "0"}, capture_output=True, text=True, timeout=180)
    # 4b. resume from the tracker's checkpoint; save at the interrupted iteration again (the
    # folder is rewritten) and at the end.
    final = tmp / "final"
    _train(args + ["--load", ck, "--save", ck, "--save-interval", str(saving),
                   "--exit-interval", str(STEPS)], final)
    facts["final"] = {"tb": tensorboard_scalars(final), "tracker": _tracker(ck),
                      "problems": checkpoint_problems(os.path.join(ck, f"iter_{saving:07d}"))}
    return facts


def _train(args, logdir):
    pretrain(1, [*args, "--tensorboard-dir", str(logdir)], timeout=300)
    return logdir


def _same(got: dict, ref: dict, steps, tags=TAGS, rel=1e-5):
    for tag in tags:
        assert tag in got, f"{tag!r} not logged; logged: {sorted(got)}"
        for step in steps:
            if step not in ref[tag]:
                assert step not in got[tag], (tag, step)
                continue
            assert step in got[tag], (tag, step, sorted(got[tag]))
            assert got[tag][step] == pytest.approx(ref[tag][step], rel=rel, abs=1e-7), (tag, step)


def test_reference_logs_every_step(chain):
    ref = chain["ref"]
    assert sorted(ref["lm loss"]) == list(range(1, STEPS + 1))
    # the schedule is not constant: warm-up, then cosine decay
    lr = ref["learning-rate"]
    assert lr[1] < lr[2] < lr[3] and lr[STEPS] < lr[4]


def test_kill9_between_checkpoints(chain):
    kill9 = chain["kill9"]
    assert kill9["tracker"] == "2", kill9  # checkpoint 4 was never completed
    logged = max(kill9["console"])
    assert logged >= 3, kill9  # it trained past the checkpoint: those steps are lost
    for step in kill9["console"]:  # what it trained before dying matches the reference
        want = {"lm loss": chain["ref"]["lm loss"][step],
                "weighted loss": chain["ref"]["weighted loss"][step],
                "learning rate": chain["ref"]["learning-rate"][step]}
        for key, value in want.items():
            assert kill9["console"][step][key] == pytest.approx(value, rel=1e-5), (step, key)


def test_resume_after_kill9_equals_uninterrupted(chain):
    tb, k1 = chain["term"]["tb"], int(chain["kill9"]["tracker"])
    k2 = int(chain["term"]["tracker"])
    assert min(tb["lm loss"]) == k1 + 1, "did not resume from the checkpoint"
    _same(tb, chain["ref"], range(k1 + 1, k2 + 1))


def test_sigterm_saves_and_exits_cleanly(chain):
    term = chain["term"]
    out, k2 = term["output"], int(term["tracker"])
    assert "exiting program after receiving SIGTERM" in out, out[-4000:]
    k1 = int(chain["kill9"]["tracker"])
    assert k2 >= k1 + 2, term["tracker"]  # saved at (or after) the iteration it was signalled in
    assert max(term["tb"]["lm loss"]) == k2  # ... and that is the last one it trained
    assert f"successfully saved checkpoint from iteration {k2:7d}" in out
    # The workers exit 0 (torchrun reports no failed child); torchrun itself, signalled too,
    # re-raises the signal as SLURM expects, so its own status is not 0.
    assert "ChildFailedError" not in out and "[rank0]: Traceback" not in out, out[-4000:]


def test_kill_during_save_keeps_previous_checkpoint(chain):
    mid, k2 = chain["midsave"], int(chain["term"]["tracker"])
    assert mid["tracker_frozen"] == mid["tracker"] == str(mid["saving"] - 1), mid
    assert mid["saving"] == k2 + 1  # the first save of the resumed run
    assert mid["problems"], "the interrupted folder looked complete"
    for step, fields in mid["console"].items():  # its steps matched the reference too
        assert fields["lm loss"] == pytest.approx(chain["ref"]["lm loss"][step], rel=1e-5)


def test_incomplete_checkpoint_fails_at_startup(chain):
    run, mid = chain["startup"], chain["midsave"]
    assert run.returncode != 0
    err = run.stderr
    assert f"checkpoint iter_{mid['saving']:07d} (named by --ckpt-step {mid['saving']}) is " \
           "incomplete" in err, err[-3000:]
    assert "missing" in err and f"--ckpt-step {mid['tracker']}" in err, err[-3000:]
    assert not re.search(r"iteration\s+\d+/", run.stdout + err)  # nothing trained


def test_resume_after_kill_during_save_equals_uninterrupted(chain):
    final, t = chain["final"], int(chain["midsave"]["tracker"])
    assert min(final["tb"]["lm loss"]) == t + 1
    _same(final["tb"], chain["ref"], range(t + 1, STEPS + 1))
    assert final["tracker"] == str(STEPS)
    assert final["problems"] == []  # the interrupted iteration was saved again, completely


def test_truncated_checkpoint_file_fails_at_startup(chain, tmp_path):
    """A damaged copy of a real checkpoint (one .distcp file cut short), named by the tracker."""
    from megatron_tw.arguments import ConfigError
    from megatron_tw.reliability.preflight import check_load_checkpoint

    it = int(chain["final"]["tracker"])
    src = os.path.join(chain["ck"], f"iter_{it:07d}")
    bad = tmp_path / "ck"
    shutil.copytree(src, bad / f"iter_{it:07d}")
    (bad / "latest_checkpointed_iteration.txt").write_text(str(it))
    distcp = sorted((bad / f"iter_{it:07d}").glob("*.distcp"))[0]
    size = distcp.stat().st_size
    with open(distcp, "r+b") as f:
        f.truncate(size // 2)
    import argparse

    with pytest.raises(ConfigError) as err:
        check_load_checkpoint(argparse.Namespace(load=str(bad), ckpt_step=None))
    msg = str(err.value)
    assert f"{distcp.name} is truncated ({size // 2} of {size} bytes)" in msg, msg
    assert "no complete checkpoint is left" in msg, msg
