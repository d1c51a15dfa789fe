"""The JSONL format of counterfactual pairs and neutral prompts, with reader and writer.

One JSON object per line. A **pair** (docs/DESIGN.md §1.1) is::

    {"id": "joy-0001", "emotion": "joy",
     "emotional": {"text": "A woman stands at the window, laughing."},
     "neutral":   {"text": "A woman stands at the window, looking at the street."},
     "query": "Describe how the person in this scene feels.",
     "meta": {"scene": "window", ...}}

``emotional`` / ``neutral`` each hold exactly one of ``text`` (a string) or ``image`` (a
path; relative paths are relative to the JSONL file's folder and are resolved on read).
``emotion`` is a Mikels category or a basic emotion name (see emosteer.analysis.emotion);
``meta`` is optional free-form JSON. A **prompt** (held-out neutral input for steered
generation) is ``{"id", "neutral": {...}, "query", "meta"?}``. Blank lines and lines
starting with ``//`` are skipped. Errors name the file, the line and the field.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from emosteer.analysis.emotion import normalize_category

__all__ = ["Stimulus", "Pair", "Prompt", "PairFormatError", "parse_pair", "parse_prompt",
           "iter_pairs", "read_pairs", "write_pairs", "read_prompts", "write_prompts"]


class PairFormatError(ValueError):
    """A malformed record; ``.path``, ``.line`` (1-based) and ``.field`` say where."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = path, line, field
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


@dataclass(frozen=True)
class Stimulus:
    """One input: a text, or an image path (exactly one of the two)."""
    text: str | None = None
    image: str | None = None

    def __post_init__(self):
        if (self.text is None) == (self.image is None):
            raise ValueError("a Stimulus holds exactly one of text or image")

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "image"

    def to_json(self, base_dir: Path | None = None) -> dict[str, str]:
        if self.text is not None:
            return {"text": self.text}
        path = self.image
        if base_dir is not None:
            try:
                path = os.path.relpath(Path(self.image).resolve(), base_dir.resolve())
            except ValueError:  # other drive on Windows: keep it absolute
                path = str(Path(self.image).resolve())
            if path.startswith(".."):
                path = str(Path(self.image).resolve())
        return {"image": Path(path).as_posix()}


@dataclass(frozen=True)
class Pair:
    """A counterfactual pair: the same scene with (``emotional``) and without
    (``neutral``) the emotional cue, asked the same ``query``."""
    id: str
    emotion: str
    emotional: Stimulus
    neutral: Stimulus
    query: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self, base_dir: Path | None = None) -> dict[str, Any]:
        obj = {"id": self.id, "emotion": self.emotion,
               "emotional": self.emotional.to_json(base_dir),
               "neutral": self.neutral.to_json(base_dir), "query": self.query}
        if self.meta:
            obj["meta"] = self.meta
        return obj


@dataclass(frozen=True)
class Prompt:
    """A neutral input for evaluating steered generation (not used for extraction)."""
    id: str
    neutral: Stimulus
    query: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self, base_dir: Path | None = None) -> dict[str, Any]:
        obj = {"id": self.id, "neutral": self.neutral.to_json(base_dir), "query": self.query}
        if self.meta:
            obj["meta"] = self.meta
        return obj


# ---------------------------------------------------------------------------- parsing

def _err(msg: str, where: dict, fld: str | None = None) -> PairFormatError:
    return PairFormatError(msg, path=where.get("path"), line=where.get("line"), field=fld)


def _string(obj: dict, key: str, where: dict, prefix: str = "") -> str:
    name = prefix + key
    if key not in obj:
        raise _err("missing", where, name)
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise _err(f"must be a non-empty string, got {value!r}", where, name)
    return value


