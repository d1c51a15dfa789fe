"""Steered narrative generation at scale: JSONL in, JSONL out, resumable.

Each input row asks for one narrative: a prompt (or chat messages), an optional steering
config (the request JSON of DESIGN §4) and an optional target emotion to score. Rows are
generated in batches on vLLM (``emosteer.LLM``) or on the transformers reference backend;
every finished batch is appended and flushed, so an interrupted run resumes where it
stopped without duplicating or losing rows (rows are keyed by ``id``).

Input row::

    {"id": "p17", "prompt": "Describe the scene: ...", "steer": {...}, "emotion": "joy"}
    {"id": "i3", "image": "imgs/beach.png", "prompt": "How does the person feel?",
     "steer": {"boost": {"heads": "joy.vee", "beta": 2.0}, "neurons": {"set": "joy.ena", "gamma": 1.5}}}

An ``image`` (a path, relative to the input file's folder) makes the row an image prompt
for a vision-language model: the model's processor builds the user turn (image, then
text), and ``boost`` (VEE) acts on that image's tokens.

Output row: the input fields plus ``narrative``, ``hit_rate`` (None when the narrative
holds no emotion word), ``valence``, ``n_tokens`` and three fluency guards
(``emosteer.analysis.fluency``): ``perplexity`` (of the narrative under the unsteered model, given
its prompt; None for image rows or with ``--no-perplexity``), ``repeated_3gram`` (share
of word 3-grams repeating an earlier one) and ``distinct_2``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["GenerateConfig", "read_rows", "done_ids", "generate_jsonl", "run_batch"]


@dataclass
class GenerateConfig:
    model: str = "default"
    bank: Optional[str] = None
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 64
    max_slots: int = 256
    chat: bool = True
    dtype: str = "float32"
    enforce_eager: bool = False
    # A bank preset (``"<emotion>.preset"``): its config steers every row without "steer"
    # (the row records the preset's name).
    preset: Optional[str] = None
    preset_config: Optional[dict] = None
    # Score each text row's narrative by its perplexity under the unsteered model (one
    # teacher-forced pass per batch, the same engine, no config).
    perplexity: bool = True


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Read input rows; every row gets an ``id`` (its line number when missing)."""
    rows, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a row must be a JSON object")
            if "prompt" not in row and "messages" not in row:
                raise ValueError(f"{path}:{lineno}: field 'prompt' (or 'messages') is missing")
            if "image" in row:
                img = row["image"]
                if not isinstance(img, str) or not img:
                    raise ValueError(f"{path}:{lineno}: field 'image' must be a file path")
                full = Path(img) if Path(img).is_absolute() else Path(path).parent / img
                if not full.is_file():
                    raise ValueError(f"{path}:{lineno}: image {img!r} not found ({full})")
                if "prompt" not in row:
                    raise ValueError(f"{path}:{lineno}: an image row takes 'prompt', not 'messages'")
                row["image"] = str(full.resolve())
            row.setdefault("id", f"line-{lineno}")
            row["id"] = str(row["id"])
            if row["id"] in seen:
                raise ValueError(f"{path}:{lineno}: duplicate id {row['id']!r}")
            seen.add(row["id"])
            rows.append(row)
    return rows


def done_ids(out_path: str | os.PathLike) -> set[str]:
    """Ids already written to ``out_path``; a torn last line (crash mid-write) is cut off."""
    p = Path(out_path)
    if not p.exists():
        return set()
    data = p.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut != len(data):  # an interrupted write left a partial row: drop it
        with open(p, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    ids = set()
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            ids.add(str(json.loads(line)["id"]))
    return ids


def _batches(rows: list[dict], n: int) -> Iterator[list[dict]]:
    for i in range(0, len(rows), n):
        yield rows[i : i + n]


def _score(row: dict, text: str) -> dict:
    from emosteer.analysis import emotion
    from emosteer.analysis.fluency import distinct_n, repeated_ngram_share

    out = dict(row)
    out["narrative"] = text
    target = row.get("emotion")
    out["hit_rate"] = emotion.hit_rate(text, target) if target else None
    out["valence"] = emotion.valence(text)
    out["repeated_3gram"] = repeated_ngram_share(text, 3)
    out["distinct_2"] = distinct_n(text, 2)
    return out


def generate_jsonl(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    cfg: GenerateConfig,
    llm=None,
    progress: bool = True,
) -> int:
    """Generate every row of ``in_path`` not yet in ``out_path``; returns rows written.

    ``llm`` may be an existing ``emosteer.LLM`` (reused, e.g. by the demo); otherwise
    one is started for ``cfg.model``.
    """
    from tqdm.auto import tqdm

    rows, todo = pending_rows(in_path, out_path)
    if not todo:
        return 0
    if llm is None:
        llm = _start_llm(cfg)
    written = 0
    failed: dict[str, str] = {}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="generate",
               unit="row", disable=not progress)
    with open(out_path, "a", encoding="utf-8") as f:
        for batch in _batches(todo, cfg.batch_size):
            records, errors = run_batch(llm, batch, cfg)
            failed.update(errors)
            append_lines(f, [json.dumps(r, ensure_ascii=False) for r in records])
            written += len(records)
            bar.update(len(batch))
    bar.close()
    if failed:
        from emosteer.llm import EmosteerRequestError

        # Rows that ran were written; a rerun of the job retries exactly the failed ones.
        raise EmosteerRequestError(failed)
    return written


