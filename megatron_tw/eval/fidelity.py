"""How faithful is a short-context score? Short-context losses of one model under each way of
forming the short context, against the method's own definition, on real text.

The method (docs/method.md) asks for ``L_short``: the loss of a target given only W tokens of
context. This module measures, for a causal LM and a text, how close the project's ways of
computing it come to that definition (docs/scoring.md shows a run on SmolLM2-135M):

- ``exact`` (the definition, the reference for the others): each sampled target run on its own
  as the token list [lead] + the W - 1 tokens before it, at positions 0 .. W - 1;
- ``windows`` (the reference code's; ``--tw-short-mode windows``): windows of W tokens every S
  tokens, each run alone as W - 1 inputs at positions 0 .. W - 2 with its first token replaced by
  the lead token; window 0 supplies positions 0 .. W - 2, window k >= 1 its last S positions;
- ``sliding``: one pass over the sequence in which the target of position p sees exactly the
  W - 1 tokens before it (keys p - W + 2 .. p), nothing else, at their global positions;
- ``sliding+sink`` (``--tw-short-mode sliding``, the project's default): the same plus the
  sequence's first token (the attention sink, key 0).

Conventions (megatron's frame): a sequence is ``seq_length`` tokens, the lead token (BOS) first;
position p holds input ``tokens[p]`` and predicts ``tokens[p + 1]``, p = 0 .. seq_length - 2
(megatron's ``--seq-length`` is ``seq_length - 1``: a sample of seq_length tokens). The windows
tile the sequence when ``(seq_length - W)`` is divisible by S, as the reference code requires.
The sampled positions are p >= W, where the exact short context is shorter than the long one
(below W the lead token plus the previous W - 1 tokens are the whole prefix).

Everything here is an independent implementation: Hugging Face transformers in float32, eager
attention, every variant through an explicit 4D additive mask. With ``project_scorer`` the
project's own frozen scorer (megatron, ``--tw-scorer frozen``, both modes) runs on the same
sequences, and its losses are compared with the HF variant it implements.

The parts: megatron_tw/eval/fidelity_hf.py (the HF variants' losses),
megatron_tw/eval/fidelity_project.py (the project's scorer), megatron_tw/eval/fidelity_stats.py
(rank statistics, long-range repeats); this module: the configuration and its checks, the
sequences and sampled positions, the measurement and its table.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from megatron_tw.eval.fidelity_hf import (
    exact_losses,
    full_pass_losses,
    load_hf_model,
    visible_causal,
    visible_sliding,
    windows_losses,
)
from megatron_tw.eval.fidelity_project import PROJECT_MODES, project_losses
from megatron_tw.eval.fidelity_stats import rankdata  # noqa: F401  (re-exported for the tests)
from megatron_tw.eval.fidelity_stats import (
    long_range_repeats,
    spearman,
    token_texts,
    top_indices,
    top_overlap,
)

VARIANTS = ("exact", "windows", "sliding", "sliding+sink")


class FidelityError(ValueError):
    """The measurement cannot run as asked; the message names the flag and the fix."""


@dataclass
class FidelityConfig:
    model: str
    text: str
    window: int = 256
    seq_length: int = 2048
    sequences: int = 6
    positions: int = 112
    stride: Optional[int] = None
    seed: int = 0
    lead_token: Optional[int] = None
    tokenizer: Optional[str] = None
    model_type: str = "auto"
    hf_config: Optional[str] = None
    project_scorer: bool = False
    batch_size: int = 16

    @property
    def S(self) -> int:
        return self.stride if self.stride is not None else max(1, self.window // 2)


# -- checks -----------------------------------------------------------------------------------

def _tiling_strides(seq_length: int, window: int) -> list[int]:
    return [s for s in range(1, window) if (seq_length - window) % s == 0]


def check_config(cfg: FidelityConfig) -> None:
    """Flag checks that need no model (raise FidelityError naming the flag and the fix)."""
    W, T = cfg.window, cfg.seq_length
    if W < 2:
        raise FidelityError(f"--window {W}: a short context needs W >= 2 (a target sees the "
                            "W - 1 tokens before it)")
    if T < W + 2:
        raise FidelityError(f"--seq-length {T} must be at least --window + 2 = {W + 2}: the "
                            "sampled targets are those beyond W (positions W .. seq_length - 2)")
    S = cfg.S
    if not 1 <= S <= W - 1 or (T - W) % S:
        good = _tiling_strides(T, W)
        hint = (f"; strides that tile: {_nearest(good, W // 2)}" if good else "")
        raise FidelityError(f"--stride {S}: windows of W={W} tokens every S tokens must tile the "
                            f"sequence of --seq-length {T} tokens: 1 <= S <= W - 1 and "
                            f"(seq_length - W) = {T - W} divisible by S{hint}")
    for flag, value, low in (("--sequences", cfg.sequences, 1), ("--positions", cfg.positions, 1),
                             ("--batch-size", cfg.batch_size, 1)):
        if value < low:
            raise FidelityError(f"{flag} {value}: must be >= {low}")
    if cfg.positions > T - 1 - W:
        raise FidelityError(f"--positions {cfg.positions}: a sequence of {T} tokens has only "
                            f"{T - 1 - W} targets beyond --window {W}; pass at most that")
    if cfg.model_type not in ("auto", "hf", "megatron"):
        raise FidelityError(f"--model-type {cfg.model_type}: choose auto, hf or megatron")
    if not os.path.isfile(cfg.text):
        raise FidelityError(f"--text {cfg.text}: no such file (a text file, or a .jsonl file of "
                            '{"text": ...} documents)')
    if not os.path.isdir(cfg.model):
        raise FidelityError(f"--model {cfg.model}: no such folder (an HF causal LM folder or a "
                            "megatron checkpoint)")


def _nearest(values: list[int], target: int, n: int = 4) -> str:
    return ", ".join(str(v) for v in sorted(sorted(values, key=lambda v: abs(v - target))[:n]))


# -- text -------------------------------------------------------------------------------------

def read_documents(path: str) -> list[str]:
    """A text file (one document) or a .jsonl file of {"text": ...} documents."""
    import json

    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            return [f.read()]
        docs = []
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError) as err:
                raise FidelityError(f"--text {path}: line {n} is not a JSON object with a "
                                    f"\"text\" field ({err})") from None
        return docs


def make_sequences(docs: Sequence[str], tokenizer, cfg: FidelityConfig, lead: int) -> torch.Tensor:
    """[n, seq_length] int64: the lead token and the next seq_length - 1 tokens of the text, cut
    consecutively from the start of each document (a sequence never spans two documents)."""
    body = cfg.seq_length - 1
    rows = []
    for doc in docs:
        ids = tokenizer.encode(doc)
        for start in range(0, len(ids) - body + 1, body):
            rows.append([lead, *ids[start:start + body]])
            if len(rows) == cfg.sequences:
                return torch.tensor(rows, dtype=torch.long)
    raise FidelityError(f"--text {cfg.text}: holds only {len(rows)} sequence(s) of "
                        f"--seq-length {cfg.seq_length} tokens, --sequences {cfg.sequences} "
                        "asked; pass fewer --sequences, a shorter --seq-length or a longer text")


def sample_positions(cfg: FidelityConfig) -> list[list[int]]:
    """Per sequence, ``positions`` distinct positions p in [W, seq_length - 2], sorted; fixed by
    --seed (sequence i uses its own generator, so adding sequences keeps the earlier samples)."""
    out = []
    for i in range(cfg.sequences):
        rng = random.Random(cfg.seed * 1_000_003 + i)
        out.append(sorted(rng.sample(range(cfg.window, cfg.seq_length - 1), cfg.positions)))
    return out


# -- the measurement ---------------------------------------------------------------------------

@dataclass
class FidelityResult:
    config: dict
    lead_token: int
    mean_long: float
    rows: list[dict]
    long_range: dict
    positions: list[list[int]]
    losses: dict = field(default_factory=dict)   # name -> [n][positions] at the sampled positions

    def to_json(self) -> dict:
        return asdict(self)


def _row(name: str, long: torch.Tensor, short: torch.Tensor, exact_d: list[float]) -> dict:
    d = long - short
    absd = d.abs().tolist()
    return {"variant": name, "mean_short": float(short.mean()), "std_d": float(d.std()),
            "spearman_vs_exact": spearman(absd, [abs(x) for x in exact_d]),
            "top_overlap_vs_exact": top_overlap(absd, [abs(x) for x in exact_d])}


def _long_range(flags: list[bool], d: torch.Tensor) -> dict:
    top = top_indices(d.abs().tolist())
    share_top = sum(flags[i] for i in top) / len(top)
    share_all = sum(flags) / len(flags)
    return {"top_share": share_top, "all_share": share_all, "top_n": len(top),
            "all_n": len(flags), "lift": share_top / share_all if share_all else float("nan")}


def _resolve_lead(cfg: FidelityConfig, tokenizer, vocab: int) -> int:
    lead = cfg.lead_token if cfg.lead_token is not None else tokenizer.bos_id
    if lead is None:
        raise FidelityError(f"the tokenizer {tokenizer.name} has no BOS token to lead each "
                            "sequence; pass --lead-token ID (e.g. its end-of-document id"
                            + (f" {tokenizer.eod_id}" if tokenizer.eod_id is not None else "")
                            + ")")
    if not 0 <= lead < vocab:
        raise FidelityError(f"--lead-token {lead}: not a token id of the model's vocabulary "
                            f"(0 .. {vocab - 1})")
    return int(lead)


def _hf_vocab_size(hf_dir: str) -> int:
    from megatron_tw.checkpoint.hf_io import read_hf_config

    config = read_hf_config(hf_dir)
    return config.vocab_size if hasattr(config, "vocab_size") else config["vocab_size"]


def _model_folders(cfg: FidelityConfig, stack: contextlib.ExitStack):
    """(model type, the HF folder the HF variants run, padded vocab of a megatron checkpoint)."""
    from megatron_tw.eval.backends import detect_model_type

    try:
        mtype = cfg.model_type if cfg.model_type != "auto" else detect_model_type(cfg.model)
    except ValueError as err:
        raise FidelityError(str(err)) from None
    if mtype == "hf":
        return mtype, cfg.model, None
    from megatron_tw.checkpoint import megatron_io
    from megatron_tw.checkpoint.convert import EMBEDDING_KEY, megatron_to_hf

    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="score_fidelity_"))
    hf_dir = os.path.join(tmp, "hf")
    megatron_to_hf(cfg.model, hf_dir, hf_config=cfg.hf_config, dtype=torch.float32)
    padded = megatron_io.checkpoint_tensor_shape(megatron_io.checkpoint_data_dir(cfg.model),
                                                 EMBEDDING_KEY)[0]
    return mtype, hf_dir, padded


def measure(cfg: FidelityConfig, log: Callable[[str], None] = print,
            token_losses: bool = False) -> FidelityResult:
    """Run every variant (and, with ``cfg.project_scorer``, the project's scorer) on the text."""
    from megatron_tw.eval.run import default_tokenizer
    from megatron_tw.eval.tokenizer import load_tokenizer

    check_config(cfg)
    with contextlib.ExitStack() as stack:
        mtype, hf_dir, padded = _model_folders(cfg, stack)
        tokenizer = load_tokenizer(cfg.tokenizer or default_tokenizer(cfg.model, mtype))
        vocab = int(_hf_vocab_size(hf_dir))
        if tokenizer.vocab_size > vocab:
            raise FidelityError(f"--tokenizer: {tokenizer.vocab_size} tokens, but the model embeds "
                                f"only {vocab}; pass the tokenizer the model was trained with")
        lead = _resolve_lead(cfg, tokenizer, vocab)
        probe = None
        if cfg.project_scorer:  # before the HF passes: the scorer must share the tokenizer
            from megatron_tw.errors import ConfigError
            from megatron_tw.scoring.frozen import TOKENIZER_PROBE, check_scorer_tokenizer

            probe = tokenizer.encode(TOKENIZER_PROBE)
            try:
                if mtype == "hf":
                    check_scorer_tokenizer(cfg.model, probe)
            except ConfigError:
                raise FidelityError(f"--tokenizer {cfg.tokenizer}: splits text differently from "
                                    f"the tokenizer in --model {cfg.model}, which the project "
                                    "scorer checks; pass the model's tokenizer (or leave "
                                    "--tokenizer out)") from None
        rows = make_sequences(read_documents(cfg.text), tokenizer, cfg, lead)
        positions = sample_positions(cfg)
        model = load_hf_model(hf_dir)
        W, S, T = cfg.window, cfg.S, cfg.seq_length
        full = {"long": [], "windows": [], "sliding": [], "sliding+sink": []}
        exact, flags, token_rows = [], [], None
        for i, row in enumerate(rows):
            full["long"].append(full_pass_losses(model, row, visible_causal(T - 1)))
            full["sliding"].append(full_pass_losses(model, row, visible_sliding(T - 1, W, False)))
            full["sliding+sink"].append(full_pass_losses(model, row,
                                                         visible_sliding(T - 1, W, True)))
            full["windows"].append(windows_losses(model, row, W, S, lead, cfg.batch_size))
            exact.append(exact_losses(model, row, positions[i], W, lead, cfg.batch_size))
            texts = token_texts(tokenizer, row.tolist())
            repeats = long_range_repeats(texts, W)
            flags += [repeats[p + 1] for p in positions[i]]  # position p predicts token p + 1
            if token_losses and i == 0:
                token_rows = [{"token": texts[t], "long": float(full["long"][0][t - 1]),
                               "short": float(full["sliding+sink"][0][t - 1])}
                              for t in range(1, T)]
            log(f"sequence {i + 1}/{len(rows)}: HF variants done")
        del model
        full = {k: torch.stack(v) for k, v in full.items()}
        project = {}
        if cfg.project_scorer:
            scorer_path = cfg.model
            if mtype == "megatron":
                # the iteration folder: the checkpoint root may hold the config.json of its HF
                # source, which --tw-scorer-load reads as an HF folder
                from megatron_tw.checkpoint.megatron_io import checkpoint_data_dir

                scorer_path = checkpoint_data_dir(cfg.model)
            project = project_losses(cfg, rows, scorer_path, hf_dir, vocab, lead, padded, log,
                                     probe_ids=probe)

    idx = [(i, p) for i in range(len(rows)) for p in positions[i]]

    def at(losses):  # [n, T - 1] -> the sampled positions, flat
        return torch.stack([losses[i, p] for i, p in idx])

    long = at(full["long"])
    sampled = {"exact": torch.cat(exact), **{k: at(full[k]) for k in VARIANTS[1:]}}
    exact_d = (long - sampled["exact"]).tolist()
    table = [_row(name, long, sampled[name], exact_d) for name in VARIANTS]
    for mode, variant in PROJECT_MODES.items():
        if mode in project:
            sampled[f"project {mode}"] = at(project[mode])
            r = _row(f"project {mode}", long, sampled[f"project {mode}"], exact_d)
            r["matches"] = variant
            r["max_abs_vs_hf"] = float((project[mode] - full[variant]).abs().max())
            table.append(r)
    long_range = {name: _long_range(flags, long - sampled[name]) for name in sampled}
    result = FidelityResult(
        config={**asdict(cfg), "stride": S}, lead_token=lead, mean_long=float(long.mean()),
        rows=table, long_range=long_range, positions=positions,
        losses={"long": long.tolist(), **{k: v.tolist() for k, v in sampled.items()}})
    if token_rows is not None:
        result.losses["sequence0_tokens"] = token_rows
    return result


def format_table(result: FidelityResult) -> str:
    """The markdown table, the mean long loss and the long-range share."""
    cfg = result.config
    lines = ["| variant | mean L_short | std d | Spearman abs(d) vs exact | top-25% overlap vs "
             "exact | max abs(project - HF) |", "|---|---|---|---|---|---|"]
    for r in result.rows:
        diff = (f"{r['max_abs_vs_hf']:.2e} (vs {r['matches']})" if "max_abs_vs_hf" in r
                else "-")
        lines.append(f"| {r['variant']} | {r['mean_short']:.3f} | {r['std_d']:.3f} | "
                     f"{r['spearman_vs_exact']:.3f} | {r['top_overlap_vs_exact']:.3f} | {diff} |")
    n = sum(len(p) for p in result.positions)
    lines.append("")
    lines.append(f"mean L_long {result.mean_long:.3f} over {n} sampled targets "
                 f"({cfg['sequences']} sequences of {cfg['seq_length']} tokens, W = "
                 f"{cfg['window']}, S = {cfg['stride']}, lead token {result.lead_token})")
    for name in ("sliding+sink", "exact"):
        lr = result.long_range[name]
        lines.append(f"long-range repeats ({name}): {lr['top_share']:.3f} of the top-25% by "
                     f"abs(d) ({lr['top_n']} targets) vs {lr['all_share']:.3f} of all "
                     f"{lr['all_n']} sampled targets (x{lr['lift']:.2f})")
    return "\n".join(lines)