def _stimulus(obj: dict, key: str, where: dict, base_dir: Path | None) -> Stimulus:
    if key not in obj:
        raise _err("missing", where, key)
    value = obj[key]
    if not isinstance(value, dict):
        raise _err(f"must be an object with 'text' or 'image', got {type(value).__name__}",
                   where, key)
    present = [k for k in ("text", "image") if k in value]
    extra = sorted(set(value) - {"text", "image"})
    if extra:
        raise _err(f"unknown keys {extra}; expected exactly one of 'text', 'image'",
                   where, key)
    if len(present) != 1:
        raise _err("needs exactly one of 'text', 'image'", where, key)
    kind = present[0]
    content = _string(value, kind, where, prefix=key + ".")
    if kind == "image":
        path = Path(content)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return Stimulus(image=str(path))
    return Stimulus(text=content)


def _check_keys(obj: Any, allowed: set[str], where: dict) -> dict:
    if not isinstance(obj, dict):
        raise _err(f"a record must be a JSON object, got {type(obj).__name__}", where)
    extra = sorted(set(obj) - allowed)
    if extra:
        raise _err(f"unknown fields {extra}; allowed: {sorted(allowed)}", where, extra[0])
    if "meta" in obj and not isinstance(obj["meta"], dict):
        raise _err("must be an object", where, "meta")
    return obj


_PAIR_KEYS = {"id", "emotion", "emotional", "neutral", "query", "meta"}
_PROMPT_KEYS = {"id", "neutral", "query", "meta"}


def parse_pair(obj: Any, *, path=None, line=None, base_dir: Path | None = None) -> Pair:
    """Validate one decoded record as a Pair (errors name path, line, field)."""
    where = {"path": path, "line": line}
    obj = _check_keys(obj, _PAIR_KEYS, where)
    pid = _string(obj, "id", where)
    emotion = _string(obj, "emotion", where)
    try:
        emotion = normalize_category(emotion)
    except ValueError as exc:
        raise _err(str(exc), where, "emotion") from None
    emotional = _stimulus(obj, "emotional", where, base_dir)
    neutral = _stimulus(obj, "neutral", where, base_dir)
    if emotional.kind != neutral.kind:
        raise _err(f"is {neutral.kind} but 'emotional' is {emotional.kind}", where, "neutral")
    query = _string(obj, "query", where)
    return Pair(pid, emotion, emotional, neutral, query, dict(obj.get("meta", {})))


def parse_prompt(obj: Any, *, path=None, line=None, base_dir: Path | None = None) -> Prompt:
    """Validate one decoded record as a Prompt."""
    where = {"path": path, "line": line}
    obj = _check_keys(obj, _PROMPT_KEYS, where)
    return Prompt(_string(obj, "id", where), _stimulus(obj, "neutral", where, base_dir),
                  _string(obj, "query", where), dict(obj.get("meta", {})))


def _iter_records(path: str | os.PathLike, parse) -> Iterator:
    path = Path(path)
    base_dir = path.resolve().parent
    seen: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            stripped = raw.strip()
            if not stripped or stripped.startswith("//"):
                continue
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise PairFormatError(f"invalid JSON ({exc.msg} at column {exc.colno})",
                                      path=path, line=lineno) from None
            record = parse(obj, path=path, line=lineno, base_dir=base_dir)
            if record.id in seen:
                raise PairFormatError(f"duplicate id {record.id!r} (first on line "
                                      f"{seen[record.id]})", path=path, line=lineno, field="id")
            seen[record.id] = lineno
            yield record


def iter_pairs(path: str | os.PathLike) -> Iterator[Pair]:
    """Stream the pairs of a JSONL file, validating each line."""
    return _iter_records(path, parse_pair)


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """All pairs of a JSONL file (image paths resolved against the file's folder)."""
    return list(iter_pairs(path))


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """All prompts of a JSONL file."""
    return list(_iter_records(path, parse_prompt))


def _write(path: str | os.PathLike, records: Iterable) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base_dir = path.resolve().parent
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(base_dir), ensure_ascii=False) + "\n")
    return path


def write_pairs(path: str | os.PathLike, pairs: Iterable[Pair]) -> Path:
    """Write pairs as JSONL; image paths under the file's folder are stored relative."""
    return _write(path, pairs)


def write_prompts(path: str | os.PathLike, prompts: Iterable[Prompt]) -> Path:
    """Write prompts as JSONL."""
    return _write(path, prompts)