def run_batch(llm, batch: list[dict], cfg: GenerateConfig) -> tuple[list[dict], dict[str, str]]:
    """One batch of rows on ``llm`` (an ``emosteer.LLM``): the output records of the rows
    that ran, and ``{id: error}`` for rows the engine could not apply (not written: a
    rerun of the job retries exactly those). The local and the Ray path both call it."""
    from vllm import SamplingParams

    from emosteer.models.chat import format_prompts

    tok = llm.llm.get_tokenizer()
    sp = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed)
    if cfg.preset_config is not None:
        batch = [r if "steer" in r else {**r, "steer": cfg.preset_config, "preset": cfg.preset} for r in batch]
    prompts = [_image_prompt(llm, tok, r, cfg.chat) if "image" in r
               else format_prompts(tok, [r.get("messages") or r["prompt"]], cfg.chat)[0] for r in batch]
    outs = llm.generate(prompts, sp, steer=[r.get("steer") for r in batch], use_tqdm=False)
    records, failed = [], {}
    ok = [(r, o) for r, o in zip(batch, outs) if getattr(o, "emosteer_error", None) is None]
    for r, o in zip(batch, outs):
        if getattr(o, "emosteer_error", None) is not None:
            failed[str(r["id"])] = o.emosteer_error
    ppl = _perplexities(llm, ok) if cfg.perplexity else [None] * len(ok)
    for (r, o), pp in zip(ok, ppl):
        rec = _score(r, o.outputs[0].text)
        rec["n_tokens"] = len(o.outputs[0].token_ids)
        rec["perplexity"] = pp
        records.append(rec)
    return records, failed


def _perplexities(llm, done: list) -> list:
    """``emosteer.analysis.fluency.perplexities`` of the text rows' narratives on the same engine
    (None for image rows and empty narratives)."""
    from emosteer.analysis.fluency import perplexities
    from emosteer.analysis.runners import VLLMRunner

    runner = getattr(llm, "_emosteer_ppl_runner", None)
    if runner is None:
        runner = VLLMRunner(llm, tokenizer=llm.llm.get_tokenizer(), progress=False)
        llm._emosteer_ppl_runner = runner
    text = [k for k, (r, o) in enumerate(done) if "image" not in r and o.prompt_token_ids]
    out = [None] * len(done)
    if text:
        got = perplexities(runner, [done[k][1].prompt_token_ids for k in text],
                           [list(done[k][1].outputs[0].token_ids) for k in text])
        for k, v in zip(text, got):
            out[k] = v
    return out


def _image_prompt(llm, tok, row: dict, chat: bool) -> dict:
    """A vLLM multimodal prompt for an image row (the processor is loaded once per engine)."""
    from emosteer.analysis.runners import _load_image, _load_processor
    from emosteer.models.chat import format_image_prompt

    proc = getattr(llm, "_emosteer_processor", None)
    if proc is None:
        proc = _load_processor(llm.llm.llm_engine.model_config.model)
        llm._emosteer_processor = proc
    return {"prompt": format_image_prompt(proc, tok, row["prompt"], chat),
            "multi_modal_data": {"image": _load_image(row["image"])}}


def append_lines(f, lines: list[str]) -> None:
    """Append whole lines and make them durable before going on (resumability)."""
    if lines:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pending_rows(in_path, out_path) -> tuple[list[dict], list[dict]]:
    """(every input row, the rows not yet in ``out_path``), configs checked: a bad one is
    refused before any generation starts. The local and the Ray path both start here."""
    rows = read_rows(in_path)
    done = done_ids(out_path)
    todo = [r for r in rows if r["id"] not in done]
    check_rows(todo)
    return rows, todo


def check_rows(todo: list[dict]) -> None:
    """Reject a bad config before any generation starts."""
    from emosteer.request.spec import SteerSpec

    for r in todo:
        try:
            SteerSpec.parse(r.get("steer"))
        except ValueError as e:
            raise ValueError(f"row {r['id']!r}: {e}") from None


def _start_llm(cfg: GenerateConfig, **engine_kwargs):
    from emosteer.llm import LLM
    from emosteer.models import resolve_model

    return LLM(
        str(resolve_model(cfg.model)),
        bank=cfg.bank,
        max_slots=cfg.max_slots,
        dtype=cfg.dtype,
        seed=cfg.seed,
        enforce_eager=cfg.enforce_eager,
        **engine_kwargs,
    )
