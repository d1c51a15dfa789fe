"""Counterfactual pair data: built-in set, JSONL format, splits, synthetic and folder images."""
import json

import numpy as np
import pytest
from PIL import Image

from emosteer.data import (BUILTIN_EMOTIONS, Pair, PairFormatError, Prompt, Stimulus,
                           build_synthetic_pairs, load_builtin, load_heldout,
                           load_image_folder, read_pairs, read_prompts, render_scene,
                           random_scene, sample_pairs, split_pairs, write_builtin,
                           write_pairs, write_prompts)
from emosteer.data.builtin import BUILTIN_DIR, SCENES
from emosteer.analysis.emotion import hallucination_rate, hit_rate, load_lexicon

CORE = load_lexicon(("core",))


@pytest.fixture(scope="module")
def builtin():
    return load_builtin()


def test_builtin_sizes(builtin):
    for emotion in BUILTIN_EMOTIONS:
        assert sum(p.emotion == emotion for p in builtin) >= 100
    assert len({p.id for p in builtin}) == len(builtin)
    assert len({p.emotional.text for p in builtin}) == len(builtin)
    assert all(p.query == "Describe how the person in this scene feels." for p in builtin)


def test_builtin_pairs_differ_only_in_cue(builtin):
    settings = {scene_id: setting for scene_id, setting, _ in SCENES}
    for p in builtin:
        emo, neu = p.emotional.text, p.neutral.text
        setting = settings[p.meta["scene"]]
        scene = emo[: emo.index(setting) + len(setting)] + ", "
        assert neu.startswith(scene) and emo.startswith(scene), (emo, neu)
        assert emo[len(scene):] != neu[len(scene):]
        assert neu.endswith(".") and emo.endswith(".")
        assert len(scene.split()) >= 0.4 * len(emo.split())   # the scene is most of it


def test_builtin_cues_carry_the_emotion(builtin):
    for lexicon in (CORE, None):   # None: core + NRC (when nrclex is installed)
        try:
            rates = [hit_rate(p.emotional.text, p.emotion, lexicon) for p in builtin]
        except ModuleNotFoundError:
            continue
        assert all(r is not None and r >= 0.5 for r in rates)
        assert np.mean(rates) > 0.9
        assert hallucination_rate([p.neutral.text for p in builtin], lexicon) == 0.0


def test_heldout_prompts(builtin):
    held = load_heldout()
    assert len(held) >= 40 and all(isinstance(p, Prompt) for p in held)
    assert {p.meta["scene"] for p in held}.isdisjoint({p.meta["scene"] for p in builtin})
    pair_texts = {p.neutral.text for p in builtin} | {p.emotional.text for p in builtin}
    assert not {p.neutral.text for p in held} & pair_texts
    assert hallucination_rate([p.neutral.text for p in held], CORE) == 0.0


def test_templated_prompts_split_by_template(builtin):
    from emosteer.data import DEV_TEMPLATES, TEMPLATES, TEST_TEMPLATES, load_templated

    rows = load_templated()
    assert set(DEV_TEMPLATES) | set(TEST_TEMPLATES) == set(TEMPLATES)
    assert not set(DEV_TEMPLATES) & set(TEST_TEMPLATES)
    by = {t: [p for p in rows if p.meta["template"] == t] for t in TEMPLATES}
    assert all(len(v) == 16 for v in by.values())
    assert all(p.query == TEMPLATES[t] for t, v in by.items() for p in v)
    # every scene sentence once: a template split shares no scene sentence
    assert len({p.neutral.text for p in rows}) == len(rows) == len({p.id for p in rows})
    pair_texts = {p.neutral.text for p in builtin} | {p.emotional.text for p in builtin}
    assert not {p.neutral.text for p in rows} & pair_texts
    assert hallucination_rate([p.neutral.text for p in rows], CORE) == 0.0
    assert [p.id for p in load_templated(DEV_TEMPLATES)] == [p.id for p in rows
                                                             if p.meta["template"] in DEV_TEMPLATES]
    with pytest.raises(ValueError, match="poem"):
        load_templated(("poem",))


