"""compute_token_weights against a float64 plain-Python reference written from docs/method.md.

The reference works per sequence on the list of loss-masked tokens only, with Python floats and
loops, one step at a time in the method's order. Its tie-break key is a Python-integer version
of the documented hash (lowbias32 over seed, iteration, sample id, position), so the torch int64
arithmetic of the implementation is checked too.
"""

import math
from fractions import Fraction

import pytest
import torch

from megatron_tw.weighting import PRESETS, WeightingConfig, build_weighting_config
from megatron_tw.weighting import compute_token_weights
from megatron_tw.weighting.sparsify import tie_break_keys

pytestmark = pytest.mark.unit

SEED, ITERATION = 1234, 17
M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- reference
def ref_mix32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def ref_key(seed, iteration, sample, position):
    h = 0x2545F491
    for value in (seed, iteration, sample):
        value &= (1 << 64) - 1  # two's complement, as int64
        h = ref_mix32(h ^ (value & M32))
        h = ref_mix32(h ^ ((value >> 32) & M32))
    position &= M32
    return ((ref_mix32(h ^ position) >> 1) << 32) | position


def ref_transform(name, x, shift):
    if name == "absolute":
        return abs(x)
    if name == "minus":
        return -x
    if name == "max":
        return max(x, 0.0)
    if name == "exp":
        try:
            return math.exp(x)
        except OverflowError:
            return math.inf
    if name == "shift":
        return x - math.log(shift)
    raise AssertionError(name)


def ref_sequence(long, short, positions, sample, cfg, seed, iteration):
    """Weights of the N masked tokens of one sequence (Python floats)."""
    n = len(long)
    if n == 0:
        return []
    if not (cfg.transforms or cfg.truncation is not None or cfg.sparsity is not None
            or cfg.normalization is not None or cfg.interpolation is not None):
        return [1.0] * n  # the empty config is the uniform baseline
    if cfg.comparison == "difference":
        w = [lo - sh for lo, sh in zip(long, short)]
    else:
        w = [(lo + 1e-5) / (sh + 1e-5) for lo, sh in zip(long, short)]
    for name in cfg.transforms:
        w = [ref_transform(name, x, cfg.shift) for x in w]
    if cfg.truncation is not None:
        w = [min(x, cfg.truncation) for x in w]
    if cfg.sparsity is not None:
        k = math.floor(Fraction(str(cfg.sparsity)) * n)
        k = max(k, 1)  # kappa * N < 1 keeps exactly the top token
        keys = [ref_key(seed, iteration, sample, p) for p in positions]
        order = sorted(range(n), key=lambda t: (-w[t], -keys[t]))
        keep = set(order[:k])
        w = [1.0 if t in keep else 0.0 for t in range(n)]
    if cfg.normalization == "l1":
        total = sum(abs(x) for x in w)
        w = [1.0] * n if total == 0 else [n * x / total for x in w]
    elif cfg.normalization == "softmax":
        logits = [x / cfg.temperature for x in w]
        top = max(logits)
        e = [math.exp(x - top) for x in logits]
        w = [n * x / sum(e) for x in e]
    if cfg.interpolation is not None:
        w = [cfg.interpolation + (1 - cfg.interpolation) * x for x in w]
    return w


def reference_weights(long, short, mask, positions, samples, cfg, seed=SEED, iteration=ITERATION):
    out = torch.zeros(long.shape, dtype=torch.float64)
    for i in range(long.shape[0]):
        idx = [j for j in range(long.shape[1]) if mask[i, j] != 0]
        w = ref_sequence([float(long[i, j]) for j in idx], [float(short[i, j]) for j in idx],
                         [int(positions[i, j]) for j in idx], int(samples[i]), cfg, seed,
                         iteration)
        for j, x in zip(idx, w):
            out[i, j] = x
    return out


