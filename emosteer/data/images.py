"""Image counterfactual pairs: a synthetic builder that draws the same scene twice, with
an emotional and with a neutral face, and a loader for user image folders.

Synthetic scenes (PIL only) are a sky, a ground, a house or a tree, and one person
whose face carries the cue: a smile and raised cheeks (joy), a frown, slanted brows and
tears (sadness), V-shaped brows, a red face and a tight mouth (anger), wide eyes, raised
brows, an open mouth and sweat drops (fear), a wrinkled nose and curled lip (disgust),
round eyes and mouth (surprise). Everything else is drawn from the same seed, so the
neutral image differs only in the face (and, with ``colour_cue=True``, in a mood tint).

Folder layout (EmoSet-style)::

    root/<emotion>/<name>.jpg    emotion: a Mikels category or a basic emotion name
    root/neutral/<name>.png      counterpart, matched by file stem
or an explicit list ``root/pairs.csv`` with columns ``emotional,neutral[,emotion]``.
"""
from __future__ import annotations

import csv
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from emosteer.data.format import Pair, Stimulus, write_pairs
from emosteer.analysis.emotion import normalize_category

__all__ = ["IMAGE_QUERY", "EXPRESSIONS", "SceneSpec", "random_scene", "render_scene",
           "build_synthetic_pairs", "load_image_folder"]

IMAGE_QUERY = "Describe how the person in this image feels."
EXPRESSIONS = ("neutral", "joy", "sadness", "anger", "fear", "disgust", "surprise")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")

_SKIN = ((241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172))
_HAIR = ((40, 30, 20), (90, 60, 30), (200, 160, 80), (120, 120, 120), (160, 50, 20))
_SHIRT = ((60, 90, 160), (50, 130, 80), (150, 150, 150), (170, 110, 40), (110, 70, 140))
_SKY = ((150, 195, 235), (180, 210, 230), (200, 200, 210), (235, 215, 180))
_GROUND = ((110, 160, 90), (150, 140, 110), (120, 120, 120), (190, 170, 130))
# Mood tints for colour_cue=True: (rgb, alpha 0..1)
_TINT = {"joy": ((255, 200, 60), 0.25), "sadness": ((60, 80, 140), 0.35),
         "anger": ((200, 30, 20), 0.30), "fear": ((20, 20, 50), 0.45),
         "disgust": ((110, 140, 40), 0.30), "surprise": ((250, 160, 220), 0.25)}


@dataclass(frozen=True)
class SceneSpec:
    """Everything about a synthetic scene except the expression (fractions of size)."""
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]
    horizon: float
    prop: str                  # "house" | "tree" | "none"
    prop_x: float
    sun: bool
    person_x: float
    head_r: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]


def random_scene(rng: random.Random) -> SceneSpec:
    """A random scene; the person stands left or right of the prop."""
    left = rng.random() < 0.5
    return SceneSpec(
        sky=rng.choice(_SKY), ground=rng.choice(_GROUND), horizon=rng.uniform(0.55, 0.7),
        prop=rng.choice(("house", "tree", "none")),
        prop_x=rng.uniform(0.72, 0.85) if left else rng.uniform(0.15, 0.28),
        sun=rng.random() < 0.5,
        person_x=rng.uniform(0.33, 0.45) if left else rng.uniform(0.55, 0.67),
        head_r=rng.uniform(0.13, 0.17), skin=rng.choice(_SKIN), hair=rng.choice(_HAIR),
        shirt=rng.choice(_SHIRT),
    )


def _blend(c1, c2, t):
    return tuple(int(round(a * (1 - t) + b * t)) for a, b in zip(c1, c2))