def test_shipped_files_match_generator(tmp_path):
    for path in write_builtin(tmp_path):
        assert path.read_bytes() == (BUILTIN_DIR / path.name).read_bytes(), path.name


def test_jsonl_round_trip_text(tmp_path, builtin):
    path = write_pairs(tmp_path / "sub" / "pairs.jsonl", builtin[:10])
    back = read_pairs(path)
    assert back == builtin[:10]
    assert [p.meta for p in back] == [p.meta for p in builtin[:10]]
    prompts = load_heldout()[:5]
    assert read_prompts(write_prompts(tmp_path / "prompts.jsonl", prompts)) == prompts


def test_jsonl_round_trip_images(tmp_path):
    (tmp_path / "img").mkdir()
    pair = Pair("x1", "fear", Stimulus(image=str(tmp_path / "img" / "a.png")),
                Stimulus(image=str(tmp_path / "img" / "b.png")), "How does she feel?")
    path = write_pairs(tmp_path / "pairs.jsonl", [pair])
    stored = json.loads(path.read_text())
    assert stored["emotional"] == {"image": "img/a.png"}        # relative on disk
    back = read_pairs(path)[0]
    assert back.emotional.image == str(tmp_path.resolve() / "img" / "a.png")


GOOD = {"id": "p1", "emotion": "joy", "emotional": {"text": "She laughs."},
        "neutral": {"text": "She reads."}, "query": "How does she feel?"}


def _write_lines(tmp_path, bad):
    lines = [json.dumps(GOOD), "", json.dumps({**GOOD, "id": "p2"}),
             bad if isinstance(bad, str) else json.dumps(bad)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad, field, message", [
    ('{"id": "p3", "emotion": ', None, "invalid JSON"),
    ({k: v for k, v in GOOD.items() if k != "query"} | {"id": "p3"}, "query", "missing"),
    ({**GOOD, "id": "p3", "emotion": "hunger"}, "emotion", "unknown emotion"),
    ({**GOOD, "id": "p3", "emotional": {"text": "a", "image": "b.png"}}, "emotional",
     "exactly one"),
    ({**GOOD, "id": "p3", "emotional": "She laughs."}, "emotional", "must be an object"),
    ({**GOOD, "id": "p3", "neutral": {"image": "n.png"}}, "neutral", "is image"),
    ({**GOOD, "id": "p3", "neutral": {"text": ""}}, "neutral.text", "non-empty"),
    ({**GOOD, "id": "p3", "label": "joy"}, "label", "unknown fields"),
    ({**GOOD, "id": "p1"}, "id", "duplicate id 'p1'"),
    ([1, 2], None, "JSON object"),
])
def test_malformed_lines_name_line_and_field(tmp_path, bad, field, message):
    path = _write_lines(tmp_path, bad)
    with pytest.raises(PairFormatError, match=message) as info:
        read_pairs(path)
    err = info.value
    assert err.line == 4 and "line 4" in str(err) and str(path) in str(err)
    assert err.field == field
    if field:
        assert f"field '{field}'" in str(err)


def test_split_and_sample(builtin):
    train, test = split_pairs(builtin, test_fraction=0.25, seed=3)
    assert len(train) + len(test) == len(builtin)
    assert {p.id for p in train}.isdisjoint({p.id for p in test})
    for emotion in BUILTIN_EMOTIONS:
        tr = {p.meta["scene"] for p in train if p.emotion == emotion}
        te = {p.meta["scene"] for p in test if p.emotion == emotion}
        assert tr and te and tr.isdisjoint(te)
        n = sum(p.emotion == emotion for p in test)
        assert 0.2 * 120 <= n <= 0.45 * 120
    assert split_pairs(builtin, 0.25, seed=3) == (train, test)
    assert split_pairs(builtin, 0.25, seed=4) != (train, test)
    s = sample_pairs(builtin, 7, seed=1, emotion="fear")
    assert len(s) == 7 and all(p.emotion == "fear" for p in s)
    assert s == sample_pairs(builtin, 7, seed=1, emotion="fear")
    assert len(sample_pairs(builtin[:3], 10)) == 3
    with pytest.raises(ValueError):
        split_pairs(builtin, 1.0)