# ----------------------------------------------------------------------------- inputs
def make_inputs(kind, seed=0, b=5, s=40):
    """long, short [b, s] float32; mask [b, s]; positions [b, s]; samples [b].

    Row 0: dense mask; row 1: random mask; row 2: N = 3 (kappa * N < 1 for kappa = 0.25);
    row 3: no masked token; row 4: long == short (all scores 0). Masked-out losses are nan.
    kind "ties" quantizes losses so that many scores are equal; "extreme" mixes huge and tiny.
    """
    g = torch.Generator().manual_seed(seed)
    long = torch.rand(b, s, generator=g) * 10
    short = torch.rand(b, s, generator=g) * 10
    if kind == "ties":
        long, short = (long * 2).round() / 2, (short * 2).round() / 2
    elif kind == "extreme":
        scale = 10.0 ** torch.randint(-30, 31, (b, s), generator=g).float()
        long, short = long * scale, short * scale.flip(1)
    short[4] = long[4]
    mask = torch.ones(b, s)
    mask[1] = (torch.rand(s, generator=g) < 0.7).float()
    mask[2] = 0
    mask[2, torch.randperm(s, generator=g)[:3]] = 1
    mask[3] = 0
    long = torch.where(mask > 0, long, torch.nan)
    short = torch.where(mask > 0, short, torch.nan)
    positions = torch.arange(s).repeat(b, 1) + 1000 * torch.arange(b).unsqueeze(1)
    samples = torch.tensor([7, 2**40 + 3, 0, 11, 5])[:b]
    return long, short, mask, positions, samples


def weights_of(cfg, inputs, **kw):
    long, short, mask, positions, samples = inputs
    return compute_token_weights(long, short, mask, positions, samples, config=cfg,
                                 seed=kw.get("seed", SEED), iteration=kw.get("iteration", ITERATION))


STEP_CONFIGS = {
    "difference-l1": WeightingConfig(normalization="l1"),
    "quotient-l1": WeightingConfig(comparison="quotient", normalization="l1"),
    "absolute": WeightingConfig(transforms=("absolute",)),
    "minus": WeightingConfig(transforms=("minus",)),
    "max": WeightingConfig(transforms=("max",)),
    "exp": WeightingConfig(transforms=("exp",)),
    "shift": WeightingConfig(transforms=("shift",), shift=3.0),
    "truncation": WeightingConfig(truncation=1.5),
    "sparsity": WeightingConfig(sparsity=0.3),
    "sparsity-1": WeightingConfig(sparsity=1.0),
    "softmax": WeightingConfig(normalization="softmax"),
    "softmax-tau": WeightingConfig(transforms=("absolute",), normalization="softmax",
                                   temperature=0.5),
    "softmax-interp": WeightingConfig(normalization="softmax", interpolation=0.3),
    "sparse-softmax": WeightingConfig(transforms=("minus",), sparsity=0.1,
                                      normalization="softmax"),
    "l1-interp0": WeightingConfig(transforms=("absolute",), normalization="l1", interpolation=0.0),
    "chain": WeightingConfig(transforms=("minus", "shift", "max", "exp", "absolute"), shift=0.5,
                             truncation=4.0, sparsity=0.6, normalization="l1",
                             interpolation=0.2),
}
PRESET_CONFIGS = {f"preset-{name}": build_weighting_config(name) for name in PRESETS}
PRESET_CONFIGS["preset-ppmi-s2"] = build_weighting_config("ppmi", shift=2.0, sparsity=0.1)
PRESET_CONFIGS["preset-npmi-s0.5"] = build_weighting_config("npmi", shift=0.5, sparsity=0.5)
ALL_CONFIGS = {**STEP_CONFIGS, **PRESET_CONFIGS}


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("name", sorted(ALL_CONFIGS))
def test_matches_reference(name, kind):
    cfg = ALL_CONFIGS[name]
    inputs = make_inputs(kind, seed=len(name))
    got = weights_of(cfg, inputs)
    assert got.dtype == torch.float32
    want = reference_weights(*inputs, cfg)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)
    # Sparsified weights must select exactly the same tokens, not just be close.
    if cfg.sparsity is not None:
        assert torch.equal(got != 0, want != 0)


@pytest.mark.parametrize("name", sorted(PRESET_CONFIGS))
def test_extreme_losses_finite_and_match_reference(name):
    cfg = PRESET_CONFIGS[name]
    inputs = make_inputs("extreme", seed=3)
    got = weights_of(cfg, inputs)
    assert torch.isfinite(got).all()
    want = reference_weights(*inputs, cfg)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [
    WeightingConfig(transforms=("exp",)),
    WeightingConfig(transforms=("minus", "exp"), normalization="l1"),
    WeightingConfig(transforms=("exp", "exp"), normalization="softmax", temperature=0.01),
    WeightingConfig(comparison="quotient", transforms=("exp",), sparsity=0.5),
])
def test_unbounded_transforms_stay_finite(cfg):
    got = weights_of(cfg, make_inputs("extreme", seed=4))
    assert torch.isfinite(got).all()


