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
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import re
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

VARIANTS = ("exact", "windows", "sliding", "sliding+sink")
# the project's modes and the HF variant each one implements
PROJECT_MODES = {"sliding": "sliding+sink", "windows": "windows"}
TOP_SHARE = 0.25  # the "top quarter" by |d| (the sparse preset's default kappa)


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


def token_texts(tokenizer, ids: Sequence[int], context: int = 8) -> list[str]:
    """The text each token adds when decoding left to right (decoded with a few tokens before it,
    so SentencePiece's leading spaces and multi-byte characters come out right)."""
    out = []
    for i in range(len(ids)):
        a = max(0, i - context)
        before, upto = tokenizer.decode(ids[a:i]), tokenizer.decode(ids[a:i + 1])
        out.append(upto[len(before):] if upto.startswith(before) else tokenizer.decode([ids[i]]))
    return out


# -- statistics --------------------------------------------------------------------------------
# Written here rather than imported: scipy is not a dependency of the project (nor installed in
# its environment), and the two functions below are all the measurement needs.

def rankdata(x: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties given their average rank (scipy.stats.rankdata's default)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the (tie-averaged) ranks."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    ra, rb = torch.tensor(rankdata(a), dtype=torch.float64), torch.tensor(rankdata(b),
                                                                         dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def top_indices(score: Sequence[float], share: float = TOP_SHARE) -> set[int]:
    """The floor(share x n) (at least 1) highest scores; ties broken by the lower index."""
    k = max(1, int(share * len(score)))
    return set(sorted(range(len(score)), key=lambda i: (-score[i], i))[:k])


def top_overlap(a: Sequence[float], b: Sequence[float], share: float = TOP_SHARE) -> float:
    ta, tb = top_indices(a, share), top_indices(b, share)
    return len(ta & tb) / len(ta)


# -- long-range repeats ------------------------------------------------------------------------

_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


def long_range_repeats(texts: Sequence[str], window: int) -> list[bool]:
    """Per token t of a sequence (``texts``: what each token adds to the text), whether its word
    is a long-range repeat: the same word occurred earlier in the sequence, but only outside the
    target's short context.

    Precisely: words are maximal runs of non-whitespace characters of the decoded sequence,
    compared lowercased with punctuation stripped from both ends ("Elliot," = "elliot"; a word of
    punctuation only is no word). Token t belongs to the word holding its first non-whitespace
    character (a token of whitespace only belongs to none: False). The short context of target t
    is tokens t - W + 1 .. t - 1 (and the sink, token 0, the lead token, which has no word). The
    word is a long-range repeat when an earlier occurrence of it ends before token t - W + 1 and
    no earlier occurrence has a token within t - W + 1 .. t - 1.
    """
    starts, text = [], []
    n = 0
    for piece in texts:
        starts.append(n)
        text.append(piece)
        n += len(piece)
    text = "".join(text)
    char_token = [0] * len(text)
    for t, piece in enumerate(texts):
        for c in range(starts[t], starts[t] + len(piece)):
            char_token[c] = t
    words = [(m.start(), m.end(), _EDGE_PUNCT.sub("", m.group()).lower())
             for m in re.finditer(r"\S+", text)]
    word_at = [-1] * len(text)
    for j, (a, b, _) in enumerate(words):
        for c in range(a, b):
            word_at[c] = j
    last_token = [char_token[b - 1] for a, b, _ in words]
    earlier: dict[str, list[int]] = {}
    prev_occurrences = []  # per word j: indices of earlier words of the same form
    for j, (_, _, form) in enumerate(words):
        prev_occurrences.append(list(earlier.get(form, ())) if form else [])
        if form:
            earlier.setdefault(form, []).append(j)
    flags = []
    for t, piece in enumerate(texts):
        offset = len(piece) - len(piece.lstrip())
        if offset == len(piece):
            flags.append(False)
            continue
        j = word_at[starts[t] + offset]
        window_start = t - window + 1
        prev = prev_occurrences[j]
        far = any(last_token[i] < window_start for i in prev)
        near = any(last_token[i] >= window_start for i in prev)
        flags.append(far and not near)
    return flags


# -- Hugging Face forward passes ---------------------------------------------------------------

def visible_sliding(length: int, window: int, sink: bool) -> torch.Tensor:
    """[L, L] bool: query p sees keys p - W + 2 .. p (and key 0 with the sink)."""
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    seen = (k <= q) & (k >= q - (window - 2))
    return seen | ((k == 0) & sink)


def visible_causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()


def hf_losses(model, ids: torch.Tensor, labels: torch.Tensor, visible: torch.Tensor,
              last: Optional[int] = None) -> torch.Tensor:
    """Per-position cross-entropy [b, L] (or of the last ``last`` positions) in float32, with
    ``visible`` [L, L] (True: query may attend key) as a 4D additive mask (eager attention)."""
    device = model.device
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=device)
    bias = bias.masked_fill(~visible.to(device), torch.finfo(torch.float32).min)
    mask = bias[None, None].expand(ids.shape[0], 1, -1, -1)
    logits = model(input_ids=ids.to(device), attention_mask=mask, use_cache=False,
                   logits_to_keep=last or 0).logits.float()
    target = (labels if last is None else labels[:, -last:]).to(device)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return losses.cpu()


def load_hf_model(path: str):
    from transformers import AutoModelForCausalLM

    from megatron_tw.eval.backends import _unpatched_torch_factories

    with _unpatched_torch_factories():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation="eager",
                                                     local_files_only=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def exact_losses(model, row: torch.Tensor, positions: Sequence[int], window: int, lead: int,
                 batch_size: int = 16) -> torch.Tensor:
    """[len(positions)]: the target of position p given [lead] + tokens[p - W + 2 .. p] only."""
    out = []
    causal = visible_causal(window)
    for i in range(0, len(positions), batch_size):
        chunk = positions[i:i + batch_size]
        ids = torch.stack([torch.cat([torch.tensor([lead]), row[p - window + 2:p + 1]])
                           for p in chunk])
        labels = torch.stack([row[p + 1:p + 2] for p in chunk])
        out.append(hf_losses(model, ids, torch.cat([ids[:, 1:], labels], 1), causal, last=1)[:, 0])
    return torch.cat(out)


@torch.no_grad()
def windows_losses(model, row: torch.Tensor, window: int, stride: int, lead: int,
                   batch_size: int = 16) -> torch.Tensor:
    """[T - 1]: every position's loss from the window that supplies it (reference windows)."""
    T = row.shape[0]
    starts = list(range(0, T - window + 1, stride))
    out = torch.empty(T - 1)
    causal = visible_causal(window - 1)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        ids = torch.stack([row[s:s + window - 1] for s in chunk]).clone()
        labels = torch.stack([row[s + 1:s + window] for s in chunk])
        ids[:, 0] = lead
        losses = hf_losses(model, ids, labels, causal)
        for j, s in enumerate(chunk):
            keep = 0 if s == 0 else window - 1 - stride  # window 0: all; later: the last S
            out[s + keep:s + window - 1] = losses[j, keep:]
    return out


@torch.no_grad()
def full_pass_losses(model, row: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """[T - 1]: one pass over the whole sequence (global positions) with ``visible``."""
    return hf_losses(model, row[None, :-1], row[None, 1:], visible)[0]


# -- the project's frozen scorer ---------------------------------------------------------------

@contextlib.contextmanager
def _project_megatron():
    """A one-process megatron (gloo, TP = PP = CP = 1) for the frozen scorer; forgets, on exit,
    the single-rank group cached for a process group it destroyed."""
    import torch.distributed as dist

    from megatron_tw.checkpoint.megatron_io import single_process_megatron
    from megatron_tw.runtime import groups

    fresh = not dist.is_initialized()
    saved = groups._SINGLE_RANK_GROUP
    if fresh:
        groups._SINGLE_RANK_GROUP = None
    try:
        with single_process_megatron():
            yield
    finally:
        if fresh:
            groups._SINGLE_RANK_GROUP = saved


def project_scorer_flags(cfg: FidelityConfig, scorer_path: str, hf_dir: str, vocab: int,
                         mode: str) -> list[str]:
    """The flags of a one-process run whose frozen scorer is ``scorer_path`` (its own
    architecture from its HF config or checkpoint), at megatron seq_length = seq_length - 1."""
    from megatron_tw.checkpoint.families import megatron_args_from_hf_config
    from megatron_tw.checkpoint.hf_io import read_hf_config

    flags = megatron_args_from_hf_config(read_hf_config(hf_dir))
    flags += ["--seq-length", str(cfg.seq_length - 1), "--micro-batch-size", "1",
              "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab), "--mock-data",
              "--train-iters", "1", "--attention-dropout", "0", "--hidden-dropout", "0",
              "--tw-preset", "dense", "--tw-scorer", "frozen", "--tw-scorer-load", scorer_path,
              "--tw-short-context", str(cfg.window), "--tw-short-mode", mode]
    if mode == "windows":
        flags += ["--tw-short-stride", str(cfg.S)]
    i = flags.index("--max-position-embeddings")
    flags[i + 1] = str(max(int(flags[i + 1]), cfg.seq_length))
    return flags


def project_losses(cfg: FidelityConfig, rows: torch.Tensor, scorer_path: str, hf_dir: str,
                   vocab: int, lead: int, padded_vocab: Optional[int] = None,
                   log: Callable[[str], None] = print,
                   probe_ids: Optional[list] = None) -> dict[str, torch.Tensor]:
    """{mode: [n, T - 1]} short-context losses of the project's frozen scorer
    (``SCORERS["frozen"]``, set up as tools/score_data.py does) in both modes. ``probe_ids``:
    the tokenizer's ids of ``frozen.TOKENIZER_PROBE``, checked against an HF scorer's own."""
    from megatron_tw.arguments import parse_and_validate_args
    from megatron_tw.scoring.scorers import SCORERS

    out = {}
    with _project_megatron(), torch.no_grad():
        for mode in PROJECT_MODES:
            with contextlib.redirect_stdout(io.StringIO()):  # megatron's argument dump
                args = parse_and_validate_args(
                    project_scorer_flags(cfg, scorer_path, hf_dir, vocab, mode), set_globals=False)
            if padded_vocab is not None:
                args.padded_vocab_size = padded_vocab  # the trainee's: the scorer's own here
            scorer = SCORERS["frozen"](args, bos_id=lead, vocab_size=vocab, probe_ids=probe_ids)
            scorer.setup(None)
            device = next(scorer.model.parameters()).device
            losses = []
            for row in rows:
                tokens, labels = row[None, :-1].to(device), row[None, 1:].to(device)
                batch = {"tokens": tokens, "labels": labels, "tokens_full": tokens,
                         "labels_full": labels,
                         "position_ids": torch.arange(tokens.shape[1], device=device)[None]}
                short, same_as_long = scorer.short_losses(batch)
                if same_as_long.any():  # a frozen scorer scores every position
                    raise RuntimeError(f"the project's {mode} scorer left positions unscored")
                losses.append(short[0].float().cpu())
            log(f"project scorer ({mode}): {len(rows)} sequences")
            out[mode] = torch.stack(losses)
            scorer.model = None
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