def test_synthetic_images_differ_only_in_the_face(tmp_path):
    pairs = build_synthetic_pairs(tmp_path, n_per_emotion=2, size=128, seed=5)
    assert [p.emotion for p in pairs] == ["joy"] * 2 + ["sadness"] * 2 + ["anger"] * 2 \
        + ["fear"] * 2
    assert read_pairs(tmp_path / "pairs.jsonl") == pairs
    for p in pairs:
        emo = np.asarray(Image.open(p.emotional.image).convert("RGB"), dtype=np.int16)
        neu = np.asarray(Image.open(p.neutral.image).convert("RGB"), dtype=np.int16)
        assert emo.shape == neu.shape == (128, 128, 3)
        diff = np.abs(emo - neu).sum(-1) > 0
        assert diff.sum() > 30, p.id
        ys, xs = np.nonzero(diff)
        # the change is confined to the head: well under half of the picture
        assert (ys.max() - ys.min()) < 64 and (xs.max() - xs.min()) < 64, p.id
    # the same seed gives the same pictures; colour_cue tints the whole emotional image
    again = build_synthetic_pairs(tmp_path / "again", n_per_emotion=2, size=128, seed=5)
    assert Image.open(again[0].emotional.image).tobytes() == \
        Image.open(pairs[0].emotional.image).tobytes()
    scene = random_scene(__import__("random").Random(0))
    tinted = np.asarray(render_scene(scene, "sadness", 64, colour_cue=True), dtype=np.int16)
    plain = np.asarray(render_scene(scene, "sadness", 64), dtype=np.int16)
    assert (np.abs(tinted - plain).sum(-1) > 0).mean() > 0.9
    with pytest.raises(ValueError, match="expression"):
        render_scene(scene, "boredom")


def _img(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_image_folder_loader(tmp_path):
    root = tmp_path / "emoset"
    _img(root / "amusement" / "a1.jpg", (255, 0, 0))
    _img(root / "fear" / "f1.png", (0, 0, 255))
    _img(root / "fear" / "f2.png", (0, 0, 200))          # no neutral counterpart
    _img(root / "neutral" / "a1.png", (9, 9, 9))
    _img(root / "neutral" / "f1.jpg", (8, 8, 8))
    (root / "fear" / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="1 emotional image"):
        pairs = load_image_folder(root)
    assert [(p.id, p.emotion) for p in pairs] == [("amusement/a1", "amusement"),
                                                  ("fear/f1", "fear")]
    assert pairs[1].neutral.image.endswith("neutral/f1.jpg")
    with pytest.raises(ValueError, match="no neutral counterpart"):
        load_image_folder(root, strict=True)
    # the records use the common format and survive a round trip
    assert read_pairs(write_pairs(tmp_path / "p.jsonl", pairs)) == pairs

    (root / "pairs.csv").write_text("emotional,neutral,emotion\n"
                                    "fear/f2.png,neutral/f1.jpg,\n"
                                    "amusement/a1.jpg,neutral/a1.png,joy\n")
    listed = load_image_folder(root)
    assert [(p.id, p.emotion) for p in listed] == [("fear/f2", "fear"), ("joy/a1", "joy")]
    (root / "pairs.csv").write_text("emotional,neutral\nfear/missing.png,neutral/f1.jpg\n")
    with pytest.raises(ValueError, match="line 2: field 'emotional'"):
        load_image_folder(root)
    (root / "pairs.csv").unlink()
    _img(root / "holiday" / "h.png", (1, 1, 1))
    with pytest.raises(ValueError, match="holiday"):
        load_image_folder(root)
