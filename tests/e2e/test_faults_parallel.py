"""Faults lose nothing in the parallel layouts users run: DP2, and CP2 with a weighting preset
scored by the trainee itself (DP2 with the distributed optimizer: opt-in, see DISTOPT_BROKEN).

Per layout, one uninterrupted reference run and one chain of real ``torchrun --nproc-per-node 2
pretrain_tw.py`` jobs on one checkpoint folder (``--save ck --load ck``), as a scheduler's
auto-resume loop runs them (the one-process chain of test_faults.py, in three launches):

1. a fresh start saving every 2 iterations, ``kill -9`` of every process two iterations past
   the last complete checkpoint, in the middle of the next save (the job is frozen the moment
   the new ``iter_*`` folder appears, the tracker is read, then SIGKILL): the trained iterations
   since that checkpoint and the save in progress are lost;
2. ``--load``: resumes from the tracker's checkpoint, then SIGTERM to every process
   (``--exit-signal-handler``): a checkpoint is saved, the workers exit cleanly;
3. ``--load``: resumes and runs to the end.

Every resumed step equals the reference (TensorBoard, full precision): lm loss, learning rate
(warm-up then cosine), gradient norm, and under a weighting the weighted loss and the weight
statistics; the killed run's own steps equal it too (console).

- ``dp2``: two data-parallel ranks, 2 micro-batches per rank and step (megatron's sampler
  resumes the consumed samples split over the ranks); the sparse preset of test_faults.py, whose
  seeded tie-break picks 16 of 32 tied tokens per sequence.
- ``cp2``: ``--context-parallel-size 2``, dense preset, self scorer in the sliding mode with
  ``--tw-short-context 16`` on 64-token sequences (a CP-sharded scoring pass with the restored
  weights), 2 micro-batches per step.
- ``dp2-distopt``: ``dp2`` with ``--use-distributed-optimizer``; fails today at the first
  resume (DISTOPT_BROKEN), so it is opt-in (``-m slow``) and strict-xfail: it turns into a failure
  that asks for the marks to go once megatron's loader is fixed.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from tests.e2e.test_faults import Job, _console, _stop_mid_save, _tracker
from tests.launch import TINY_MODEL, pretrain, tensorboard_scalars, write_random_corpus

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

STEPS = 9
COMMON = [*TINY_MODEL,
          "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
          "--lr-warmup-iters", "3", "--lr-decay-iters", "30", "--split", "100,0,0",
          "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
          "--make-vocab-size-divisible-by", "64", "--seed", "1234",
          "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
          # Long enough that no interrupted run ends by itself; --exit-interval ends the others.
          "--train-iters", "200"]
SPARSE = ["--tw-preset", "sparse", "--tw-short-context", "32", "--tw-sparsity", "0.75"]
LAYOUTS = {
    "dp2": ["--micro-batch-size", "2", "--global-batch-size", "8", "--ckpt-format", "torch_dist",
            *SPARSE],
    "cp2": ["--micro-batch-size", "1", "--global-batch-size", "2", "--context-parallel-size", "2",
            "--ckpt-format", "torch_dist",
            "--tw-preset", "dense", "--tw-scorer", "self", "--tw-short-mode", "sliding",
            "--tw-short-context", "16"],
    "dp2-distopt": ["--micro-batch-size", "2", "--global-batch-size", "8",
                    "--use-distributed-optimizer", "--ckpt-format", "torch_dist", *SPARSE],
}
# megatron-core 0.19.2 without Apex or Transformer Engine (this CPU install) cannot load a
# --use-distributed-optimizer checkpoint: torch_dist stops at DistributedOptimizer.state_dict's
# `assert len(steps) == 1` (the optimizer state is still empty when the load builds its state
# dict; torch_dcp builds it through the same call); --ckpt-format torch first fails on
# args.tw_weighting (megatron's weights_only torch.load refuses megatron_tw's WeightingConfig:
# "could not load the checkpoint", then exit status 0 having trained nothing) and, with that class
# allowed, in DistributedOptimizer._set_main_param_and_optimizer_states ("a view of a leaf
# Variable that requires grad is being used in an in-place operation"). Opt-in until fixed
# (docs/reliability.md, "Not covered").
DISTOPT_BROKEN = [pytest.mark.slow, pytest.mark.xfail(
    strict=True, reason="megatron-core 0.19.2 cannot resume a --use-distributed-optimizer "
                        "checkpoint without Apex/Transformer Engine")]
TAGS = ("lm loss", "weighted loss", "weight mean", "weight std", "weight max",
        "effective tokens frac", "zero weight frac", "weight share beyond short ctx",
        "long-context gain", "learning-rate", "grad-norm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_random_corpus(tmp_path_factory.mktemp("corpus") / "text", n_docs=300)


def _run(args, logdir):
    pretrain(2, [*args, "--tensorboard-dir", str(logdir)], timeout=300)
    return tensorboard_scalars(logdir)


@pytest.fixture(scope="module", params=[
    "dp2", "cp2", pytest.param("dp2-distopt", marks=DISTOPT_BROKEN)])
def chain(request, corpus, tmp_path_factory):
    layout = request.param
    tmp = tmp_path_factory.mktemp(f"faults-{layout}")
    args, ck = COMMON + LAYOUTS[layout] + ["--data-path", corpus], str(tmp / "ck")
    facts = {"layout": layout}

    # 1. save every 2 iterations; SIGKILL in the middle of the first save after checkpoint 2.
    job = Job(args + ["--save", ck, "--save-interval", "2"], nproc=2)
    job.wait_for(r"successfully saved checkpoint from iteration\s+2 ")
    saving, tracker = _stop_mid_save(job, ck, after=2, tries=2)
    from megatron_tw.reliability.preflight import checkpoint_problems

    problems = checkpoint_problems(os.path.join(ck, f"iter_{saving:07d}"))
    job.kill()
    facts["kill"] = {"saving": saving, "tracker_frozen": tracker, "problems": problems,
                     "tracker": _tracker(ck), "console": _console(job.output)}

    # 2. resume from the tracker's checkpoint, SIGTERM to every process two iterations later.
    k1 = int(facts["kill"]["tracker"])
    job = Job(args + ["--load", ck, "--save", ck, "--save-interval", "100",
                      "--exit-signal-handler", "--tensorboard-dir", str(tmp / "term")], nproc=2)
    job.wait_for(rf"iteration\s+{k1 + 2}/")
    job.signal_all(signal.SIGTERM)
    rc = job.finish(timeout=120)
    facts["term"] = {"rc": rc, "output": job.output, "tracker": _tracker(ck),
                     "tb": tensorboard_scalars(tmp / "term")}

    # 3. resume to the end.
    facts["final"] = {"tb": _run(args + ["--load", ck, "--exit-interval", str(STEPS)],
                                 tmp / "final")}
    facts["resumed_from"] = {"term": checkpoint_problems(
        os.path.join(ck, f"iter_{int(facts['term']['tracker']):07d}"))}
    # the uninterrupted reference, last: a chain that breaks fails before paying for it
    facts["ref"] = _run(args + ["--exit-interval", str(STEPS)], tmp / "ref")
    return facts


def _same(got: dict, ref: dict, steps, rel=1e-5):
    for tag in TAGS:
        assert tag in got, f"{tag!r} not logged; logged: {sorted(got)}"
        for step in steps:
            assert step in got[tag], (tag, step, sorted(got[tag]))
            assert got[tag][step] == pytest.approx(ref[tag][step], rel=rel, abs=1e-7), (tag, step)


def test_reference_logs_every_step(chain):
    ref = chain["ref"]
    assert sorted(ref["lm loss"]) == list(range(1, STEPS + 1))
    lr = ref["learning-rate"]
    assert lr[1] < lr[2] < lr[3] and lr[STEPS] < lr[4]  # warm-up, then cosine decay
    # the weighting is active: the weighted loss is not the plain one
    assert any(abs(ref["weighted loss"][s] - ref["lm loss"][s]) > 1e-4 for s in ref["lm loss"])


def test_kill_during_save_keeps_the_last_complete_checkpoint(chain):
    kill, ref = chain["kill"], chain["ref"]
    # frozen while iteration `saving` was being written: the tracker named the one before, and
    # still does after the kill; the folder in progress is incomplete
    assert kill["tracker_frozen"] == kill["tracker"] == str(kill["saving"] - 2), kill
    assert kill["problems"], "the interrupted folder looked complete"
    # both iterations since the last complete checkpoint were trained, then lost
    assert max(kill["console"]) >= kill["saving"], sorted(kill["console"])
    for step, fields in kill["console"].items():
        assert fields["lm loss"] == pytest.approx(ref["lm loss"][step], rel=1e-5), step
        assert fields["weighted loss"] == pytest.approx(ref["weighted loss"][step], rel=1e-5)


def test_resume_after_kill_then_sigterm(chain):
    term, k1 = chain["term"], int(chain["kill"]["tracker"])
    k2, out = int(term["tracker"]), term["output"]
    assert min(term["tb"]["lm loss"]) == k1 + 1, "did not resume from the tracker's checkpoint"
    _same(term["tb"], chain["ref"], range(k1 + 1, k2 + 1))
    # SIGTERM: a checkpoint at the iteration it arrived in, the last one trained; clean exit
    assert "exiting program after receiving SIGTERM" in out, out[-4000:]
    assert k2 >= k1 + 2 and max(term["tb"]["lm loss"]) == k2, (k1, k2)
    assert f"successfully saved checkpoint from iteration {k2:7d}" in out
    assert "ChildFailedError" not in out, out[-4000:]
    assert not re.search(r"\[rank\d\]: Traceback", out), out[-4000:]
    assert chain["resumed_from"]["term"] == []


def test_resume_after_sigterm_equals_uninterrupted(chain):
    final, k2 = chain["final"]["tb"], int(chain["term"]["tracker"])
    assert min(final["lm loss"]) == k2 + 1
    _same(final, chain["ref"], range(k2 + 1, STEPS + 1))
