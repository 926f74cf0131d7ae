"""Non-finite numbers are caught at the step where they appear and never reach the weights.

What is checked, per micro-batch, on the rank that computes it (``check_finite``):
- ``loss``: the trainee's per-token cross-entropy on the masked tokens, and the weighted sum;
- ``short-context losses``: the scores (self, frozen or precomputed scorer);
- ``token weights``;
and once per optimizer step, on every rank (``install_step_guard``):
- ``gradients``: after megatron's data-parallel reduction and its division by the token count;
- an empty batch: a global batch without any token in the loss (every label masked, e.g.
  ``--eod-mask-loss`` on sequences of EOD only) has the loss 0/0 (megatron logs NaN); megatron
  clamps the count it divides the gradients by, so it would step the optimizer on zero gradients,
  and momentum and weight decay would move the weights with no data.

What happens then is ``--tw-nonfinite`` (megatron_tw/reliability/arguments.py):
- ``stop`` (default): raise :class:`NonFiniteError` on the rank that found it, naming the tensor,
  the iteration and the rank, before the optimizer step: no weight, optimizer state or checkpoint
  ever holds the bad update.
- ``skip``: every rank skips the optimizer step of that iteration, through megatron's own
  "update unsuccessful" path (the one fp16 overflow takes): parameters, optimizer state and the LR
  schedule stay as they were; the iteration counter and the data advance; megatron counts it in
  "number of skipped iterations". After ``--tw-nonfinite-max-skips`` consecutive skipped
  iterations the run stops as under ``stop`` (a run whose every step is skipped only burns time).

Why not megatron's rerun state machine (stock ``pretrain_gpt`` validates its loss through it): it
does not validate the first iteration, and in its default mode (``--rerun-mode
validate_results``) a deterministic NaN reruns the step, then saves a checkpoint and exits,
asking for a rerun on another GPU: a protocol for hardware faults. A NaN from the data, the scorer
or the learning rate is deterministic; it calls for one of the two policies above.
``--no-check-for-nan-in-loss-and-grad`` turns every check here off.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Optional

import torch

NONFINITE_POLICIES = ("stop", "skip")

# The kinds the step guard reduces over all ranks, in a fixed order (one slot each).
STEP_KINDS = ("loss", "short-context losses", "token weights", "gradients")
_PHRASES = {"empty batch": "no token of the global batch in the loss (loss 0/0)"}


class NonFiniteError(RuntimeError):
    """NaN or Inf in a named tensor; the message names the iteration, the rank and the policy."""


@dataclasses.dataclass
class _StepRecord:
    """What the checks of the current training step found on this rank (reset by the guard)."""

    found: dict = dataclasses.field(default_factory=dict)  # kind -> first description
    # loss-mask tokens seen by this rank's loss functions in this step: a tensor on the loss's
    # device, read once by the guard (no host sync per micro-batch)
    tokens: Optional[torch.Tensor] = None
    counted: bool = False  # whether any loss function ran on this rank in this step

    def clear(self) -> None:
        self.found.clear()
        self.tokens, self.counted = None, False


_STEP = _StepRecord()
_CONSECUTIVE_SKIPS = 0
_GUARD_INSTALLED = False


def _args():
    from megatron.training import get_args

    return get_args()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _enabled(args) -> bool:
    # tw_check_nonfinite is set at start-up (reliability/arguments.py); older arg namespaces (tests
    # that parse without the group) fall back to megatron's flag.
    default = getattr(args, "check_for_nan_in_loss_and_grad", True)
    return bool(getattr(args, "tw_check_nonfinite", default))


def _policy(args) -> str:
    return getattr(args, "tw_nonfinite", "stop")


def iteration_of_step(args) -> int:
    """The iteration megatron's log line will show for the step being computed (1-based)."""
    return int(getattr(args, "curr_iteration", 0) or 0) + 1


def describe_nonfinite(tensor: torch.Tensor) -> str:
    """'3 NaN, 1 Inf of 128 values' (counts over the whole tensor)."""
    t = tensor.detach()
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan} NaN, {inf} Inf of {t.numel()} values"


