"""Colour a text's tokens by their loss weight under a weighting preset (HTML + PNG).

    # with a model: long-context losses from the model, short-context ones from a scorer
    python tools/visualize_weights.py --model RUN/checkpoints \\
        --tokenizer data/demo/tokenizer/tokenizer.model --text-file chapter.txt --max-tokens 1024 \\
        --short-context 256 --preset dense --out results/weights_dense

    # the worked example of the paper's Table 1, no model needed
    python tools/visualize_weights.py --example table1 --preset dense --out results/table1

Green: weight > 1, red: weight < 1. The HTML shows each token's weight, long and short loss on
hover; the PNG prints them below each token. The weights are computed by the training code
(megatron_tw.weighting.compute_token_weights) on the whole text as one sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _override(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text}: expected FIELD=VALUE, e.g. "
                                         "interpolation=0.5")
    try:
        return key.strip(), float(value)
    except ValueError:
        return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    from megatron_tw.weighting import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF folder or megatron checkpoint (long-context losses)")
    src.add_argument("--example", choices=["table1"], help="render a built-in example")
    src.add_argument("--losses-json", help='[{"token": " Mel", "long": 3.76, "short": 4.84}, ...]')
    p.add_argument("--model-type", default="auto", choices=["auto", "hf", "megatron"])
    p.add_argument("--tokenizer", default=None, help="default: the model's (see evaluate.py)")
    p.add_argument("--add-bos", action="store_true", help="start the text with BOS")
    p.add_argument("--text", default=None)
    p.add_argument("--text-file", default=None,
                   help="a text file, or a .jsonl file of {\"text\": ...} (its first document)")
    p.add_argument("--text-offset", type=int, default=0,
                   help="start this many characters into the text")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--short-context", type=int, default=256, help="W of the short-context scorer")
    p.add_argument("--short-mode", default="sliding", choices=["sliding", "windows"])
    p.add_argument("--short-stride", type=int, default=None)
    p.add_argument("--scorer", default="self",
                   help="'self' (the model at short context) or another model folder (frozen)")
    p.add_argument("--preset", default="dense", choices=sorted(PRESETS))
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   help="WeightingConfig override FIELD=VALUE (e.g. interpolation=0.5), repeatable")
    p.add_argument("--png-tokens", type=int, default=160, help="tokens drawn in the PNG")
    p.add_argument("--png-from", type=int, default=None,
                   help="first scored token drawn in the PNG (default: with --model, the first "
                        "token beyond the short context, where long and short losses differ)")
    p.add_argument("--out", required=True, help="output prefix: OUT.html, OUT.png, OUT.json")
    return p


def _scores_from_model(cfg):
    from megatron_tw.eval.backends import detect_model_type, load_backend
    from megatron_tw.eval.run import default_tokenizer
    from megatron_tw.eval.token_view import score_text, token_strings
    from megatron_tw.eval.tokenizer import load_tokenizer

    if (cfg.text is None) == (cfg.text_file is None):
        raise ValueError("give the text with exactly one of --text or --text-file")
    text = cfg.text
    if cfg.text_file:
        with open(cfg.text_file) as f:
            text = json.loads(f.readline())["text"] if cfg.text_file.endswith(".jsonl") else f.read()
    if cfg.text_offset:  # start at the next word after the offset
        rest = text[cfg.text_offset:]
        text = rest[len(rest.split(maxsplit=1)[0]):].lstrip() if rest.strip() else rest
    mtype = cfg.model_type if cfg.model_type != "auto" else detect_model_type(cfg.model)
    tokenizer = load_tokenizer(cfg.tokenizer or default_tokenizer(cfg.model, mtype),
                               add_bos=cfg.add_bos)
    with load_backend(cfg.model, mtype, vocab_size=tokenizer.vocab_size,
                      max_length=cfg.max_tokens) as backend:
        scorer = None
        if cfg.scorer != "self":
            scorer = load_backend(cfg.scorer, vocab_size=tokenizer.vocab_size,
                                  max_length=cfg.max_tokens)
        try:
            ids, long_loss, short_loss = score_text(
                backend, tokenizer, text, cfg.short_context, mode=cfg.short_mode,
                stride=cfg.short_stride, scorer=scorer, max_tokens=cfg.max_tokens)
        finally:
            if scorer is not None:
                scorer.close()
    return token_strings(tokenizer, ids), long_loss, short_loss


def main(argv=None) -> int:
    import torch

    from megatron_tw.eval.token_view import TABLE1, TokenScores, render_html, render_png, weights_for

    cfg = build_parser().parse_args(argv)
    try:
        if cfg.model:
            tokens, long_loss, short_loss = _scores_from_model(cfg)
            source = (f"{cfg.model}; short context W={cfg.short_context} ({cfg.short_mode}), "
                      f"scorer {cfg.scorer}")
        else:
            rows = TABLE1 if cfg.example else [
                (r["token"], r["long"], r["short"]) for r in json.load(open(cfg.losses_json))]
            # the first row is a predicted token too: prepend an unscored start marker
            tokens = ["\u2026"] + [r[0] for r in rows]
            long_loss = torch.tensor([r[1] for r in rows], dtype=torch.float64)
            short_loss = torch.tensor([r[2] for r in rows], dtype=torch.float64)
            source = "Table 1 of the paper" if cfg.example else cfg.losses_json
        weights = weights_for(long_loss, short_loss, cfg.preset, **dict(cfg.overrides))
    except (ValueError, OSError) as err:
        print(f"visualize_weights.py: error: {err}", file=sys.stderr)
        return 1
    scores = TokenScores(tokens, long_loss.tolist(), short_loss.tolist(), weights.tolist())
    extra = ", ".join(f"{k}={v}" for k, v in cfg.overrides)
    title = f"preset {cfg.preset}{' (' + extra + ')' if extra else ''}"
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out + ".html", "w") as f:
        f.write(render_html(scores, title, f"long-context losses: {source}"))
    start = cfg.png_from if cfg.png_from is not None else (cfg.short_context if cfg.model else 0)
    start = min(start, max(0, len(scores.weights) - cfg.png_tokens))
    render_png(scores, cfg.out + ".png", title, max_tokens=cfg.png_tokens, start=start)
    with open(cfg.out + ".json", "w") as f:
        json.dump({"preset": cfg.preset, "overrides": dict(cfg.overrides), "source": source,
                   "tokens": tokens, "long_loss": scores.long_loss,
                   "short_loss": scores.short_loss, "weights": scores.weights}, f, indent=1)
    w = weights
    print(f"wrote {cfg.out}.html/.png/.json: {len(tokens) - 1} scored tokens, weight mean "
          f"{float(w.mean()):.3f}, max {float(w.max()):.3f}, {int((w > 1).sum())} above 1, "
          f"{int((w < 1).sum())} below 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