def test_lambda_one_is_uniform():
    inputs = make_inputs("random", seed=5)
    mask = inputs[2]
    for cfg in (build_weighting_config("dense", interpolation=1.0), build_weighting_config("uniform"),
                build_weighting_config("sparse", sparsity=1.0)):
        assert cfg.is_uniform
        assert torch.equal(weights_of(cfg, inputs), mask)
    # The general path gives 1 too (is_uniform is a shortcut, not a different definition).
    general = WeightingConfig(transforms=("absolute",), normalization="l1", interpolation=1.0)
    assert torch.equal(reference_weights(*inputs, general), mask.double())


@pytest.mark.parametrize("preset", ["dense", "sparse", "ppmi", "npmi"])
def test_normalized_presets_have_mean_one_per_sequence(preset):
    long, short, mask, positions, samples = inputs = make_inputs("random", seed=6)
    w = weights_of(build_weighting_config(preset), inputs).double()
    n = mask.sum(1).double()
    has = n > 0
    torch.testing.assert_close((w.sum(1)[has] / n[has]), torch.ones(int(has.sum()),
                               dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert (w[mask == 0] == 0).all()


def test_sparse_keeps_exactly_floor_kappa_n():
    long, short, mask, positions, samples = inputs = make_inputs("ties", seed=7, s=64)
    w = weights_of(build_weighting_config("sparse", sparsity=0.25), inputs)
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        nonzero = w[i][w[i] != 0]
        if n == 0:
            assert nonzero.numel() == 0
            continue
        k = max(n // 4, 1)
        assert nonzero.numel() == k
        torch.testing.assert_close(nonzero, torch.full((k,), n / k))
    assert int(mask[0].sum()) == 64 and (w[0][w[0] != 0] == 4.0).all()  # 1 / kappa


@pytest.mark.parametrize("kappa", [0.29, 0.57, 0.07])
def test_floor_kappa_n_uses_the_decimal_kappa(kappa):
    """0.29 * 100 is 28.999999999999996 in binary floating point; the method means 29."""
    g = torch.Generator().manual_seed(14)
    long, short = torch.rand(1, 100, generator=g), torch.rand(1, 100, generator=g)
    inputs = (long, short, torch.ones(1, 100), torch.arange(100).unsqueeze(0), torch.tensor([0]))
    w = weights_of(build_weighting_config("sparse", sparsity=kappa), inputs)
    assert int((w != 0).sum()) == math.floor(Fraction(str(kappa)) * 100)


def test_kappa_times_n_below_one_keeps_the_top_token():
    long, short, mask, positions, samples = inputs = make_inputs("random", seed=8)
    assert int(mask[2].sum()) == 3  # kappa * N = 0.75
    w = weights_of(build_weighting_config("sparse", sparsity=0.25), inputs)
    scores = torch.where(mask[2] > 0, (long[2] - short[2]).abs(), -1.0)
    assert (w[2] != 0).sum() == 1
    assert w[2, scores.argmax()] == 3.0


def test_all_zero_scores_fall_back_to_uniform():
    long, short, mask, positions, samples = inputs = make_inputs("random", seed=9)
    for cfg in (build_weighting_config("dense"), WeightingConfig(normalization="l1"),
                WeightingConfig(transforms=("absolute",), normalization="softmax")):
        w = weights_of(cfg, inputs)
        assert torch.equal(w[4], mask[4])  # row 4: long == short
    # A top-kappa mask of all-zero scores is a tie-break pick, weight N / k each.
    w = weights_of(build_weighting_config("npmi"), inputs)
    assert (w[4] != 0).sum() == 10 and torch.allclose(w[4][w[4] != 0], torch.tensor(4.0))


def test_masked_positions_do_not_leak():
    long, short, mask, positions, samples = make_inputs("random", seed=10)
    clean = (torch.nan_to_num(long, nan=0.0), torch.nan_to_num(short, nan=0.0))
    for name, cfg in ALL_CONFIGS.items():
        w_nan = weights_of(cfg, (long, short, mask, positions, samples))
        w_clean = weights_of(cfg, (*clean, mask, positions, samples))
        assert torch.isfinite(w_nan).all(), name
        assert torch.equal(w_nan, w_clean), name
        assert (w_nan[mask == 0] == 0).all(), name
        assert (w_nan[3] == 0).all(), name  # a row without tokens


def test_weights_carry_no_gradient():
    long, short, mask, positions, samples = make_inputs("random", seed=11)
    long = torch.nan_to_num(long).requires_grad_(True)
    short = torch.nan_to_num(short).requires_grad_(True)
    for cfg in ALL_CONFIGS.values():
        w = compute_token_weights(long, short, mask, positions, samples, config=cfg, seed=0,
                                  iteration=0)
        assert not w.requires_grad and w.grad_fn is None


def test_tie_break_keys_match_integer_reference():
    samples = torch.tensor([0, 5, 2**40 + 1])
    positions = torch.tensor([[0, 1, 2, 2**32 - 1], [7, 8, 9, 10], [0, 65535, 65536, 2**31]])
    for seed, iteration in ((0, 0), (1234, 17), (-5, 2**35)):
        keys = tie_break_keys(seed, iteration, samples, positions)
        want = [[ref_key(seed, iteration, int(samples[i]), int(p)) for p in positions[i]]
                for i in range(3)]
        assert keys.tolist() == want
        assert (keys >= 0).all() and len(set(keys.flatten().tolist())) == keys.numel()


def test_ties_are_reproducible_random_and_layout_independent():
    long, short, mask, positions, samples = make_inputs("ties", seed=12, s=64)
    cfg = build_weighting_config("npmi", sparsity=0.25)  # max(., 0): many exact-zero ties
    base = weights_of(cfg, (long, short, mask, positions, samples))
    assert torch.equal(base, weights_of(cfg, (long, short, mask, positions, samples)))
    # Another iteration re-draws the ties (row 4 is all ties).
    other = weights_of(cfg, (long, short, mask, positions, samples), iteration=ITERATION + 1)
    assert not torch.equal(base[4] != 0, other[4] != 0)
    # Permuting the tokens (any parallel layout is a permutation) permutes the weights.
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    permuted = weights_of(cfg, (long[:, perm], short[:, perm], mask[:, perm], positions[:, perm],
                                samples))
    assert torch.equal(permuted, base[:, perm])


def test_table1_worked_example():
    """docs/method.md Table 1 ("<.01" read as .005): dense weights of the high-|d| tokens exceed 1."""
    tokens = ["inspired", "by", "the", "prints", "in", "one", "of", "Mel", "qu", "i", "ades",
              "'", "books"]
    long = [8.75, .20, .58, 7.82, 1.32, 4.54, .02, 3.76, .02, .005, .01, .04, .26]
    short = [8.49, .21, .64, 8.82, 1.03, 4.40, .02, 4.84, .63, .01, .00, .72, .46]
    long_t, short_t = torch.tensor([long]), torch.tensor([short])
    mask = torch.ones_like(long_t)
    positions = torch.arange(len(tokens)).unsqueeze(0)
    cfg = build_weighting_config("dense")
    w = compute_token_weights(long_t, short_t, mask, positions, torch.tensor([0]), config=cfg,
                              seed=0, iteration=0)[0]
    by_token = dict(zip(tokens, w.tolist()))
    assert by_token["Mel"] > 1 and by_token["prints"] > 1
    assert by_token["ades"] < 1 and by_token["one"] < 1
    assert max(by_token, key=by_token.get) == "Mel"
    want = reference_weights(long_t, short_t, mask, positions, torch.tensor([0]), cfg)[0]
    torch.testing.assert_close(w.double(), want, rtol=1e-6, atol=1e-6)


def test_uniform_needs_no_short_loss_and_checks_shapes():
    long, short, mask, positions, samples = make_inputs("random", seed=13)
    w = compute_token_weights(long, None, mask, positions, samples,
                              config=build_weighting_config("uniform"), seed=0, iteration=0)
    assert torch.equal(w, mask)
    with pytest.raises(ValueError, match="short_loss"):
        compute_token_weights(long, None, mask, positions, samples,
                              config=build_weighting_config("dense"), seed=0, iteration=0)
    with pytest.raises(ValueError, match="loss_mask"):
        compute_token_weights(long, short, mask[:, :-1], positions, samples,
                              config=build_weighting_config("dense"), seed=0, iteration=0)
