"""tools/score_fidelity.py on a tiny random HF Llama (megatron_tw/eval/fidelity.py):

- the exact variant is the HF model run on the literal token list [BOS] + the W - 1 tokens
  before each target (plain HF call, no mask, its default attention);
- the sliding, sliding+sink and windows variants equal a float64 Llama written from the
  formulas, with masks built here position by position;
- the project's frozen scorer (megatron, --tw-scorer frozen) gives the HF sliding+sink losses in
  the sliding mode and the HF windows losses (BOS substituted) in the windows mode, within 1e-4,
  from an HF folder and from a converted megatron checkpoint;
- the table and JSON come out; bad flags (and, with the project scorer, a --tokenizer other than
  the model's) give one-line errors naming the flag.
"""

import json
import random
import string

import pytest
import torch

pytestmark = pytest.mark.unit

T, W, S = 65, 17, 8   # sequences of 65 tokens; windows of 17 every 8 tile them (65 - 17 = 48)
BOS = 1


def char_tokenizer(path, bos: str | None = "<s>", reverse: bool = False) -> int:
    """A character-level HF tokenizer (ids < 128, the tiny model's vocabulary) saved to ``path``
    (``reverse``: the same characters, numbered the other way round)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + " .,;:'!?-\n"), reverse=reverse)
    specials = ["<unk>"] + ([bos] if bos else ["<pad>"])
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    extra = {"bos_token": bos} if bos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            clean_up_tokenization_spaces=False, **extra).save_pretrained(path)
    return len(vocab)


def story(n_words: int = 1500, seed: int = 0) -> str:
    words = ("the captain wrote a letter to Anne and her sister Mary about Kellynch hall in the "
             "autumn while Wentworth walked").split()
    r = random.Random(seed)
    return " ".join(r.choice(words) + ("." if r.random() < 0.1 else "") for _ in range(n_words))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.e2e.test_score_data import tiny_hf_scorer

    root = tmp_path_factory.mktemp("fidelity")
    model = tiny_hf_scorer(root / "model")
    char_tokenizer(root / "model")
    text = root / "story.txt"
    text.write_text(story())
    return {"root": root, "model": model, "text": str(text)}


def config(tiny, **kw):
    from megatron_tw.eval.fidelity import FidelityConfig

    return FidelityConfig(**{"model": tiny["model"], "text": tiny["text"], "window": W,
                             "seq_length": T, "sequences": 2, "positions": 12, "stride": S, **kw})


@pytest.fixture(scope="module")
def rows(tiny):
    from megatron_tw.eval.fidelity import make_sequences, read_documents
    from megatron_tw.eval.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny["model"])
    assert tokenizer.bos_id == BOS
    return make_sequences(read_documents(tiny["text"]), tokenizer, config(tiny), BOS)


@pytest.fixture(scope="module")
def model(tiny):
    from megatron_tw.eval.fidelity import load_hf_model

    return load_hf_model(tiny["model"])


def float64_reference(tiny):
    from safetensors.torch import load_file

    from tests.e2e.test_score_data import llama_nll

    weights = load_file(f"{tiny['model']}/model.safetensors")
    cfg = json.loads(open(f"{tiny['model']}/config.json").read())
    return lambda tokens, labels, allowed: llama_nll(weights, cfg, tokens, labels, allowed)


def test_sequences_start_with_bos_and_follow_the_text(rows, tiny):
    from megatron_tw.eval.tokenizer import load_tokenizer

    ids = load_tokenizer(tiny["model"]).encode(story())
    assert rows.shape == (2, T) and (rows[:, 0] == BOS).all()
    assert rows[0, 1:].tolist() == ids[:T - 1] and rows[1, 1:].tolist() == ids[T - 1:2 * T - 2]


def test_exact_is_the_model_on_the_literal_token_list(tiny, rows, model):
    from transformers import AutoModelForCausalLM

    from megatron_tw.eval.fidelity import exact_losses, sample_positions

    positions = sample_positions(config(tiny))[0]
    assert all(W <= p <= T - 2 for p in positions) and len(set(positions)) == 12
    got = exact_losses(model, rows[0], positions, W, BOS, batch_size=5)
    plain = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32).eval()
    tokens = rows[0].tolist()
    for p, loss in zip(positions, got.tolist()):
        target = p + 1  # position p predicts token p + 1
        context = [BOS] + tokens[target - (W - 1):target]
        assert len(context) == W
        with torch.no_grad():
            logits = plain(torch.tensor([context])).logits[0, -1]
        want = -torch.log_softmax(logits.double(), -1)[tokens[target]].item()
        assert loss == pytest.approx(want, abs=1e-4)


def test_sliding_and_windows_equal_float64_formulas(tiny, rows, model):
    from megatron_tw.eval.fidelity import full_pass_losses, visible_sliding, windows_losses

    nll = float64_reference(tiny)
    row = rows[1]
    tokens, labels = row[:-1], row[1:]
    n = T - 1
    for sink in (False, True):
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for q in range(n):
            for k in range(n):  # the W - 1 tokens before the target (p - W + 2 .. p), key 0
                allowed[q, k] = q - (W - 2) <= k <= q or (sink and k == 0)
        got = full_pass_losses(model, row, visible_sliding(n, W, sink))
        assert torch.allclose(got.double(), nll(tokens, labels, allowed), atol=1e-4)
    sink = full_pass_losses(model, row, visible_sliding(n, W, True))
    plain = full_pass_losses(model, row, visible_sliding(n, W, False))
    assert (sink - plain)[W:].abs().max() > 1e-3  # the sink matters to this model

    got = windows_losses(model, row, W, S, BOS, batch_size=3)
    for p in range(n):
        k = 0 if p < W - 1 else (p - (W - 1)) // S + 1  # the window that supplies p
        ids = [BOS] + row[k * S + 1:p + 1].tolist()
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        want = nll(torch.tensor(ids), row[k * S + 1:p + 2], causal)[-1]
        assert got[p].item() == pytest.approx(want.item(), abs=1e-4), p


def test_project_scorer_equals_hf_variants(tiny, rows, model):
    from megatron_tw.eval.fidelity import (
        full_pass_losses,
        project_losses,
        visible_sliding,
        windows_losses,
    )

    project = project_losses(config(tiny), rows, tiny["model"], tiny["model"], 128, BOS,
                             log=lambda _: None)
    for i, row in enumerate(rows):
        sink = full_pass_losses(model, row, visible_sliding(T - 1, W, True))
        assert (project["sliding"][i] - sink).abs().max() < 1e-4
        assert (project["windows"][i] - windows_losses(model, row, W, S, BOS)).abs().max() < 1e-4
        plain = full_pass_losses(model, row, visible_sliding(T - 1, W, False))
        assert (project["sliding"][i] - plain).abs().max() > 1e-3


def test_tool_table_json_and_megatron_checkpoint(tiny, tmp_path, capsys):
    from megatron_tw.checkpoint.convert import hf_to_megatron
    from megatron_tw.eval.fidelity import VARIANTS, measure
    from tools.score_fidelity import main

    out = tmp_path / "fidelity.json"
    argv = ["--model", tiny["model"], "--text", tiny["text"], "--window", str(W), "--seq-length",
            str(T), "--sequences", "2", "--positions", "12", "--stride", str(S), "--quiet",
            "--output", str(out), "--token-losses", str(tmp_path / "tokens.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| variant | mean L_short | std d | Spearman")
    for name in VARIANTS:
        assert f"\n| {name} |" in printed
    assert "mean L_long" in printed and "long-range repeats (sliding+sink)" in printed
    data = json.loads(out.read_text())
    table = {r["variant"]: r for r in data["rows"]}
    assert table["exact"]["spearman_vs_exact"] == 1 and table["exact"]["top_overlap_vs_exact"] == 1
    assert len(data["losses"]["exact"]) == 24 and data["lead_token"] == BOS
    assert data["command"][0] == "tools/score_fidelity.py"
    tokens = json.loads((tmp_path / "tokens.json").read_text())
    assert len(tokens) == T - 1 and set(tokens[0]) == {"token", "long", "short"}

    # a megatron checkpoint: HF variants on its HF export, the project scorer loads it directly
    meg = tmp_path / "meg"
    hf_to_megatron(tiny["model"], str(meg))
    result = measure(config(tiny, model=str(meg), tokenizer=tiny["model"], project_scorer=True),
                     log=lambda _: None)
    rows = {r["variant"]: r for r in result.rows}
    for name in VARIANTS:
        assert rows[name]["mean_short"] == pytest.approx(table[name]["mean_short"], abs=1e-5)
    assert rows["project sliding"]["matches"] == "sliding+sink"
    assert rows["project sliding"]["max_abs_vs_hf"] < 1e-4
    assert rows["project windows"]["max_abs_vs_hf"] < 1e-4


def test_rank_helpers():
    from megatron_tw.eval.fidelity import rankdata, spearman, top_overlap

    assert rankdata([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # scipy's value
    assert top_overlap([5, 4, 0, 0, 0, 0, 0, 0], [5, 0, 4, 0, 0, 0, 0, 0]) == 0.5


def test_long_range_repeats():
    from megatron_tw.eval.fidelity import long_range_repeats

    texts = ["", "Anne", " was", " out", ".", " Then", " An", "ne,", " out", " went"]
    # W = 4: target t sees tokens t - 3 .. t - 1
    flags = long_range_repeats(texts, 4)
    # " An"/"ne," (tokens 6, 7): "anne" last seen at token 1, outside t - 3.. for both
    assert flags[6] and flags[7]
    # " out" (8): seen at token 3 and 4 ("out."), 8 - 3 = 5 > 4: far only -> repeat
    assert flags[8]
    assert not any(flags[i] for i in (0, 1, 2, 3, 4, 5, 9))
    assert long_range_repeats(texts, 8)[8] is False  # "out." within t - 7 .. t - 1: near


@pytest.mark.parametrize("extra, flag", [
    (["--window", "1"], "--window 1"),
    (["--stride", "5"], "--stride 5"),
    (["--positions", "60"], "--positions 60"),
    (["--sequences", "999"], "--sequences 999"),
    (["--lead-token", "500"], "--lead-token 500"),
    (["--text", "/nowhere.txt"], "--text /nowhere.txt"),
    (["--model", "/nowhere"], "--model /nowhere"),
    (["--window", "x"], "--window 'x'"),
    (["--output", "/nowhere/out.json"], "--output /nowhere/out.json"),
])
def test_bad_flags_give_one_line_errors(tiny, capsys, extra, flag):
    from tools.score_fidelity import main

    argv = ["--model", tiny["model"], "--text", tiny["text"], "--window", str(W), "--seq-length",
            str(T), "--stride", str(S), "--positions", "12", "--sequences", "2", "--quiet", *extra]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("score_fidelity.py: error: ") and flag in err, err


def test_tokenizer_without_bos_needs_lead_token(tiny, tmp_path, capsys):
    import shutil

    from tools.score_fidelity import main

    folder = tmp_path / "nobos"
    shutil.copytree(tiny["model"], folder)
    char_tokenizer(folder, bos=None)
    argv = ["--model", str(folder), "--text", tiny["text"], "--window", str(W), "--seq-length",
            str(T), "--stride", str(S), "--sequences", "1", "--positions", "4", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lead-token" in err, err
    assert main([*argv, "--lead-token", "1"]) == 0


def test_project_scorer_needs_the_models_tokenizer(tiny, tmp_path, capsys):
    from tools.score_fidelity import main

    other = tmp_path / "other"
    char_tokenizer(other, reverse=True)  # same size, other ids
    argv = ["--model", tiny["model"], "--text", tiny["text"], "--window", str(W), "--seq-length",
            str(T), "--stride", str(S), "--sequences", "1", "--positions", "4", "--quiet",
            "--project-scorer", "--tokenizer", str(other)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("score_fidelity.py: error: --tokenizer")
