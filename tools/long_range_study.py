"""The long-range study: does token weighting learn planted long-range dependencies better than
uniform at equal tokens, and what does it cost at short context? (docs/study.md)

    python tools/long_range_study.py                 # the full study
    python tools/long_range_study.py --quick         # the same table at lower fidelity
    python tools/long_range_study.py --print-commands   # every launch, nothing run

Steps (each skipped when its output exists, so an interrupted study resumes):
  1. data: the built-in corpus (data/demo) with planted key-value records
     (megatron_tw/data/planted.py): phase-1 documents whose records recur within W, half of
     them random-word drills (one long record in random alphabet words); extension documents of
     4W tokens whose records recur 10..4W-11 tokens later (most beyond W; with the
     extend_near_share setting above 0, that share within W and the rest beyond), with random-word
     drills of 4W tokens mixed in when the extend_drill_share setting is above 0; held-out
     documents of both lengths from the held-out novel with fresh values.
  2. phase 1: (a) the copying drill at 32 tokens, where an induction head forms; (b) natural
     text with records at W from (a)'s weights (with the pretrain_length setting above W:
     longer sequences whose records and drills all recur within W). Then a gate: the held-out
     loss of a record's recurrence must be far below the loss of its first occurrence (the gap
     is reported, and the study stops when it is under the min_copy_gap setting, in nats).
  3. frozen scores: the phase-1 model's sliding-window short-context losses of every extension
     sample, offline (tools/score_data.py), once per seed.
  4. phase 2: extend to 4W from the phase-1 model with uniform, dense, sparse and LongCE weights,
     each with the frozen scorer (precomputed) and with the model itself as scorer (self), over
     three seeds (the seed sets the data order: the same across presets).
  5. evaluation, in one process: per run and checkpoint the held-out loss on recurrence values
     beyond W ("far"), within W ("near") and on natural-text tokens, retrieval accuracy at 4W,
     short-context perplexity on natural text at W; the weights' statistics from the weights
     the training used (--tw-dump-weights); OUT/results.json, OUT/summary.md, OUT/curve.png.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from typing import NamedTuple, Optional


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESETS = {  # name -> training flags (the paper's settings; docs/method.md)
    "uniform": ["--tw-preset", "uniform"],
    "dense": ["--tw-preset", "dense", "--tw-interpolation", "0.75"],
    "sparse": ["--tw-preset", "sparse", "--tw-sparsity", "0.25"],
    "longce": ["--tw-preset", "longce", "--tw-truncation", "5"],
}
SCORERS = ("frozen", "self")

# Why these shapes (docs/study.md): a 2-layer model forms an induction head (copying by
# content) only when the copy signal is dense and near. On 32-token documents of random words
# whose second half mostly repeats the first it forms within a few thousand steps; at 256 tokens
# of natural text it had not formed after 1,800. Half natural documents slow it down a lot, and a
# model that has seen only drills loses its copying as soon as natural text arrives (its loss
# there starts at 11.7 nats). So phase 1a is mostly drills (drill_share), 1b is natural text
# at W with half drills (pretrain_drill_share). W = 64 keeps the 4W = 256 extension runs cheap
# enough for three seeds. With 512 alphabet words a value rarely repeats by chance within a
# document; with 128 it often did, which makes a one-token match ambiguous.
FULL = dict(
    short=64, layers=2, hidden=128, ffn=352, heads=4, groups=2, rotary_percent=1.0,
    rotary_base=10000,
    drill_length=32, drill_value_length=12, drill_iters=5000, drill_batch=32, drill_micro=16,
    drill_lr=2e-3,
    pretrain_iters=1500, pretrain_batch=32, pretrain_micro=16, pretrain_lr=1e-3,
    pretrain_records=1, pretrain_length=0, extend_records=4, value_length=8, alphabet=512,
    drill_share=0.85,
    pretrain_drill_share=0.5,
    extend_drill_share=0.0, extend_drill_records=4, extend_near_share=0.0,
    extend_rotary_base=40000, extend_interpolation=1, extend_iters=100, extend_batch=16,
    extend_micro=8, extend_lr=1e-3,
    curve_points=4,
    seeds=(1, 2, 3), heldout_docs=128, natural_sequences=256, min_copy_gap=1.0,
)
QUICK = dict(FULL, drill_iters=300, pretrain_iters=60, extend_iters=20, curve_points=2,
             seeds=(1,), heldout_docs=32, natural_sequences=64, min_copy_gap=0.0)


class Drill(NamedTuple):
    """Random-word drill documents mixed into a set (tools/build_planted_data.py --drill-*):
    their share of the documents, and their records' count, value length and distance range
    (None: the builder's default)."""

    share: float
    records: Optional[int]
    value_length: Optional[int]
    min_distance: Optional[int]
    max_distance: Optional[int]


class DocSet(NamedTuple):
    """One planted document set of the study (tools/build_planted_data.py): the built-in text
    it comes from ("train" or "heldout"), tokens per document, records per natural document,
    their recurrence distance range, documents, seed, value length, drills mixed in, and the
    share of records recurring at most near_max_distance tokens later (0: uniform distances)."""

    text: str
    length: int
    records: int
    min_distance: int
    max_distance: int
    docs: int
    seed: int
    value_length: int
    drill: Optional[Drill] = None
    near_share: float = 0.0
    near_max_distance: int = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the same model with far fewer steps, one seed, smaller held-out sets "
                        "and no copy gate (a few minutes)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/long_range_study[_quick])")
    p.add_argument("--data", default=os.path.join(REPO, "data", "demo"),
                   help="the built-in corpus folder (tools/build_demo_data.py)")
    p.add_argument("--nproc", type=int, default=2, help="processes per training run")
    p.add_argument("--port", type=int, default=29651, help="first torchrun master port")
    p.add_argument("--presets", default=",".join(PRESETS), metavar="NAMES",
                   help="the phase-2 weightings to run, comma-separated (default: all of "
                        f"{', '.join(PRESETS)}), e.g. uniform to probe an extension setting")
    p.add_argument("--print-commands", action="store_true",
                   help="print every launch of the study and run nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting of the study (the FULL/QUICK dicts of this file), "
                        "e.g. --set extend_iters=40 --set seeds=1,2")
    args = p.parse_args(argv)
    args.cfg = dict(QUICK if args.quick else FULL)
    args.presets = [name for name in args.presets.split(",") if name]
    unknown = sorted(set(args.presets) - set(PRESETS))
    if unknown or not args.presets:
        p.error(f"--presets {','.join(unknown) or '(none)'}: expected names from "
                f"{', '.join(PRESETS)}")
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in args.cfg or not value:
            p.error(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(args.cfg)}")
        old = args.cfg[key]
        try:
            args.cfg[key] = (tuple(int(v) for v in value.split(",")) if isinstance(old, tuple)
                             else type(old)(value))
        except ValueError:
            p.error(f"--set {item}: {key} takes a {type(old).__name__}, got {value!r}")
    if args.out is None:
        args.out = os.path.join(REPO, "runs", "long_range_study" + ("_quick" if args.quick else ""))
    return args


