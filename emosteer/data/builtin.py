"""The built-in text counterfactual set: joy, sadness, anger and fear, 120 pairs each,
plus 48 held-out neutral prompts for evaluating steered generation, and 96 held-out
neutral scenes asked in six prompt templates (``load_templated``: descriptions, stories,
diary entries, letters, dialogue), for selection that must hold on templates it was not
chosen on (``DEV_TEMPLATES`` / ``TEST_TEMPLATES``).

Each pair is one scene sentence, ``"<Subject> <setting>, <clause>."``, where the
emotional version ends in an emotional cue and the neutral version in an ordinary action
that fits the setting; subject and setting are shared word for word. The shipped files
under builtin/ are the output of :func:`write_builtin` (deterministic; a test checks the
files match). Held-out prompts use settings that never occur in the pair set.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from emosteer.data.format import Pair, Prompt, Stimulus, read_pairs, read_prompts, \
    write_pairs, write_prompts

__all__ = ["BUILTIN_DIR", "BUILTIN_EMOTIONS", "DEFAULT_QUERY", "TEMPLATES", "TEMPLATED_PER_TEMPLATE", "DEV_TEMPLATES",
           "TEST_TEMPLATES", "generate_pairs", "generate_heldout", "generate_templated",
           "write_builtin", "load_builtin", "load_heldout", "load_templated"]

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
BUILTIN_EMOTIONS = ("joy", "sadness", "anger", "fear")
DEFAULT_QUERY = "Describe how the person in this scene feels."
PAIRS_PER_EMOTION = 120
HELDOUT_SIZE = 48
TEMPLATED_PER_TEMPLATE = 16

# The queries a scene is asked in the templated held-out set. A choice made on the DEV
# templates is reported on the TEST templates, whose wording it never saw: descriptions,
# narratives and first-person writing fall on both sides.
TEMPLATES = {
    "feels": DEFAULT_QUERY,
    "story": "Write a short story about this scene.",
    "diary": "Write the diary entry this person writes tonight.",
    "letter": "Write a short letter in which this person tells a friend about today.",
    "dialogue": "Write a short dialogue between this person and someone nearby.",
    "describe": "Describe what is happening in this scene.",
}
DEV_TEMPLATES = ("feels", "story", "diary")
TEST_TEMPLATES = ("letter", "dialogue", "describe")

# (id, noun phrase, subject pronoun, possessive, reflexive)
SUBJECTS = (
    ("woman", "A woman", "she", "her", "herself"),
    ("man", "A man", "he", "his", "himself"),
    ("old_man", "An old man", "he", "his", "himself"),
    ("elderly_woman", "An elderly woman", "she", "her", "herself"),
    ("boy", "A young boy", "he", "his", "himself"),
    ("girl", "A little girl", "she", "her", "herself"),
    ("teen_girl", "A teenage girl", "she", "her", "herself"),
    ("teen_boy", "A teenage boy", "he", "his", "himself"),
    ("nurse", "A nurse in blue scrubs", "she", "her", "herself"),
    ("grey_coat", "A man in a grey coat", "he", "his", "himself"),
    ("student", "A student with a backpack", "she", "her", "herself"),
    ("bus_driver", "A bus driver", "he", "his", "himself"),
    ("grandmother", "A grandmother", "she", "her", "herself"),
    ("businessman", "A businessman in a suit", "he", "his", "himself"),
    ("braids", "A girl with braids", "she", "her", "herself"),
    ("bearded", "A bearded man", "he", "his", "himself"),
)

# (id, setting, neutral clauses that fit it). Neutral clauses hold no emotion word.
SCENES = (
    ("window", "stands at the window", ("looking at the street below",
                                        "watching the cars pass", "holding a cup of tea")),
    ("bench", "sits on a park bench", ("reading a newspaper", "looking at the pigeons",
                                       "eating a sandwich")),
    ("bus_stop", "waits at a bus stop", ("checking the timetable",
                                         "looking down the road", "holding an umbrella")),
    ("kitchen", "stands in the kitchen", ("stirring a pot of soup", "chopping carrots",
                                          "reading a recipe card")),
    ("office", "sits at a desk in an office", ("typing on a laptop",
                                               "sorting a stack of papers",
                                               "reading an email on the screen")),
    ("platform", "stands on a train platform", ("looking at the departure board",
                                                "holding a small suitcase",
                                                "checking the time")),
    ("shore", "stands on the shore", ("looking at the waves", "holding a pair of shoes",
                                      "watching a boat in the distance")),
    ("supermarket", "stands in a supermarket aisle", ("pushing a shopping cart",
                                                      "reading the label on a can",
                                                      "holding a shopping list")),
    ("library", "sits at a table in a library", ("turning the pages of a book",
                                                 "taking notes in a notebook",
                                                 "looking at a map")),
    ("classroom", "sits in an empty classroom", ("writing in a notebook",
                                                 "looking at the blackboard",
                                                 "packing a pencil case")),
    ("corridor", "sits in a waiting room", ("holding a paper cup",
                                            "looking at a poster on the wall",
                                            "filling in a form")),
    ("sofa", "sits on the sofa in the living room", ("watching television",
                                                     "folding laundry",
                                                     "holding the remote control")),
    ("car", "sits in a parked car", ("holding the steering wheel",
                                     "adjusting the mirror", "looking at the road ahead")),
    ("doorway", "stands in the doorway of a house", ("holding a set of keys",
                                                     "looking at the front yard",
                                                     "putting on a coat")),
    ("cafe", "sits at a table in a small cafe", ("stirring a cup of coffee",
                                                 "looking at the menu",
                                                 "reading a magazine")),
    ("street", "walks down a rainy street", ("holding an umbrella",
                                             "looking at the shop windows",
                                             "carrying a paper bag")),
    ("stairs", "sits on the front steps", ("tying a shoelace", "looking at the street",
                                           "holding a bicycle helmet")),
    ("airport", "waits at an airport gate", ("looking at the departure screen",
                                             "holding a boarding pass",
                                             "sitting next to a suitcase")),
    ("balcony", "stands on a balcony", ("looking at the rooftops",
                                        "hanging shirts on a line",
                                        "holding a watering can")),
    ("hallway", "stands in a school hallway", ("looking at a notice board",
                                               "holding a stack of books",
                                               "opening a locker")),
    ("laundromat", "sits in a laundromat", ("watching the machines turn",
                                            "folding towels", "reading a leaflet")),
    ("table", "sits at the kitchen table", ("looking at a sheet of paper",
                                            "peeling an apple", "holding a mug")),
)

# Emotional cue clauses; {pos} possessive, {refl} reflexive, {subj} subject pronoun.
CUES = {
    "joy": (
        "laughing out loud", "smiling broadly", "grinning from ear to ear",
        "beaming with happiness", "with a bright, joyful smile",
        "eyes shining with delight", "clapping {pos} hands in delight",
        "smiling happily to {refl}", "face lit up with a huge smile",
        "humming a cheerful tune and smiling", "bursting into delighted laughter",
        "laughing with pure joy", "glowing with happiness",
        "grinning with glee",
    ),
    "sadness": (
        "tears running down {pos} face", "crying quietly", "sobbing into {pos} hands",
        "wiping tears from {pos} eyes", "shoulders heaving with sobs",
        "with a sad, heartbroken expression", "looking miserable and lonely",
        "eyes red and full of tears", "weeping silently", "head bowed in grief",
        "with a sorrowful, tearful face", "looking gloomy and dejected",
        "biting {pos} lip to hold back tears", "staring at the floor in sorrow",
    ),
    "anger": (
        "shouting furiously", "face red with anger", "glaring angrily at someone",
        "fists clenched in rage", "yelling at the top of {pos} lungs in anger",
        "slamming {pos} fist down in fury", "scowling with furious eyes",
        "jaw clenched, visibly seething", "stamping {pos} foot in frustration",
        "brows drawn together in an angry scowl", "shouting in outrage",
        "fuming with anger", "snapping angrily at a passer-by",
        "face twisted with rage",
    ),
    "fear": (
        "eyes wide with terror", "trembling with fear", "frozen in terror",
        "looking around in panic", "shaking and terrified", "screaming in fear",
        "backing away in fright", "clutching {pos} chest in panic",
        "hiding {pos} face in fear", "with a terrified expression",
        "breathing fast, visibly frightened", "staring at the shadows in horror",
        "hands shaking with fear", "flinching in alarm at every sound",
    ),
}

# Settings used only by the held-out prompts (never in the pair set).
HELDOUT_SCENES = (
    ("museum", "stands in a museum hall", ("looking at a painting", "reading a placard")),
    ("ferry", "sits on the deck of a ferry", ("looking at the harbour",
                                              "holding a ticket")),
    ("crosswalk", "stands at a crosswalk", ("waiting for the signal",
                                            "holding a grocery bag")),
    ("bakery", "stands at the counter of a bakery", ("pointing at a loaf of bread",
                                                     "paying with coins")),
    ("compartment", "sits in a train compartment", ("looking out at the fields",
                                                    "reading a timetable")),
    ("fountain", "stands next to a fountain", ("looking at the water",
                                               "checking a phone")),
    ("piano", "sits at a piano", ("turning a page of sheet music",
                                  "adjusting the bench")),
    ("market", "stands at a market stall", ("weighing a bag of apples",
                                            "counting some change")),
    ("garage", "stands in a garage", ("sorting screws into a box",
                                      "looking at a shelf of tools")),
    ("lobby", "sits in a hotel lobby", ("reading a brochure",
                                        "waiting next to a suitcase")),
    ("porch", "sits on a wooden porch", ("shelling peas into a bowl",
                                         "looking at the lawn")),
    ("lab", "stands at a lab bench", ("labelling test tubes",
                                      "looking through a microscope")),
)


def _sentence(subject: tuple, setting: str, clause: str) -> str:
    _, noun, subj, pos, refl = subject
    return f"{noun} {setting}, {clause.format(pos=pos, refl=refl, subj=subj)}."


def _balanced_combos(rng: random.Random, n: int, axes: list[int]) -> list[tuple[int, ...]]:
    """n distinct index tuples over the product of ``axes`` sizes, each index used
    about equally often (capped at ceil(n / size) + 1)."""
    combos = [()]
    for size in axes:
        combos = [c + (i,) for c in combos for i in range(size)]
    if n > len(combos):
        raise ValueError(f"asked for {n} combinations, only {len(combos)} exist")
    rng.shuffle(combos)
    caps = [math.ceil(n / size) + 1 for size in axes]
    used = [[0] * size for size in axes]
    chosen = []
    for combo in combos:
        if all(used[a][i] < caps[a] for a, i in enumerate(combo)):
            chosen.append(combo)
            for a, i in enumerate(combo):
                used[a][i] += 1
            if len(chosen) == n:
                return chosen
    raise ValueError("could not balance the combinations; lower n")


def generate_pairs(emotion: str, n: int = PAIRS_PER_EMOTION, seed: int = 0,
                   query: str = DEFAULT_QUERY) -> list[Pair]:
    """``n`` text pairs for one built-in emotion, deterministic in ``seed``."""
    if emotion not in CUES:
        raise ValueError(f"no built-in cues for {emotion!r}; have {sorted(CUES)}")
    rng = random.Random(f"emosteer-builtin-{emotion}-{seed}")
    cues = CUES[emotion]
    pairs = []
    for k, (s, sc, c) in enumerate(_balanced_combos(rng, n, [len(SUBJECTS), len(SCENES),
                                                             len(cues)])):
        scene_id, setting, neutral_clauses = SCENES[sc]
        neutral = rng.choice(neutral_clauses)
        pairs.append(Pair(
            id=f"{emotion}-{k:04d}", emotion=emotion,
            emotional=Stimulus(text=_sentence(SUBJECTS[s], setting, cues[c])),
            neutral=Stimulus(text=_sentence(SUBJECTS[s], setting, neutral)),
            query=query,
            meta={"scene": scene_id, "subject": SUBJECTS[s][0], "cue": c},
        ))
    return pairs


def generate_heldout(n: int = HELDOUT_SIZE, seed: int = 0,
                     query: str = DEFAULT_QUERY) -> list[Prompt]:
    """``n`` neutral prompts over settings that the pair set never uses."""
    rng = random.Random(f"emosteer-heldout-{seed}")
    prompts = []
    for k, (s, sc, c) in enumerate(_balanced_combos(rng, n, [len(SUBJECTS),
                                                             len(HELDOUT_SCENES), 2])):
        scene_id, setting, clauses = HELDOUT_SCENES[sc]
        prompts.append(Prompt(
            id=f"heldout-{k:04d}",
            neutral=Stimulus(text=_sentence(SUBJECTS[s], setting, clauses[c])),
            query=query, meta={"scene": scene_id, "subject": SUBJECTS[s][0]},
        ))
    return prompts


def generate_templated(n_per_template: int = TEMPLATED_PER_TEMPLATE, seed: int = 0) -> list[Prompt]:
    """Neutral scenes over the held-out settings, ``n_per_template`` per template of
    ``TEMPLATES``, each scene sentence used once in the whole set (so a template split
    never shares a scene sentence). ``meta["template"]`` names the template."""
    rng = random.Random(f"emosteer-templated-{seed}")
    n = n_per_template * len(TEMPLATES)
    combos = _balanced_combos(rng, n, [len(SUBJECTS), len(HELDOUT_SCENES), 2])
    prompts = []
    for k, (s, sc, c) in enumerate(combos):
        template = list(TEMPLATES)[k % len(TEMPLATES)]
        scene_id, setting, clauses = HELDOUT_SCENES[sc]
        prompts.append(Prompt(
            id=f"templated-{template}-{k // len(TEMPLATES):03d}",
            neutral=Stimulus(text=_sentence(SUBJECTS[s], setting, clauses[c])),
            query=TEMPLATES[template],
            meta={"scene": scene_id, "subject": SUBJECTS[s][0], "template": template},
        ))
    return prompts


def write_builtin(out_dir: str | Path = BUILTIN_DIR) -> list[Path]:
    """(Re)write the shipped files: <emotion>.jsonl per emotion, heldout_neutral.jsonl and
    neutral_templates.jsonl."""
    out_dir = Path(out_dir)
    paths = [write_pairs(out_dir / f"{emo}.jsonl", generate_pairs(emo))
             for emo in BUILTIN_EMOTIONS]
    paths.append(write_prompts(out_dir / "heldout_neutral.jsonl", generate_heldout()))
    paths.append(write_prompts(out_dir / "neutral_templates.jsonl", generate_templated()))
    return paths


def load_builtin(emotions: str | tuple[str, ...] | list[str] | None = None) -> list[Pair]:
    """The shipped pairs, for all built-in emotions or the ones named."""
    if isinstance(emotions, str):
        emotions = (emotions,)
    emotions = tuple(emotions) if emotions is not None else BUILTIN_EMOTIONS
    unknown = sorted(set(emotions) - set(BUILTIN_EMOTIONS))
    if unknown:
        raise ValueError(f"no built-in set for {unknown}; have {list(BUILTIN_EMOTIONS)}")
    return [p for emo in emotions for p in read_pairs(BUILTIN_DIR / f"{emo}.jsonl")]


def load_heldout() -> list[Prompt]:
    """The shipped held-out neutral prompts (never used for extraction)."""
    return read_prompts(BUILTIN_DIR / "heldout_neutral.jsonl")


def load_templated(templates: tuple[str, ...] | list[str] | None = None) -> list[Prompt]:
    """The shipped templated neutral scenes (``generate_templated``), all or those of the
    named templates, in file order (templates interleaved)."""
    rows = read_prompts(BUILTIN_DIR / "neutral_templates.jsonl")
    if templates is None:
        return rows
    unknown = sorted(set(templates) - set(TEMPLATES))
    if unknown:
        raise ValueError(f"unknown template(s) {unknown}; have {list(TEMPLATES)}")
    return [p for p in rows if p.meta.get("template") in set(templates)]
