"""The project's own frozen scorer in the score-fidelity measurement
(megatron_tw/eval/fidelity.py): ``SCORERS["frozen"]`` in a one-process megatron, set up as
tools/score_data.py does, giving its short-context losses in both --tw-short-mode modes on the
same sequences as the HF variants.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Callable, Optional

import torch

if TYPE_CHECKING:
    from megatron_tw.eval.fidelity import FidelityConfig

# the project's modes and the HF variant each one implements
PROJECT_MODES = {"sliding": "sliding+sink", "windows": "windows"}


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