class Study:
    def __init__(self, args):
        self.args, self.cfg, self.out = args, args.cfg, args.out
        self.port = args.port
        self.py = sys.executable
        self.tokenizer = os.path.join(args.data, "tokenizer", "tokenizer.model")
        self.start = time.time()
        c = self.cfg
        self.long = 4 * c["short"]
        self.record = c["value_length"] + 2
        drill_record, quarter = c["drill_value_length"] + 2, c["drill_length"] // 4
        near, far = (self.record, c["short"] - self.record - 1), (self.record,
                                                                   self.long - self.record - 1)
        extend_drill = None
        if c["extend_drill_share"] > 0:  # drills at 4W, their records recurring up to 4W back
            extend_drill = Drill(c["extend_drill_share"], c["extend_drill_records"],
                                 c["value_length"], *far)
        pretrain_length = c["pretrain_length"] or c["short"]
        if pretrain_length < c["short"]:
            raise SystemExit(f"long_range_study.py: --set pretrain_length={pretrain_length}: "
                             f"expected 0 (W) or at least W = {c['short']} tokens")
        pretrain_drill = Drill(c["pretrain_drill_share"], None, None, None, None)
        if pretrain_length > c["short"]:  # longer sequences, every dependency still within W
            pretrain_drill = Drill(c["pretrain_drill_share"], c["pretrain_records"],
                                   c["value_length"], *near)
        self.sets = {
            "drill": DocSet("train", c["drill_length"], 1, quarter, c["drill_length"] - quarter - 1,
                            c["drill_iters"] * c["drill_batch"], 10, quarter - 2,
                            Drill(c["drill_share"], None, c["drill_value_length"], drill_record,
                                  c["drill_length"] - drill_record)),
            "pretrain": DocSet("train", pretrain_length, c["pretrain_records"], *near,
                               c["pretrain_iters"] * c["pretrain_batch"], 11, c["value_length"],
                               pretrain_drill),
            "extend": DocSet("train", self.long, c["extend_records"], *far,
                             c["extend_iters"] * c["extend_batch"], 12, c["value_length"],
                             extend_drill, c["extend_near_share"], c["short"] - 1),
            "heldout_short": DocSet("heldout", c["short"], c["pretrain_records"], *near,
                                    c["heldout_docs"], 101, c["value_length"]),
            "heldout_long": DocSet("heldout", self.long, c["extend_records"], *far,
                                   c["heldout_docs"], 102, c["value_length"]),
        }

    # -- helpers --------------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def stamp(self, text: str) -> None:
        print(f"[{time.time() - self.start:6.0f} s] {text}", flush=True)

    def run(self, cmd: list[str], log: str) -> None:
        if self.args.print_commands:
            print(shlex.join(cmd))
            return
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        if proc.returncode != 0:
            with open(log) as f:
                tail = f.readlines()[-25:]
            sys.stdout.write("".join(tail))
            raise SystemExit(f"long_range_study.py: {shlex.join(cmd[:4])} ... failed; full log: "
                             f"{log}")

    def torchrun(self, script: str, flags: list[str]) -> list[str]:
        self.port += 1
        return [self.py, "-m", "torch.distributed.run", "--nproc-per-node",
                str(self.args.nproc), "--master-addr", "127.0.0.1", "--master-port",
                str(self.port), os.path.join(REPO, script), *flags]

    def model_flags(self) -> list[str]:
        c = self.cfg
        return ["--num-layers", str(c["layers"]), "--hidden-size", str(c["hidden"]),
                "--ffn-hidden-size", str(c["ffn"]), "--num-attention-heads", str(c["heads"]),
                "--group-query-attention", "--num-query-groups", str(c["groups"]),
                "--position-embedding-type", "rope", "--rotary-percent", str(c["rotary_percent"]),
                "--normalization", "RMSNorm", "--swiglu",
                "--disable-bias-linear", "--untie-embeddings-and-output-weights",
                "--attention-dropout", "0", "--hidden-dropout", "0",
                "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", self.tokenizer,
                "--weight-decay", "0.01", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
                "--clip-grad", "1.0", "--eval-iters", "0", "--eval-interval", "100000",
                "--ckpt-format", "torch_dist", "--split", "100,0,0",
                "--tw-long-document-sampling", "--data-cache-path", self.path("data_cache")]

    # -- 1. data --------------------------------------------------------------------------
    def build_data(self) -> None:
        os.makedirs(self.path("data"), exist_ok=True)
        if not os.path.exists(os.path.join(self.args.data, "summary.json")):
            self.stamp(f"building the built-in corpus in {self.args.data}")
            self.run([self.py, "tools/build_demo_data.py", "--out", self.args.data],
                     self.path("build_demo_data.log"))
        for name, ds in self.sets.items():
            prefix = self.path("data", name)
            if os.path.exists(prefix + "_plants.npz"):
                continue
            drill_flags, near_flags = [], []
            if ds.near_share > 0:  # this share of the records within W, the rest beyond
                near_flags = ["--near-share", str(ds.near_share), "--near-max-distance",
                              str(ds.near_max_distance)]
            if ds.drill is not None:  # random-word drills mixed in (data/planted.py drill_layout)
                drill_flags = ["--drill-share", str(ds.drill.share), "--drill-filler", "random"]
                for flag, value in zip(("records", "value-length", "min-distance",
                                        "max-distance"), ds.drill[1:]):
                    if value is not None:
                        drill_flags += [f"--drill-{flag}", str(value)]
            self.run([self.py, "tools/build_planted_data.py", "--source",
                      os.path.join(self.args.data, f"{ds.text}_text_document"),
                      "--tokenizer-model", self.tokenizer, "--out", prefix,
                      "--length", str(ds.length), "--records", str(ds.records),
                      "--value-length", str(ds.value_length),
                      "--alphabet-size", str(self.cfg["alphabet"]),
                      "--min-distance", str(ds.min_distance),
                      "--max-distance", str(ds.max_distance), "--num-docs", str(ds.docs),
                      "--seed", str(ds.seed), *drill_flags, *near_flags],
                     self.path("data", name + ".log"))
        self.stamp("data ready: " + ", ".join(
            f"{n} {v.docs} x {v.length}" for n, v in self.sets.items()))

    # -- 2. phase 1 -----------------------------------------------------------------------
    def phase1_flags(self, part: str) -> list[str]:
        """Phase 1a ("drill": the synthetic copying drill) or 1b ("pretrain": natural text with
        records at W, from 1a's weights)."""
        c = self.cfg
        key = "drill" if part == "drill" else "pretrain"
        iters, length = c[f"{key}_iters"], self.sets[part].length
        flags = [*self.model_flags(), "--data-path", self.path("data", part),
                 "--seq-length", str(length), "--max-position-embeddings", str(length),
                 "--rotary-base", str(c["rotary_base"]), "--seed", "1234",
                 "--micro-batch-size", str(c[f"{key}_micro"]),
                 "--global-batch-size", str(c[f"{key}_batch"]),
                 "--train-iters", str(iters), "--lr", str(c[f"{key}_lr"]),
                 "--min-lr", str(c[f"{key}_lr"]), "--lr-decay-style", "constant",
                 "--lr-warmup-iters", str(min(20, iters // 4)),
                 "--log-interval", "50", "--save", self.path(part),
                 "--save-interval", str(iters), "--no-save-optim"]
        if part == "pretrain":
            flags += ["--pretrained-checkpoint", self.path("drill")]
        return flags

    def pretrain(self) -> None:
        for part, what in (("drill", f"the copying drill at {self.cfg['drill_length']} tokens"),
                           ("pretrain", f"natural text with records within W = "
                                        f"{self.cfg['short']}, {self.sets['pretrain'].length}-"
                                        "token sequences")):
            if self.done(part):
                continue
            self.stamp(f"phase 1{'a' if part == 'drill' else 'b'}: {what}")
            self.run(self.torchrun("pretrain_tw.py", self.phase1_flags(part)),
                     self.path(part + ".log"))

    def done(self, folder: str) -> bool:
        return (not self.args.print_commands
                and os.path.exists(self.path(folder, "latest_checkpointed_iteration.txt")))

    # -- 3./4. phase 2 --------------------------------------------------------------------
    def runs(self) -> list[tuple[str, str, str, int]]:
        """(run name, preset, scorer, seed), uniform once per seed (it has no scorer)."""
        out = []
        for seed in self.cfg["seeds"]:
            if "uniform" in self.args.presets:
                out.append((f"uniform_s{seed}", "uniform", "", seed))
            for preset in [p for p in ("dense", "sparse", "longce") if p in self.args.presets]:
                for scorer in SCORERS:
                    out.append((f"{preset}-{scorer}_s{seed}", preset, scorer, seed))
        return out

    def extend_flags(self, preset: str, seed: int) -> list[str]:
        c = self.cfg
        iters = c["extend_iters"]
        interpolation = []  # linear position interpolation: 4W positions into the trained W
        if c["extend_interpolation"] != 1:
            interpolation = ["--rotary-seq-len-interpolation-factor",
                             str(c["extend_interpolation"])]
        return [*self.model_flags(), "--data-path", self.path("data", "extend"),
                "--seq-length", str(self.long), "--max-position-embeddings", str(self.long),
                "--rotary-base", str(c["extend_rotary_base"]), "--seed", str(seed),
                "--micro-batch-size", str(c["extend_micro"]),
                "--global-batch-size", str(c["extend_batch"]), "--train-iters", str(iters),
                "--lr", str(c["extend_lr"]), "--min-lr", str(c["extend_lr"]),
                "--lr-decay-style", "constant",
                "--lr-warmup-iters", str(min(5, iters // 4)),
                "--pretrained-checkpoint", self.path("pretrain"), "--log-interval", "5",
                *interpolation, *PRESETS[preset]]

    def short_loss_path(self, seed: int) -> str:
        return self.path("scores", f"seed{seed}")

    def score(self, seed: int) -> None:
        if os.path.exists(self.short_loss_path(seed) + "_train.json"):
            return
        os.makedirs(self.path("scores"), exist_ok=True)
        self.stamp(f"frozen scores (phase-1 model, sliding W={self.cfg['short']}), seed {seed}")
        flags = [*self.extend_flags("dense", seed), "--tw-scorer-load", self.path("pretrain"),
                 "--tw-short-context", str(self.cfg["short"]), "--tw-short-mode", "sliding",
                 "--tw-short-loss-path", self.short_loss_path(seed), "--no-progress"]
        self.run(self.torchrun("tools/score_data.py", flags), self.short_loss_path(seed) + ".log")

    def extend(self, name: str, preset: str, scorer: str, seed: int) -> None:
        if self.done(name):
            return
        iters = self.cfg["extend_iters"]
        every = max(1, iters // self.cfg["curve_points"])
        flags = [*self.extend_flags(preset, seed), "--save", self.path(name),
                 "--save-interval", str(every), "--no-save-optim"]
        if scorer == "self":
            flags += ["--tw-scorer", "self", "--tw-short-context", str(self.cfg["short"]),
                      "--tw-short-mode", "sliding"]
        elif scorer == "frozen":
            flags += ["--tw-scorer", "precomputed", "--tw-short-loss-path",
                      self.short_loss_path(seed)]
        if preset != "uniform":  # the weights of the first and the last step
            flags += ["--tw-dump-weights", self.path(name, "weights"),
                      "--tw-dump-weights-interval", str(iters - 1)]
        self.stamp(f"phase 2: {name}")
        self.run(self.torchrun("pretrain_tw.py", flags), self.path(name + ".log"))

    # -- 5. evaluation --------------------------------------------------------------------
    def evaluate(self) -> dict:
        from megatron_tw.eval.study import evaluate_study

        return evaluate_study(self)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    study = Study(args)
    study.build_data()
    study.pretrain()
    if not args.print_commands:
        from megatron_tw.eval.study import check_copying

        check_copying(study)
    for seed in study.cfg["seeds"] if any(
            scorer == "frozen" for _, _, scorer, _ in study.runs()) else ():
        study.score(seed)
    for run in study.runs():
        study.extend(*run)
    if args.print_commands:
        return 0
    study.evaluate()
    study.stamp(f"done: {study.path('summary.md')}")
    with open(study.path("summary.md")) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
