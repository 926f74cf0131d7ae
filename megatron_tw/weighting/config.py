"""WeightingConfig: a frozen description of step 2 of the method (scores -> loss weights).

The steps run in a fixed order (docs/method.md, "Pipeline"):
    comparison -> transforms (left to right) -> truncation -> sparsification -> normalization
    -> interpolation
A config names which steps are active and their parameters; `compute_token_weights` executes it.
Validation lives here so that every entry point (argparse, Python, tests) gets the same errors,
each naming the command-line flag that sets the field and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Field name -> the --tw-* flag that sets it: errors speak in flags because users set flags.
FLAGS = {
    "preset": "--tw-preset",
    "comparison": "--tw-comparison",
    "transforms": "--tw-transforms",
    "shift": "--tw-shift",
    "truncation": "--tw-truncation",
    "sparsity": "--tw-sparsity",
    "normalization": "--tw-normalization",
    "temperature": "--tw-temperature",
    "interpolation": "--tw-interpolation",
}

NORMALIZATION_CHOICES = ("l1", "softmax")


def _canonical_transforms(transforms) -> tuple[str, ...]:
    """Accept a tuple/list of names or a comma list ("minus,shift,max"); "" / "none" -> ()."""
    if transforms is None:
        return ()
    if isinstance(transforms, str):
        if transforms.strip().lower() in ("", "none"):
            return ()
        transforms = transforms.split(",")
    return tuple(str(name).strip().lower() for name in transforms if str(name).strip())


@dataclass(frozen=True)
class WeightingConfig:
    """Which weighting steps are active, per sequence (see module docstring for the order).

    comparison:    "difference" d = L_long - L_short, or "quotient" (L_long+1e-5)/(L_short+1e-5).
    transforms:    names from the TRANSFORMS registry, applied left to right.
    shift:         s of the "shift" transform (d - log s); required iff "shift" is in transforms.
    truncation:    gamma: w = min(w, gamma).
    sparsity:      kappa in (0, 1]: binary mask on the top floor(kappa * N) tokens by score.
    normalization: None, "l1" (N w / sum|w|) or "softmax" (N softmax(w / temperature)).
    temperature:   softmax temperature tau > 0 (only with normalization "softmax").
    interpolation: lambda in [0, 1]: w = lambda + (1 - lambda) w; requires a normalization.

    A config with no step at all (no transform, truncation, sparsification, normalization or
    interpolation) is the uniform baseline: the raw signed comparison is never used as a weight.
    """

    comparison: str = "difference"
    transforms: tuple[str, ...] = ()
    shift: float | None = None
    truncation: float | None = None
    sparsity: float | None = None
    normalization: str | None = None
    temperature: float = 1.0
    interpolation: float | None = None

    def __post_init__(self):
        # Canonical spellings, so that "L1", "None" and "minus,max" mean what users expect.
        object.__setattr__(self, "transforms", _canonical_transforms(self.transforms))
        if isinstance(self.comparison, str):
            object.__setattr__(self, "comparison", self.comparison.strip().lower())
        if isinstance(self.normalization, str):
            norm = self.normalization.strip().lower()
            object.__setattr__(self, "normalization", None if norm == "none" else norm)

    @property
    def is_uniform(self) -> bool:
        """True when every masked token gets weight exactly 1 whatever the losses.

        That is: no step configured; or lambda = 1 (lambda + 0 * w); or kappa = 1 (the mask keeps
        all N tokens, and L1 / softmax of a constant row is 1 again).
        """
        if self.interpolation == 1.0 or self.sparsity == 1.0:
            return True
        return not (
            self.transforms
            or self.truncation is not None
            or self.sparsity is not None
            or self.normalization is not None
            or self.interpolation is not None
        )

    @property
    def needs_short_loss(self) -> bool:
        return not self.is_uniform

    def validate(self) -> "WeightingConfig":
        """Raise ValueError naming the flag and the fix; return self so calls can chain."""
        # Imported here: the registries import this module for type hints.
        from megatron_tw.weighting.transforms import COMPARISONS, TRANSFORMS

        if self.comparison not in COMPARISONS:
            raise ValueError(
                f"{FLAGS['comparison']}={self.comparison!r} is not supported; "
                f"choose one of {', '.join(sorted(COMPARISONS))}."
            )
        for name in self.transforms:
            if name not in TRANSFORMS:
                raise ValueError(
                    f"{FLAGS['transforms']}: unknown transform {name!r}; registered transforms: "
                    f"{', '.join(sorted(TRANSFORMS))}. Give a comma list such as "
                    "'minus,shift,max', or register a new one with @register_transform in "
                    "megatron_tw/weighting/transforms.py."
                )
        if "shift" in self.transforms:
            if self.shift is None:
                raise ValueError(
                    f"{FLAGS['transforms']} contains 'shift' but {FLAGS['shift']} is not set; "
                    f"pass {FLAGS['shift']} S with S > 0 (the transform computes d - log S)."
                )
            if not (math.isfinite(self.shift) and self.shift > 0):
                raise ValueError(
                    f"{FLAGS['shift']}={self.shift} is invalid: the shift transform computes "
                    f"d - log(S), so S must be a finite number > 0."
                )
        elif self.shift is not None:
            raise ValueError(
                f"{FLAGS['shift']}={self.shift} has no effect because {FLAGS['transforms']} "
                f"{self.transforms or '(empty)'} does not contain 'shift'; add 'shift' to "
                f"{FLAGS['transforms']} or drop {FLAGS['shift']}."
            )
        if self.truncation is not None and not (
            math.isfinite(self.truncation) and self.truncation > 0
        ):
            raise ValueError(
                f"{FLAGS['truncation']}={self.truncation} is invalid: gamma caps the weights "
                f"(w = min(w, gamma)) and must be a finite number > 0 (LongCE uses 5)."
            )
        if self.sparsity is not None and not (0.0 < self.sparsity <= 1.0):
            raise ValueError(
                f"{FLAGS['sparsity']}={self.sparsity} is invalid: kappa is the kept fraction of "
                f"tokens and must be in (0, 1] (e.g. 0.25 keeps the top quarter)."
            )
        if self.normalization is not None and self.normalization not in NORMALIZATION_CHOICES:
            raise ValueError(
                f"{FLAGS['normalization']}={self.normalization!r} is not supported; choose one "
                f"of none, {', '.join(NORMALIZATION_CHOICES)}."
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"{FLAGS['temperature']}={self.temperature} is invalid: the softmax temperature "
                f"must be a finite number > 0 (1 is the paper's)."
            )
        if self.temperature != 1.0 and self.normalization != "softmax":
            raise ValueError(
                f"{FLAGS['temperature']}={self.temperature} only applies to softmax "
                f"normalization; add {FLAGS['normalization']} softmax or drop "
                f"{FLAGS['temperature']}."
            )
        if self.interpolation is not None:
            if not (0.0 <= self.interpolation <= 1.0):
                raise ValueError(
                    f"{FLAGS['interpolation']}={self.interpolation} is invalid: lambda must be "
                    f"in [0, 1] (w = lambda + (1 - lambda) w; lambda = 1 is uniform)."
                )
            if self.normalization is None:
                raise ValueError(
                    f"{FLAGS['interpolation']}={self.interpolation} needs a normalization: "
                    f"interpolating between 1 and unnormalized scores has no meaning. Add "
                    f"{FLAGS['normalization']} l1 (or softmax), or remove "
                    f"{FLAGS['interpolation']}."
                )
        return self


# megatron saves the run's args in every checkpoint (``args.tw_weighting`` is a WeightingConfig)
# and --ckpt-format torch loads them with torch.load(weights_only=True), which admits only
# registered classes: without this a resume prints "could not load the checkpoint" and exits.
import torch.serialization  # noqa: E402

torch.serialization.add_safe_globals([WeightingConfig])
