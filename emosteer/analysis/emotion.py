"""Emotion wheel, word lexicon, and the narrative metrics of the VEENA method.

A generated narrative is scored by the emotion words it contains: each word maps through
a lexicon onto Mikels' eight-category wheel, and the *hit rate* is the share of that
emotion mass that falls in the target category (docs/DESIGN.md §1.3). The same scan gives the
emotional-hallucination rate on neutral inputs and a valence score.

Lexicon. Two sources, merged (see emosteer/data/lexicon/README.md):

* ``core`` -- emosteer's own list of explicit emotion terms (emosteer/data/lexicon/
  core.tsv), each tied to one Mikels category, to the coarse label ``joy`` (positive,
  sub-category not determined: "happy", "smile"), or to ``neutral`` (a non-emotional
  state such as "calm" or "focused", never counted). Core entries override NRC.
* ``nrc`` -- the NRC Word-Emotion Association Lexicon (EmoLex, Mohammad & Turney 2013),
  read from the data file that the ``nrclex`` package ships. Free for research use;
  commercial use needs a licence from the National Research Council Canada. NRC's
  Plutchik emotions map as: joy -> ``joy`` (spread over the four positive categories),
  sadness/anger/fear/disgust -> the Mikels category of the same name. NRC's trust,
  anticipation and surprise, and its positive/negative polarity, are dropped: they tag
  thousands of non-emotional words ("abacus" -> trust, "money" -> surprise) and have no
  unambiguous place on the wheel; surprise words that are emotion terms ("surprised",
  "astonished") are in the core list, under awe.

Scoring. Every emotion-word occurrence carries a mass of 1, split evenly over its labels
(an NRC word tied to joy and sadness gives 1/2 to each), and a coarse ``joy`` share is
split evenly over amusement/awe/contentment/excitement. A word with a negator up to three
tokens before it in the same clause ("not happy", "no sign of fear", "without a smile",
"not angry or afraid") is not counted: the negated statement asserts no emotion, and
flipping it to an opposite category is unreliable. Clauses end at punctuation and at
"and", "but", "although" ...
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

__all__ = [
    "MIKELS", "POSITIVE", "NEGATIVE", "VALENCE", "BASIC_TO_MIKELS", "NRC_TO_LABEL",
    "Lexicon", "load_lexicon", "candidate_lemmas", "normalize_category", "target_set",
    "emotion_words", "emotion_spans", "category_counts", "hit_rate", "carries", "asserts_emotion",
    "emotion_word_count",
    "hallucination_rate", "valence",
]

# Mikels et al. (2005) eight categories; positive first, then negative.
MIKELS: tuple[str, ...] = (
    "amusement", "awe", "contentment", "excitement",
    "anger", "disgust", "fear", "sadness",
)
POSITIVE: tuple[str, ...] = MIKELS[:4]
NEGATIVE: tuple[str, ...] = MIKELS[4:]
VALENCE: dict[str, int] = {**{c: 1 for c in POSITIVE}, **{c: -1 for c in NEGATIVE}}

# Basic emotion names (Ekman + neutral) onto the wheel. Surprise goes to awe, Mikels'
# category for amazement and wonder; neutral has no category on the wheel.
BASIC_TO_MIKELS: dict[str, tuple[str, ...]] = {
    "joy": POSITIVE,
    "happiness": POSITIVE,
    "happy": POSITIVE,
    "positive": POSITIVE,
    "negative": NEGATIVE,
    "sadness": ("sadness",),
    "sad": ("sadness",),
    "anger": ("anger",),
    "angry": ("anger",),
    "fear": ("fear",),
    "disgust": ("disgust",),
    "surprise": ("awe",),
    "neutral": (),
}

# NRC EmoLex Plutchik emotion -> lexicon label (None: not used, see module docstring).
NRC_TO_LABEL: dict[str, str | None] = {
    "joy": "joy", "sadness": "sadness", "anger": "anger", "fear": "fear",
    "disgust": "disgust", "trust": None, "anticipation": None, "surprise": None,
    "positive": None, "negative": None,
}

# Lexicon labels -> the Mikels categories their mass is spread over.
_LABEL_TO_MIKELS: dict[str, tuple[str, ...]] = {**{c: (c,) for c in MIKELS}, "joy": POSITIVE}
_NEUTRAL = "neutral"

LEXICON_DIR = Path(__file__).resolve().parent.parent / "data" / "lexicon"

_TOKEN = re.compile(r"[a-z]+(?:['\u2019][a-z]+)*|[.,;:!?()\"]")
_CLAUSE_BREAK = frozenset({".", ",", ";", ":", "!", "?", "(", ")", '"', "and",
                           "but", "although", "though", "yet", "however", "whereas"})
_LIST_JOINERS = frozenset({"or", "nor"})
_NEGATORS = frozenset({"not", "no", "never", "nor", "neither", "without", "hardly",
                       "barely", "scarcely", "cannot", "nothing", "none", "nobody",
                       "lack", "lacks", "lacking", "devoid", "absent"})
# Tokens looked back from an emotion word for a negator; the clause ends the search.
NEGATION_WINDOW = 3


def normalize_category(name: str) -> str:
    """Lower-case, validated category name: a Mikels category or a basic emotion name."""
    key = name.strip().lower()
    if key in VALENCE or key in BASIC_TO_MIKELS:
        return key
    raise ValueError(f"unknown emotion category {name!r}; expected one of "
                     f"{', '.join(MIKELS)} or {', '.join(BASIC_TO_MIKELS)}")


def target_set(target: str) -> frozenset[str]:
    """The Mikels categories a target name stands for (``"joy"`` -> the 4 positives)."""
    key = normalize_category(target)
    return frozenset(BASIC_TO_MIKELS.get(key, (key,)))


# ---------------------------------------------------------------------------- lemmas

_VOWELS = frozenset("aeiou")
# (suffix, replacement), tried in order; one rule may feed another (cheerfully ->
# cheerful -> cheer), up to two steps.
_SUFFIX_RULES: tuple[tuple[str, str], ...] = (
    ("iness", "y"), ("ness", ""), ("iful", "y"), ("ful", ""),
    ("ily", "y"), ("ly", ""), ("bly", "ble"),
    ("ies", "y"), ("es", ""), ("s", ""),
    ("ied", "y"), ("ed", "e"), ("ed", ""),
    ("ing", "e"), ("ing", ""),
    ("ier", "y"), ("iest", "y"), ("er", ""), ("er", "e"), ("est", ""), ("est", "e"),
)
_MIN_STEM = 3


def _undouble(stem: str) -> str | None:
    """sobb -> sob, grinn -> grin: the consonant doubled before -ed/-ing/-er."""
    if len(stem) >= 4 and stem[-1] == stem[-2] and stem[-1] not in _VOWELS | {"l", "s"}:
        return stem[:-1]
    return None


def candidate_lemmas(word: str, depth: int = 2) -> Iterator[str]:
    """The word itself, then the stems a rule-based English lemmatizer proposes.

    Handles -s/-es/-ies, -ed/-ied, -ing, -er/-est/-ier/-iest, -ly/-ily, -ness/-iness,
    -ful/-iful, doubled consonants and y -> i. The caller keeps the first candidate found
    in its lexicon, so over-generation is harmless; stems shorter than 3 letters are not
    proposed.
    """
    seen = {word}
    yield word
    frontier = [word]
    for _ in range(depth):
        nxt = []
        for w in frontier:
            for suffix, repl in _SUFFIX_RULES:
                if not w.endswith(suffix) or (suffix == "s" and w.endswith("ss")):
                    continue
                stem = w[: len(w) - len(suffix)]
                if len(stem) < _MIN_STEM:
                    continue
                forms = [stem + repl]
                if repl == "" and suffix in ("ed", "ing", "er", "est"):
                    undoubled = _undouble(stem)
                    if undoubled:
                        forms.insert(0, undoubled)
                for form in forms:
                    if form not in seen:
                        seen.add(form)
                        nxt.append(form)
                        yield form
        frontier = nxt


# ---------------------------------------------------------------------------- lexicon

class Lexicon:
    """Lemma -> labels tables, searched in priority order, with inflection-aware, cached
    lookup: the first table holding any lemma candidate of a word decides its labels, so
    a curated core entry ("laugh" -> amusement) wins over an NRC entry for an inflected
    form ("laughing" -> joy)."""

    def __init__(self, tiers: Sequence[Mapping[str, tuple[str, ...]]], sources: Sequence[str]):
        for table in tiers:
            for word, labels in table.items():
                bad = [lab for lab in labels if lab not in _LABEL_TO_MIKELS and lab != _NEUTRAL]
                if bad:
                    raise ValueError(f"lexicon entry {word!r} has unknown labels {bad}")
        self.tiers: tuple[dict[str, tuple[str, ...]], ...] = tuple(dict(t) for t in tiers)
        self.sources: tuple[str, ...] = tuple(sources)
        self._cache: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(set().union(*self.tiers)) if self.tiers else 0

    def __contains__(self, word: str) -> bool:
        return bool(self.lookup(word))

    def lookup(self, word: str) -> tuple[str, ...]:
        """Labels of ``word`` (lower-case), () if it is not an emotion word."""
        hit = self._cache.get(word)
        if hit is None:
            hit = self._resolve(word)
            self._cache[word] = hit
        return hit

    def _resolve(self, word: str) -> tuple[str, ...]:
        lemmas = list(candidate_lemmas(word))
        for table in self.tiers:
            for lemma in lemmas:
                labels = table.get(lemma)
                if labels is not None:
                    return () if labels == (_NEUTRAL,) else labels
        return ()


def _read_core(path: Path) -> dict[str, tuple[str, ...]]:
    entries: dict[str, tuple[str, ...]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'word<TAB>category', got {line!r}")
        word, label = parts[0].strip().lower(), parts[1].strip().lower()
        if label not in _LABEL_TO_MIKELS and label != _NEUTRAL:
            raise ValueError(f"{path}:{lineno}: unknown category {label!r}")
        entries[word] = (label,)
    return entries


def _nrc_default_path() -> Path:
    try:
        from importlib import resources
        return Path(str(resources.files("nrclex.data").joinpath("nrc_en.json")))
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the NRC Emotion Lexicon is read from the 'nrclex' package: pip install nrclex "
            "(or pass nrc_path=, or load_lexicon(sources=('core',)))") from exc


def _read_nrc(path: Path) -> dict[str, tuple[str, ...]]:
    """NRC EmoLex as nrclex's JSON ({word: [emotions]}) or NRC's own word-level file
    (``word<TAB>emotion<TAB>0|1``, e.g. NRC-Emotion-Lexicon-Wordlevel-v0.92.txt)."""
    text = path.read_text(encoding="utf-8")
    raw: dict[str, list[str]] = {}
    if path.suffix == ".json":
        raw = json.loads(text)
    else:
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[2].strip() == "1":
                raw.setdefault(parts[0].strip().lower(), []).append(parts[1].strip())
    entries = {}
    for word, emotions in raw.items():
        labels = sorted({NRC_TO_LABEL.get(e) for e in emotions} - {None})
        if labels:
            entries[word.lower()] = tuple(labels)
    return entries


def _read_stoplist(path: Path) -> set[str]:
    words = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            words.add(line)
    return words


def load_lexicon(sources: Sequence[str] = ("core", "nrc"),
                 nrc_path: str | os.PathLike | None = None) -> Lexicon:
    """The lexicon of the named sources, built once per argument set and cached; the core
    list has priority over NRC. NRC words in data/lexicon/nrc_stoplist.txt (scene nouns
    that NRC ties to an emotion, e.g. "child" -> joy) are left out. Without the nrclex
    package and without ``nrc_path``, the "nrc" source raises ModuleNotFoundError."""
    return _load_lexicon(tuple(sources), str(nrc_path) if nrc_path is not None else None)


@functools.lru_cache(maxsize=8)
def _load_lexicon(sources: tuple[str, ...], nrc_path: str | None) -> Lexicon:
    unknown = set(sources) - {"core", "nrc"}
    if unknown:
        raise ValueError(f"unknown lexicon sources {sorted(unknown)}; use 'core', 'nrc'")
    tiers = []
    if "core" in sources:
        tiers.append(_read_core(LEXICON_DIR / "core.tsv"))
    if "nrc" in sources:
        nrc = _read_nrc(Path(nrc_path) if nrc_path else _nrc_default_path())
        for word in _read_stoplist(LEXICON_DIR / "nrc_stoplist.txt"):
            nrc.pop(word, None)
        tiers.append(nrc)
    return Lexicon(tiers, sources)


# ---------------------------------------------------------------------------- scanning

@dataclass(frozen=True)
class _Hit:
    word: str
    labels: tuple[str, ...]
    span: tuple[int, int]  # character offsets of the word in the scanned text


def _token_spans(text: str) -> list[tuple[str, tuple[int, int]]]:
    """Lower-cased tokens of ``text`` with their character offsets in it."""
    norm = text.lower()
    if len(norm) != len(text):  # a character whose lower case is longer ("İ"): keep it as is
        norm = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    return [(m.group(), m.span()) for m in _TOKEN.finditer(norm.replace("\u2019", "'"))]


def _is_negator(token: str) -> bool:
    return token in _NEGATORS or token.endswith("n't")


def _scan(text: str, lexicon: Lexicon | None) -> list[_Hit]:
    lex = lexicon if lexicon is not None else load_lexicon()
    spans = _token_spans(text)
    tokens = [t for t, _ in spans]
    hits = []
    for i, tok in enumerate(tokens):
        if tok in _CLAUSE_BREAK or _is_negator(tok):
            continue
        labels = lex.lookup(tok)
        if not labels:
            continue
        if not _negated(tokens, i, lex):
            hits.append(_Hit(tok, labels, spans[i][1]))
    return hits


def _negated(tokens: list[str], i: int, lex: Lexicon) -> bool:
    """A negator among the NEGATION_WINDOW tokens before tokens[i], in the same clause;
    "or"/"nor" and other emotion words do not use up the window, so a negation covers a
    list ("does not look angry or afraid")."""
    steps, j = 0, i - 1
    while j >= 0 and steps < NEGATION_WINDOW:
        prev = tokens[j]
        if prev in _CLAUSE_BREAK:
            return False
        if _is_negator(prev):
            return True
        if prev not in _LIST_JOINERS and not lex.lookup(prev):
            steps += 1
        j -= 1
    return False


def _mikels_mass(hits: Iterable[_Hit]) -> dict[str, float]:
    mass = dict.fromkeys(MIKELS, 0.0)
    for hit in hits:
        share = 1.0 / len(hit.labels)
        for label in hit.labels:
            cats = _LABEL_TO_MIKELS[label]
            for cat in cats:
                mass[cat] += share / len(cats)
    return mass


def emotion_words(text: str, lexicon: Lexicon | None = None) -> list[tuple[str, str]]:
    """``(word, label)`` for each non-negated emotion word, in text order. A label is a
    Mikels category or ``joy`` (positive, unspecific); a word the lexicon ties to two
    labels appears once per label."""
    return [(hit.word, label) for hit in _scan(text, lexicon) for label in hit.labels]


def emotion_spans(text: str, lexicon: Lexicon | None = None) -> list[tuple[int, int, str, tuple[str, ...]]]:
    """``(start, end, word, labels)`` of each non-negated emotion word, in text order:
    the words :func:`hit_rate` counts, located in ``text`` (``text[start:end]``)."""
    return [(*hit.span, hit.word, hit.labels) for hit in _scan(text, lexicon)]


def category_counts(text: str, lexicon: Lexicon | None = None) -> dict[str, float]:
    """Emotion mass per Mikels category (all 8 keys); sums to the number of emotion
    words. Fractional where a word is spread over several categories."""
    return _mikels_mass(_scan(text, lexicon))


def hit_rate(text: str, target: str, lexicon: Lexicon | None = None) -> float | None:
    """Share of the text's emotion mass in ``target`` (a Mikels category or a basic
    emotion name); None when the text has no emotion words."""
    cats = target_set(target)
    hits = _scan(text, lexicon)
    if not hits:
        return None
    mass = _mikels_mass(hits)
    return sum(mass[c] for c in cats) / len(hits)


def carries(hit: float | None) -> float:
    """1.0 when a narrative carries the target emotion, given its ``hit_rate`` (at least
    half of its emotion words are of that emotion), else 0.0 (also without emotion words)."""
    return 1.0 if hit is not None and hit >= 0.5 else 0.0


def emotion_word_count(text: str, lexicon: Lexicon | None = None) -> int:
    """How many non-negated emotion words the text has (a word tied to two labels once)."""
    return len(_scan(text, lexicon))


def asserts_emotion(text: str, lexicon: Lexicon | None = None, min_words: int = 1) -> bool:
    """True when the text has at least ``min_words`` non-negated emotion words."""
    return emotion_word_count(text, lexicon) >= min_words


def hallucination_rate(texts: Sequence[str], lexicon: Lexicon | None = None,
                       min_words: int = 1) -> float:
    """Emotional-hallucination rate of narratives generated for NEUTRAL inputs: the
    fraction of texts that assert an emotion, i.e. contain at least ``min_words``
    non-negated emotion words of any category (neutral-state words such as "calm" or
    "focused" do not count). An empty sequence raises ValueError."""
    if isinstance(texts, str):
        raise TypeError("hallucination_rate takes a sequence of texts, not one string")
    if len(texts) == 0:
        raise ValueError("hallucination_rate of no texts is undefined")
    return sum(asserts_emotion(t, lexicon, min_words) for t in texts) / len(texts)


def valence(text: str, lexicon: Lexicon | None = None) -> float:
    """(positive mass - negative mass) / emotion mass, in [-1, 1]; 0.0 without emotion
    words."""
    hits = _scan(text, lexicon)
    if not hits:
        return 0.0
    mass = _mikels_mass(hits)
    return sum(VALENCE[c] * m for c, m in mass.items()) / len(hits)
