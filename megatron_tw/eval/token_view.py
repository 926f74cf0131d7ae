"""A text's tokens coloured by their loss weight: HTML (losses on hover) and PNG (losses below).

Green means weight > 1, red weight < 1, white weight 1; the colour saturates at a factor of 4
(|log w| >= log 4). The weights come from :func:`megatron_tw.weighting.compute_token_weights`, the
function training calls, applied to one sequence's long- and short-context losses, so a picture
shows exactly what a preset does to that text. ``TABLE1`` holds the worked example of the paper's
Table 1 (docs/method.md) for rendering without a model.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# (token, long loss, short loss) from Table 1 of the paper; "<.01" is written as 0.005.
TABLE1 = [(" inspired", 8.75, 8.49), (" by", 0.20, 0.21), (" the", 0.58, 0.64),
          (" prints", 7.82, 8.82), (" in", 1.32, 1.03), (" one", 4.54, 4.40), (" of", 0.02, 0.02),
          (" Mel", 3.76, 4.84), ("qu", 0.02, 0.63), ("i", 0.005, 0.01), ("ades", 0.01, 0.00),
          ("'", 0.04, 0.72), (" books", 0.26, 0.46)]
SATURATION = math.log(4.0)


@dataclass
class TokenScores:
    """Per-token strings and, for every token but the first, its losses and weight.

    tokens: [n] display strings; long_loss, short_loss, weights: [n - 1] (token i + 1's)."""

    tokens: list[str]
    long_loss: list[float]
    short_loss: list[float]
    weights: list[float]


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds when decoding left to right (works for any tokenizer, including
    SentencePiece's leading-space marker and byte fallback)."""
    out, prev = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1])
        out.append(text[len(prev):] if text.startswith(prev) else tokenizer.decode([ids[i]]))
        prev = text
    return out


def weights_for(long_loss: torch.Tensor, short_loss: torch.Tensor, preset: str = "dense",
                seed: int = 0, **overrides) -> torch.Tensor:
    """[n] losses -> [n] weights of one sequence under ``preset`` (+ WeightingConfig overrides)."""
    from megatron_tw.weighting import build_weighting_config, compute_token_weights

    config = build_weighting_config(preset, **overrides)
    n = long_loss.numel()
    w = compute_token_weights(long_loss.view(1, n).float(), short_loss.view(1, n).float(),
                              torch.ones(1, n), torch.arange(n).view(1, n),
                              torch.zeros(1, dtype=torch.long), config=config, seed=seed,
                              iteration=0)
    return w.view(n)


def score_text(backend, tokenizer, text: str, window: int, *, mode: str = "sliding",
               stride: Optional[int] = None, scorer=None, max_tokens: Optional[int] = None):
    """ids, long-context and short-context (W tokens, by ``scorer`` or the model) losses [n-1]."""
    from megatron_tw.eval.short_context import short_context_logprobs

    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens")
    t = torch.tensor(ids, dtype=torch.long)
    long_loss = -backend.logprobs(t)
    short_loss = -short_context_logprobs(scorer or backend, t, window, mode, stride)
    return ids, long_loss, short_loss


def colour(weight: float) -> tuple[float, float, float]:
    """RGB in [0, 1]: white at 1, towards green above, towards red below (log scale)."""
    if weight <= 0:
        t = 1.0
    else:
        t = min(abs(math.log(weight)) / SATURATION, 1.0)
    if weight >= 1:
        return (1 - 0.75 * t, 1 - 0.25 * t, 1 - 0.75 * t)
    return (1 - 0.1 * t, 1 - 0.75 * t, 1 - 0.75 * t)


def _hex(rgb) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)


def render_html(scores: TokenScores, title: str = "token weights", legend: str = "") -> str:
    """A standalone HTML page; hovering a token shows its weight and losses (title attribute)."""
    spans = [f'<span class="t first" title="first token: not predicted">'
             f"{_html_text(scores.tokens[0])}</span>"]
    for tok, w, lo, sh in zip(scores.tokens[1:], scores.weights, scores.long_loss,
                              scores.short_loss):
        tip = f"w = {w:.3f} | long loss {lo:.3f} | short loss {sh:.3f} | d = {lo - sh:+.3f}"
        spans.append(f'<span class="t" style="background:{_hex(colour(w))}" title="{tip}" '
                     f'data-w="{w:.4f}" data-long="{lo:.4f}" data-short="{sh:.4f}">'
                     f"{_html_text(tok)}</span>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>"
            "body{font-family:Georgia,serif;max-width:60em;margin:2em auto;line-height:1.9}"
            ".t{white-space:pre-wrap;border-radius:3px;padding:1px 0}.first{color:#888}"
            ".legend span{padding:2px 8px;margin-right:6px;border-radius:3px}"
            "</style></head><body>"
            f"<h2>{html.escape(title)}</h2><p>{html.escape(legend)}</p>"
            '<p class="legend">'
            f'<span style="background:{_hex(colour(4))}">w = 4</span>'
            f'<span style="background:{_hex(colour(2))}">w = 2</span>'
            f'<span style="background:{_hex(colour(1))};border:1px solid #ccc">w = 1</span>'
            f'<span style="background:{_hex(colour(0.5))}">w = 0.5</span>'
            f'<span style="background:{_hex(colour(0))}">w = 0</span></p>'
            "<p>" + "".join(spans) + "</p></body></html>\n")


def _html_text(token: str) -> str:
    return html.escape(token).replace("\n", "\u21b5<br>")


def render_png(scores: TokenScores, path: str, title: str = "token weights",
               max_tokens: int = 160, per_line: float = 90.0, start: int = 0) -> str:
    """Tokens as coloured boxes, wrapped into lines, with weight, long and short loss below:
    scored tokens ``start`` .. ``start + max_tokens - 1`` (0 = the first predicted token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = scores.tokens[1 + start:1 + start + max_tokens]
    rows, row, width = [], [], 0.0
    for i, tok in enumerate(tokens, start=start):
        shown = tok.replace("\n", "\u21b5")
        w = max(len(shown), 4) + 1.0
        if row and width + w > per_line:
            rows.append(row)
            row, width = [], 0.0
        row.append((i, shown, width, w))
        width += w
    if row:
        rows.append(row)
    if not rows:
        raise ValueError(f"no scored tokens from position {start} (the text has "
                         f"{len(scores.weights)})")
    fig_h = 1.0 + 0.95 * len(rows)
    fig, ax = plt.subplots(figsize=(per_line * 0.115, fig_h))
    ax.set_xlim(0, per_line)
    ax.set_ylim(len(rows) * 4.0, -1.5)
    ax.axis("off")
    for r, items in enumerate(rows):
        y = r * 4.0
        for i, shown, x, w in items:
            wt = scores.weights[i]
            ax.add_patch(plt.Rectangle((x, y), w - 0.3, 1.6, color=colour(wt), ec="#999",
                                       lw=0.4))
            ax.text(x + 0.2, y + 1.2, shown, fontsize=8, family="monospace")
            ax.text(x + 0.2, y + 2.35, f"w{wt:.2f}", fontsize=5.5, family="monospace",
                    color="#333")
            ax.text(x + 0.2, y + 3.25, f"{scores.long_loss[i]:.2f}/{scores.short_loss[i]:.2f}",
                    fontsize=5.5, family="monospace", color="#555")
    first = f"from token {start + 1}; " if start else ""
    ax.set_title(f"{title}\n({first}box: weight; below: w, long/short loss)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
