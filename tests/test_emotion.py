"""Emotion wheel, lexicon lookups, negation, and the narrative metrics (hand-computed)."""
import pytest

from emosteer.analysis import emotion
from emosteer.analysis.emotion import (MIKELS, category_counts, emotion_words, hallucination_rate,
                              hit_rate, load_lexicon, target_set, valence)

CORE = load_lexicon(("core",))


def _nrc_lexicon():
    pytest.importorskip("nrclex")
    return load_lexicon()


def test_wheel():
    assert len(MIKELS) == 8 and len(set(MIKELS)) == 8
    assert sum(emotion.VALENCE.values()) == 0
    assert target_set("joy") == {"amusement", "awe", "contentment", "excitement"}
    assert target_set("Happiness") == target_set("joy")
    assert target_set("sadness") == {"sadness"}
    assert target_set("surprise") == {"awe"}
    assert target_set("neutral") == set()
    assert target_set("fear") == {"fear"}
    with pytest.raises(ValueError, match="unknown emotion category 'gloomy'"):
        target_set("gloomy")


@pytest.mark.parametrize("word, labels", [
    ("happy", ("joy",)), ("sad", ("sadness",)), ("furious", ("anger",)),
    ("amused", ("amusement",)), ("awestruck", ("awe",)), ("relieved", ("contentment",)),
    ("thrilled", ("excitement",)), ("disgusted", ("disgust",)), ("terrified", ("fear",)),
    ("window", ()), ("street", ()), ("calm", ()), ("neutral", ()),
])
def test_lookup_lemmas(word, labels):
    assert CORE.lookup(word) == labels


@pytest.mark.parametrize("word, labels", [
    ("sobbing", ("sadness",)), ("sobbed", ("sadness",)), ("sobs", ("sadness",)),
    ("happier", ("joy",)), ("happiest", ("joy",)), ("happily", ("joy",)),
    ("happiness", ("joy",)), ("cheerfully", ("joy",)), ("smiles", ("joy",)),
    ("grinning", ("joy",)), ("laughs", ("amusement",)), ("laughing", ("amusement",)),
    ("worries", ("fear",)), ("frightening", ("fear",)), ("fearfully", ("fear",)),
    ("tears", ("sadness",)), ("saddened", ("sadness",)), ("sadder", ("sadness",)),
    ("angrily", ("anger",)), ("scowled", ("anger",)), ("calmly", ()),
])
def test_lookup_inflections(word, labels):
    assert CORE.lookup(word) == labels


def test_candidate_lemmas():
    cands = list(emotion.candidate_lemmas("sobbing"))
    assert cands[0] == "sobbing" and "sob" in cands
    assert "happy" in emotion.candidate_lemmas("happiness")
    assert "terrify" in emotion.candidate_lemmas("terrified")
    assert all(len(c) >= 3 for c in emotion.candidate_lemmas("sings"))


def test_nrc_source_and_priority():
    lex = _nrc_lexicon()
    assert len(lex) > 3000
    assert lex.lookup("merriment") == ("joy",)                       # NRC only
    assert lex.lookup("abhorrent") == ("anger", "disgust", "fear")   # NRC, trust dropped
    assert lex.lookup("laughing") == ("amusement",)   # core lemma beats NRC exact form
    assert lex.lookup("fear") == ("fear",)            # NRC: anger+fear; core decides
    assert lex.lookup("child") == ()                  # stoplisted topic word
    assert lex.lookup("neutral") == ()                # NRC: anticipation+trust; core neutral


def test_nrc_wordlevel_file(tmp_path):
    path = tmp_path / "NRC-Emotion-Lexicon-Wordlevel-v0.92.txt"
    path.write_text("gleam\tjoy\t1\ngleam\tfear\t0\ngloat\tanger\t1\ngloat\tjoy\t1\n"
                    "gloat\ttrust\t1\nabacus\ttrust\t1\n")
    lex = load_lexicon(("nrc",), nrc_path=str(path))
    assert lex.lookup("gleam") == ("joy",)
    assert lex.lookup("gloating") == ("anger", "joy")
    assert lex.lookup("abacus") == ()


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown lexicon sources"):
        load_lexicon(("core", "liwc"))


@pytest.mark.parametrize("text", [
    "She is not happy.", "He isn't sad.", "They were never afraid.",
    "She stands there without a smile.", "There is no sign of fear on his face.",
    "He is not at all angry.", "She is not really very happy.", "He does not look angry or afraid.",
    "She felt neither sad nor lonely.",
    "He doesn\u2019t seem upset.",
])
def test_negation_suppresses(text):
    assert emotion_words(text, CORE) == []
    assert hit_rate(text, "joy", CORE) is None