# The likely cause of each kind of finding, for the message.
_HINTS = {
    "loss": "the trainee's own losses: usually a learning rate that overflowed (check --lr, "
            "--lr-warmup-*, --clip-grad) or a diverged run; the last checkpoint is intact",
    "short-context losses": "the scores: a broken scorer checkpoint (--tw-scorer-load) or "
                            "NaN/Inf in the precomputed sidecar (--tw-short-loss-path)",
    "token weights": "the weighting turned finite scores into NaN/Inf: check --tw-temperature, "
                     "--tw-shift and --tw-truncation",
    "gradients": "the backward pass overflowed (check --lr, --clip-grad, --loss-scale)",
    "empty batch": "every label of the global batch is masked (e.g. --eod-mask-loss on "
                   "sequences of EOD tokens only): the loss is 0/0; megatron would still step "
                   "the optimizer on zero gradients (momentum and weight decay move the weights "
                   "with no data)",
}


def check_finite(name: str, tensor: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
    """Check ``tensor`` for NaN/Inf; ``True`` when finite (or when checks are off).

    On a non-finite value, under ``--tw-nonfinite stop`` raise :class:`NonFiniteError` (message:
    ``name``, iteration, rank, counts, likely cause); under ``skip`` record it for this step's
    optimizer guard (which skips the update on every rank) and return ``False`` so the caller may
    keep the rest of the micro-batch computable. Outside training (evaluation, no autograd) a
    ``skip`` run only warns: there is no update to skip.

    ``tensor``: any shape; ``mask`` (broadcastable to it, optional): only values where it is
    non-zero count (elementwise, so no boolean indexing and its host sync). Reduced over nothing
    (this rank's values only: the guard reduces the verdict over all ranks).
    """
    args = _args()
    if not _enabled(args):
        return True
    finite = torch.isfinite(tensor)
    if mask is not None:
        finite = finite | (mask == 0)
    if bool(finite.all()):  # one host read per checked tensor
        return True
    if mask is not None:  # the rare path: describe the masked values only
        tensor = tensor[(mask != 0).expand_as(tensor)]
    iteration = iteration_of_step(args)
    what = f"{describe_nonfinite(tensor)} on rank {_rank()}"
    policy = _policy(args)
    if policy == "stop":
        raise NonFiniteError(
            f"non-finite {name} at iteration {iteration}: {what}. Stopped before the optimizer "
            f"step (--tw-nonfinite stop): no weight, optimizer state or checkpoint holds this "
            f"step. Likely cause: {_HINTS[name]}. --tw-nonfinite skip would skip such steps "
            "instead.")
    if not torch.is_grad_enabled():
        print(f"WARNING: non-finite {name} during evaluation after iteration {iteration - 1}: "
              f"{what}", file=sys.stderr, flush=True)
        return False
    if name not in _STEP.found:  # once per tensor and step, not per micro-batch
        _STEP.found[name] = what
        print(f"WARNING: non-finite {name} at iteration {iteration}: {what}; --tw-nonfinite "
              "skip: this iteration's update will be skipped", file=sys.stderr, flush=True)
    return False


def count_loss_tokens(num_tokens: torch.Tensor) -> None:
    """Add this micro-batch's loss-mask token count (a local integer scalar) to the step record;
    the guard sums it over all ranks to catch a global batch without tokens. Training only."""
    if torch.is_grad_enabled():
        n = num_tokens.detach().to(torch.float64)
        _STEP.tokens = n if _STEP.tokens is None else _STEP.tokens + n
        _STEP.counted = True


# -- the optimizer-step guard -------------------------------------------------------------------

def _local_grads_finite(optimizer) -> bool:
    grads = [p.grad for p in optimizer.get_parameters() if p.grad is not None]
    if not grads:
        return True
    # Max-abs per tensor (a multi-tensor kernel on GPU): Inf or NaN exactly when a value is, with
    # no overflow from squaring large finite gradients as a 2-norm would.
    try:
        norms = torch._foreach_norm(grads, ord=float("inf"))
    except (RuntimeError, TypeError):  # mixed devices/dtypes on some builds
        norms = [torch.linalg.vector_norm(g, ord=float("inf")) for g in grads]
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _step_verdict(optimizer) -> tuple[list[str], bool]:
    """Reduce this step's findings over ALL ranks (every rank steps its optimizer, and all of
    them must take the same decision, or replicas diverge). Returns (kinds found anywhere, whether
    the global batch had no loss token)."""
    counts = [1.0 if kind in _STEP.found else 0.0 for kind in STEP_KINDS[:-1]]
    counts.append(0.0 if _local_grads_finite(optimizer) else 1.0)
    tokens = 0.0 if _STEP.tokens is None else float(_STEP.tokens)
    # Token count: summed over all ranks (TP copies and non-last PP stages included: only
    # whether it is zero matters); "counted" tells whether any rank ran a loss function.
    verdict = torch.tensor([*counts, tokens, 1.0 if _STEP.counted else 0.0], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        verdict = verdict.to(_collective_device())
        torch.distributed.all_reduce(verdict)
        verdict = verdict.cpu()
    kinds = [kind for kind, n in zip(STEP_KINDS, verdict[:len(STEP_KINDS)].tolist()) if n > 0]
    no_tokens = verdict[-1].item() > 0 and verdict[-2].item() == 0
    return kinds, no_tokens


def _guard_prepare_grads(optimizer, prepare_grads):
    """Wrap ``optimizer.prepare_grads`` (megatron: "returns whether inf/nan is found"; True makes
    ``step()`` return unsuccessful before clipping or updating anything)."""

    @functools.wraps(prepare_grads)
    def guarded() -> bool:
        global _CONSECUTIVE_SKIPS
        found_inf = prepare_grads()
        args = _args()
        if found_inf or not _enabled(args):
            # megatron's own overflow (fp16 loss scaling, agreed over the model-parallel group):
            # it skips the step and lowers the loss scale; an expected event, not a finding.
            _STEP.clear()
            return found_inf
        try:
            kinds, no_tokens = _step_verdict(optimizer)
            local = dict(_STEP.found)
        finally:
            _STEP.clear()
        if no_tokens:  # a loss of 0/0, whatever the gradients look like: name it first
            kinds.insert(0, "empty batch")
        if not kinds:
            _CONSECUTIVE_SKIPS = 0
            return found_inf
        iteration = iteration_of_step(args)
        names = ", ".join(_PHRASES.get(kind, f"non-finite {kind}") for kind in kinds)
        where = "; ".join(f"{k}: {v}" for k, v in local.items())
        detail = f" (here: {where})" if where else ""
        if _policy(args) == "stop":
            raise NonFiniteError(
                f"{names} at iteration {iteration}{detail}. Stopped before the "
                f"optimizer step (--tw-nonfinite stop). Likely cause: {_HINTS[kinds[0]]}.")
        _CONSECUTIVE_SKIPS += 1
        limit = getattr(args, "tw_nonfinite_max_skips", None)
        if limit is not None and _CONSECUTIVE_SKIPS > limit:
            raise NonFiniteError(
                f"{names} at iteration {iteration}{detail}: {_CONSECUTIVE_SKIPS} "
                f"consecutive iterations skipped, more than --tw-nonfinite-max-skips {limit}; "
                f"stopping. Likely cause: {_HINTS[kinds[0]]}.")
        if _rank() == 0:
            print(f"WARNING: skipped iteration {iteration}: {names}{detail}; "
                  "parameters, optimizer state and learning-rate schedule left unchanged "
                  "(--tw-nonfinite skip)", file=sys.stderr, flush=True)
        return True

    guarded.__megatron_tw_guard__ = True
    return guarded


def guard_optimizer(optimizer):
    """Install the step guard on one megatron optimizer instance (idempotent); returns it."""
    guarded = getattr(getattr(optimizer, "prepare_grads", None), "__megatron_tw_guard__", False)
    if optimizer is not None and not guarded:
        optimizer.prepare_grads = _guard_prepare_grads(optimizer, optimizer.prepare_grads)
    return optimizer


def install_step_guard() -> None:
    """Guard the optimizer megatron's ``pretrain()`` builds.

    ``pretrain()`` offers no hook between building the optimizer and training, so the builder it
    calls (``megatron.training.training.get_megatron_optimizer``, looked up by name at call time)
    is wrapped to guard the instance it returns. Idempotent; call before ``pretrain()``.
    """
    global _GUARD_INSTALLED
    if _GUARD_INSTALLED:
        return
    import megatron.training.training as training

    build = training.get_megatron_optimizer

    @functools.wraps(build)
    def build_guarded(*a, **k):
        return guard_optimizer(build(*a, **k))

    training.get_megatron_optimizer = build_guarded
    _GUARD_INSTALLED = True


def reset_step_record() -> dict:
    """Clear and return what the current step recorded (for tests driving the checks directly)."""
    global _CONSECUTIVE_SKIPS
    found = dict(_STEP.found)
    _STEP.clear()
    _CONSECUTIVE_SKIPS = 0
    return found