def _draw_background(d: ImageDraw.ImageDraw, s: SceneSpec, W: int) -> None:
    hy = int(s.horizon * W)
    d.rectangle([0, 0, W, hy], fill=s.sky)
    d.rectangle([0, hy, W, W], fill=s.ground)
    if s.sun:
        d.ellipse([int(0.06 * W), int(0.06 * W), int(0.18 * W), int(0.18 * W)], fill=(250, 220, 80))
    px = int(s.prop_x * W)
    if s.prop == "house":
        w = int(0.22 * W)
        d.rectangle([px - w // 2, hy - w, px + w // 2, hy], fill=(190, 90, 70))
        d.polygon([(px - w // 2 - 6, hy - w), (px + w // 2 + 6, hy - w), (px, hy - int(1.6 * w))],
                  fill=(100, 50, 40))
        d.rectangle([px - w // 8, hy - w // 2, px + w // 8, hy], fill=(80, 50, 30))
    elif s.prop == "tree":
        d.rectangle([px - 5, hy - int(0.18 * W), px + 5, hy], fill=(100, 70, 40))
        r = int(0.09 * W)
        d.ellipse([px - r, hy - int(0.18 * W) - 2 * r + 8, px + r, hy - int(0.18 * W) + 8],
                  fill=(50, 120, 50))


def _draw_face(d: ImageDraw.ImageDraw, cx: int, cy: int, r: int, skin, expression: str) -> None:
    face = skin
    if expression == "anger":
        face = _blend(skin, (220, 40, 30), 0.35)
    elif expression == "fear":
        face = _blend(skin, (235, 235, 245), 0.35)
    elif expression == "disgust":
        face = _blend(skin, (150, 180, 80), 0.25)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=face, outline=(60, 40, 30), width=2)

    ex, ey = int(0.38 * r), cy - int(0.12 * r)      # eye offsets
    ew, eh = int(0.17 * r), int(0.11 * r)            # eye half-size
    pupil = max(2, int(0.07 * r))
    lw = max(2, r // 14)                             # line width
    if expression in ("fear", "surprise"):
        ew, eh, pupil = int(0.21 * r), int(0.19 * r), max(2, int(0.05 * r))
    for side in (-1, 1):
        x = cx + side * ex
        if expression == "joy":  # smiling, squinted eyes: upward arcs
            d.arc([x - ew, ey - eh, x + ew, ey + eh + eh], 200, 340, fill=(30, 20, 20), width=lw)
        else:
            h = eh // 2 if expression in ("anger", "disgust") else eh
            d.ellipse([x - ew, ey - h, x + ew, ey + h], fill=(255, 255, 255), outline=(30, 20, 20))
            d.ellipse([x - pupil, ey - pupil, x + pupil, ey + pupil], fill=(30, 20, 20))
        # brows: (inner, outer) heights above the eye, positive = higher
        by = ey - int(0.28 * r)
        inner, outer = {"anger": (-0.12, 0.08), "sadness": (0.12, -0.06),
                        "fear": (0.16, 0.08), "surprise": (0.18, 0.18),
                        "joy": (0.05, 0.05), "disgust": (-0.08, 0.0)}.get(expression, (0.0, 0.0))
        if expression == "disgust" and side == 1:
            inner, outer = 0.06, 0.06          # asymmetric brows
        xi, xo = cx + side * int(0.14 * r), cx + side * int(0.58 * r)
        d.line([(xi, by - int(inner * r)), (xo, by - int(outer * r))], fill=(40, 25, 15),
               width=lw + (2 if expression == "anger" else 0))

    my, mw = cy + int(0.45 * r), int(0.34 * r)
    if expression == "joy":
        d.chord([cx - mw, my - int(0.25 * r), cx + mw, my + int(0.22 * r)], 0, 180,
                fill=(150, 30, 40), outline=(60, 20, 20))
        inset = max(1, int(0.12 * r))  # teeth
        d.rectangle([cx - mw + inset, my - 1, cx + mw - inset, my + int(0.05 * r)],
                    fill=(255, 255, 255))
        for side in (-1, 1):  # raised cheeks
            x = cx + side * int(0.55 * r)
            d.ellipse([x - int(0.12 * r), cy + int(0.12 * r), x + int(0.12 * r), cy + int(0.3 * r)],
                      fill=_blend(face, (240, 110, 120), 0.6))
    elif expression == "sadness":
        d.arc([cx - mw, my, cx + mw, my + int(0.4 * r)], 200, 340, fill=(80, 20, 20), width=lw)
        for side in (-1, 1):  # tears
            x, y0 = cx + side * ex, ey + eh + 2
            d.line([(x, y0), (x, y0 + int(0.35 * r))], fill=(70, 140, 230), width=lw)
            drop = max(2, r // 9)
            d.ellipse([x - drop, y0 + int(0.35 * r) - drop // 2, x + drop,
                       y0 + int(0.35 * r) + 2 * drop], fill=(70, 140, 230))
    elif expression == "anger":
        d.rectangle([cx - mw, my - int(0.06 * r), cx + mw, my + int(0.06 * r)],
                    fill=(255, 255, 255), outline=(80, 20, 20), width=lw)
        d.line([(cx - mw, my), (cx + mw, my)], fill=(80, 20, 20), width=1)
    elif expression in ("fear", "surprise"):
        h = int(0.22 * r) if expression == "fear" else int(0.18 * r)
        w = int(0.2 * r) if expression == "fear" else int(0.15 * r)
        d.ellipse([cx - w, my - h, cx + w, my + h], fill=(60, 15, 20), outline=(40, 10, 10))
        if expression == "fear":  # sweat drops
            drop = max(2, r // 9)
            for x in (cx - int(0.8 * r), cx + int(0.75 * r)):
                d.ellipse([x - drop, cy - int(0.5 * r), x + drop, cy - int(0.5 * r) + 3 * drop],
                          fill=(150, 200, 250))
    elif expression == "disgust":
        d.line([(cx - mw, my + int(0.08 * r)), (cx, my), (cx + mw, my - int(0.1 * r))],
               fill=(80, 20, 20), width=lw)
        for k in (-1, 0, 1):  # nose wrinkles
            d.line([(cx - int(0.1 * r), cy + int(0.05 * r) + 4 * k),
                    (cx + int(0.1 * r), cy + int(0.05 * r) + 4 * k)], fill=(120, 80, 60), width=1)
    else:  # neutral: straight mouth
        d.line([(cx - mw, my), (cx + mw, my)], fill=(80, 20, 20), width=lw)


def render_scene(scene: SceneSpec, expression: str = "neutral", size: int = 224,
                 colour_cue: bool = False) -> Image.Image:
    """Draw ``scene`` with the person showing ``expression`` (one of EXPRESSIONS)."""
    if expression not in EXPRESSIONS:
        raise ValueError(f"unknown expression {expression!r}; expected one of {EXPRESSIONS}")
    W = size
    img = Image.new("RGB", (W, W), scene.sky)
    d = ImageDraw.Draw(img)
    _draw_background(d, scene, W)
    cx, r = int(scene.person_x * W), int(scene.head_r * W)
    cy = int(scene.horizon * W) - int(0.9 * r)
    d.rounded_rectangle([cx - int(1.1 * r), cy + int(0.8 * r), cx + int(1.1 * r), W + 10],
                        radius=max(4, r // 2), fill=scene.shirt)
    d.pieslice([cx - int(1.08 * r), cy - int(1.12 * r), cx + int(1.08 * r), cy + int(0.9 * r)],
               180, 360, fill=scene.hair)
    _draw_face(d, cx, cy, r, scene.skin, expression)
    if colour_cue and expression in _TINT:
        rgb, alpha = _TINT[expression]
        img = Image.blend(img, Image.new("RGB", img.size, rgb), alpha)
    return img


def build_synthetic_pairs(out_dir: str | Path,
                          emotions: tuple[str, ...] = ("joy", "sadness", "anger", "fear"),
                          n_per_emotion: int = 8, size: int = 224, seed: int = 0,
                          colour_cue: bool = False, query: str = IMAGE_QUERY) -> list[Pair]:
    """Draw ``n_per_emotion`` scene pairs per emotion into ``out_dir/images/{emotion,
    neutral}/`` and write ``out_dir/pairs.jsonl``; returns the pairs (absolute paths)."""
    out_dir = Path(out_dir)
    for emo in emotions:
        if emo not in EXPRESSIONS or emo == "neutral":
            raise ValueError(f"no synthetic expression for {emo!r}; "
                             f"expected one of {EXPRESSIONS[1:]}")
    pairs = []
    for emo in emotions:
        rng = random.Random(f"emosteer-synthetic-{emo}-{seed}")
        (out_dir / "images" / emo).mkdir(parents=True, exist_ok=True)
        (out_dir / "images" / "neutral").mkdir(parents=True, exist_ok=True)
        for k in range(n_per_emotion):
            scene = random_scene(rng)
            pid = f"{emo}-{k:04d}"
            emo_path = out_dir / "images" / emo / f"{pid}.png"
            neu_path = out_dir / "images" / "neutral" / f"{pid}.png"
            render_scene(scene, emo, size, colour_cue).save(emo_path)
            render_scene(scene, "neutral", size, colour_cue=False).save(neu_path)
            pairs.append(Pair(pid, normalize_category(emo), Stimulus(image=str(emo_path.resolve())),
                              Stimulus(image=str(neu_path.resolve())), query,
                              meta={"synthetic": True, "seed": seed, "prop": scene.prop}))
    write_pairs(out_dir / "pairs.jsonl", pairs)
    return pairs


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in found:
                raise ValueError(f"{folder}: two images share the stem {p.stem!r}: "
                                 f"{found[p.stem].name}, {p.name}")
            found[p.stem] = p
    return found


def _from_list(root: Path, list_path: Path, query: str) -> list[Pair]:
    delimiter = "\t" if list_path.suffix.lower() == ".tsv" else ","
    pairs = []
    with list_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        missing = {"emotional", "neutral"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{list_path}: header needs columns 'emotional', 'neutral'"
                             f"[, 'emotion']; missing {sorted(missing)}")
        for lineno, row in enumerate(reader, 2):
            paths = {}
            for col in ("emotional", "neutral"):
                p = Path(row[col] or "")
                p = p if p.is_absolute() else root / p
                if not p.is_file():
                    raise ValueError(f"{list_path}: line {lineno}: field '{col}': "
                                     f"no such image {p}")
                paths[col] = p
            raw = (row.get("emotion") or "").strip() or paths["emotional"].parent.name
            try:
                emotion = normalize_category(raw)
            except ValueError as exc:
                raise ValueError(f"{list_path}: line {lineno}: field 'emotion': {exc}") from None
            pairs.append(Pair(f"{emotion}/{paths['emotional'].stem}", emotion,
                              Stimulus(image=str(paths["emotional"].resolve())),
                              Stimulus(image=str(paths["neutral"].resolve())), query,
                              meta={"source": str(list_path.name), "line": lineno}))
    return pairs


def load_image_folder(root: str | Path, pairs_file: str | Path | None = None,
                      query: str = IMAGE_QUERY, strict: bool = False) -> list[Pair]:
    """Pairs from an EmoSet-style folder (see module docstring). Emotional images without
    a neutral counterpart are skipped with a warning, or raise with ``strict=True``;
    ``pairs_file`` (CSV/TSV, relative to ``root`` unless absolute) replaces stem matching."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if pairs_file is None and (root / "pairs.csv").is_file():
        pairs_file = "pairs.csv"
    if pairs_file is not None:
        list_path = Path(pairs_file)
        list_path = list_path if list_path.is_absolute() else root / list_path
        pairs = _from_list(root, list_path, query)
    else:
        neutral_dir = root / "neutral"
        if not neutral_dir.is_dir():
            raise FileNotFoundError(f"{root} has no 'neutral' folder and no pairs.csv")
        neutral = _images_by_stem(neutral_dir)
        pairs, unmatched = [], []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if folder.name.startswith((".", "_")) or folder.name == "neutral":
                continue
            try:
                emotion = normalize_category(folder.name)
            except ValueError as exc:
                raise ValueError(f"{folder}: folder name is not an emotion: {exc}") from None
            for stem, path in _images_by_stem(folder).items():
                if stem not in neutral:
                    unmatched.append(path)
                    continue
                pairs.append(Pair(f"{folder.name}/{stem}", emotion,
                                  Stimulus(image=str(path.resolve())),
                                  Stimulus(image=str(neutral[stem].resolve())), query))
        if unmatched:
            msg = (f"{len(unmatched)} emotional image(s) under {root} have no neutral "
                   f"counterpart with the same stem, e.g. {unmatched[0]}")
            if strict:
                raise ValueError(msg)
            warnings.warn(msg + "; skipped", stacklevel=2)
    if not pairs:
        raise ValueError(f"no image pairs found under {root}")
    return pairs