@pytest.mark.parametrize("text, expected", [
    ("She is not sad but happy.", [("happy", "joy")]),
    ("Not because of the rain, she is happy.", [("happy", "joy")]),
    ("He did not sleep; he was terrified.", [("terrified", "fear")]),
    ("She is not there, and he is furious.", [("furious", "anger")]),
    ("No one noticed that she was crying quietly.", [("crying", "sadness")]),
    ("She is not happy and very angry.", [("angry", "anger")]),
    ("He does not look up at all; he is scared.", [("scared", "fear")]),
    ("She does not look really very happy.", [("happy", "joy")]),  # beyond the window
])
def test_negation_window_ends(text, expected):
    assert emotion_words(text, CORE) == expected


def test_hit_rate_mixed_positive():
    # smiling -> joy (1/4 to each positive), laughing -> amusement, delighted -> joy
    text = "She is smiling and laughing, clearly delighted."
    assert emotion_words(text, CORE) == [("smiling", "joy"), ("laughing", "amusement"),
                                         ("delighted", "joy")]
    assert hit_rate(text, "amusement", CORE) == pytest.approx(1.5 / 3)
    assert hit_rate(text, "awe", CORE) == pytest.approx(0.5 / 3)
    assert hit_rate(text, "joy", CORE) == pytest.approx(1.0)
    assert hit_rate(text, "sadness", CORE) == 0.0
    counts = category_counts(text, CORE)
    assert set(counts) == set(MIKELS)
    assert counts["amusement"] == pytest.approx(1.5)
    assert counts["excitement"] == pytest.approx(0.5)
    assert sum(counts.values()) == pytest.approx(3.0)
    assert valence(text, CORE) == pytest.approx(1.0)


def test_hit_rate_negative_narrative():
    text = ("He looks sad and a little afraid, with tears in his eyes. "
            "He is not angry.")
    assert emotion_words(text, CORE) == [("sad", "sadness"), ("afraid", "fear"),
                                         ("tears", "sadness")]
    assert hit_rate(text, "sadness", CORE) == pytest.approx(2 / 3)
    assert hit_rate(text, "fear", CORE) == pytest.approx(1 / 3)
    assert hit_rate(text, "anger", CORE) == 0.0
    assert hit_rate(text, "joy", CORE) == 0.0
    assert valence(text, CORE) == pytest.approx(-1.0)


def test_hit_rate_mixed_valence():
    text = "The boy is excited but also a bit scared; he is not disgusted."
    assert hit_rate(text, "excitement", CORE) == pytest.approx(0.5)
    assert hit_rate(text, "fear", CORE) == pytest.approx(0.5)
    assert hit_rate(text, "disgust", CORE) == 0.0
    assert valence(text, CORE) == pytest.approx(0.0)


def test_multi_label_word_splits_mass():
    lex = _nrc_lexicon()
    # abhorrent -> anger, disgust, fear (1/3 each); furious -> anger
    text = "It was abhorrent, and she was furious."
    assert hit_rate(text, "anger", lex) == pytest.approx((1 / 3 + 1) / 2)
    assert hit_rate(text, "disgust", lex) == pytest.approx((1 / 3) / 2)
    assert valence(text, lex) == pytest.approx(-1.0)


def test_no_emotion_words():
    text = "A woman stands at the window, looking at the street. She seems calm."
    assert emotion_words(text, CORE) == []
    assert hit_rate(text, "sadness", CORE) is None
    assert valence(text, CORE) == 0.0
    assert sum(category_counts(text, CORE).values()) == 0.0


def test_hallucination_rate():
    texts = [
        "A man reads a newspaper on a bench.",           # no emotion
        "She seems happy to be outside.",               # asserts joy
        "He does not look angry or afraid.",            # negated: no emotion
        "The woman appears calm and focused.",          # neutral-state words only
        "The boy looks bored, maybe a little anxious.",  # anxious -> fear
    ]
    assert hallucination_rate(texts, CORE) == pytest.approx(2 / 5)
    assert hallucination_rate(texts, CORE, min_words=2) == 0.0
    with pytest.raises(TypeError):
        hallucination_rate("She is happy.", CORE)
    with pytest.raises(ValueError):
        hallucination_rate([], CORE)


def test_valence_sign():
    assert valence("What a joyful, amazing day, she is thrilled.", CORE) > 0
    assert valence("He is grieving and miserable.", CORE) < 0
    assert valence("happy sad sad", CORE) == pytest.approx(-1 / 3)


def test_lexicon_cached_and_fast():
    import time
    lex = _nrc_lexicon()
    assert load_lexicon() is lex and load_lexicon(["core", "nrc"]) is lex
    text = "She is smiling and laughing, clearly delighted, not sad at all. " * 50
    start = time.perf_counter()
    for _ in range(200):
        hit_rate(text, "joy")
    assert time.perf_counter() - start < 5.0  # ~0.3 s here; generous for shared CI
