"""GGUF control vectors (llama.cpp, repeng, EasySteer) in and out of the vector bank.

A control vector file is a GGUF file whose tensors are named ``direction.N``: one float32
1-D tensor of length ``n_embd`` per steered layer. repeng (``ControlVector.export_gguf``,
vgel/repeng ``repeng/extract.py``) writes architecture ``controlvector`` with the keys
``controlvector.model_hint`` (string, the HF ``model_type``) and
``controlvector.layer_count`` (uint32, the number of directions, not of model layers).
EasySteer (``StatisticalControlVector.export_gguf``, ZJU-REAL/EasySteer
``easysteer/steer/utils.py``) writes the same plus ``controlvector.method`` and further
``controlvector.<key>`` values (numbers as float32, strings). llama.cpp's
``cvector-generator`` writes the same two keys, ``layer_count`` as int32. llama.cpp's
loader reads only the tensors and ignores every key.

emosteer's entry of kind ``"residual"`` is ``[num_layers, hidden_size]``; row ``l`` is
added to the output of decoder layer ``l`` (0-based), the residual stream after block
``l`` (HF ``hidden_states[l + 1]``, docs/INTERFACES.md). Imports make residual
entries only; export writes residual entries only and refuses a ``"probe"`` (a
classifier ``[L, d + 1]``, not a direction to add) by name.

Layer conventions (``convention=``), L = the model's number of layers:

    convention            direction.N <-> emosteer row l     N written / read
    "llama.cpp"           N = l                              1 .. L-1 (row 0: none)
    "repeng"              N = l                              0 .. L-1
    "easysteer"           N = l                              0 .. L-1
    "cvector-generator"   N = l + 1 (row l = N - 1)          1 .. L-1 (row L-1: none)

What the sources say (ggml-org/llama.cpp, vgel/repeng, ZJU-REAL/EasySteer and
ZJU-REAL/EasySteer-vllm-v1):

* llama.cpp, ``common/common.cpp`` ``common_control_vector_load_one``: ``direction.N``
  (N parsed with ``std::stoi``) is summed, times the strength, into a buffer at offset
  ``n_embd * (N - 1)``; ``direction.0``, a non-``direction.`` tensor, a non-F32 or
  non-1-D tensor, or lengths that differ make it skip the whole file.
  ``src/llama-adapter.cpp`` ``llama_adapter_cvec::init`` makes ``tensors[0] = nullptr``
  ("there's never a tensor for layer 0") and tensors for ``il = 1 .. n_layer-1``;
  ``apply`` fills ``tensors[il]`` from offset ``n_embd * (il - 1)``: the two ``-1``
  cancel, so ``tensors[il]`` holds ``direction.il``. ``apply_to(cur, il)`` is called
  by ``build_cvec(cur, il)`` on the block's output after its FFN residual add (the
  ``l_out`` tensor, e.g. ``src/models/llama.cpp``), ``il`` 0-based. So direction.N is
  added to the output of block N: emosteer row N. Layer 0 cannot be steered and a
  ``direction.N`` with N >= n_layer is never read.
* repeng, ``repeng/extract.py`` ``batched_get_hiddens``: the direction of layer
  ``layer`` is computed from ``hidden_states[layer + 1]`` (the ``+ 1`` added with the
  GGUF export, commit 6a5e9ec, when layer ids were made non-negative), i.e. the output
  of block ``layer``; ``repeng/control.py`` ``ControlModule`` adds it to the output of
  ``model.layers[layer]``; ``export_gguf`` names it ``direction.{layer}``. So repeng and
  llama.cpp agree: direction.N is the output of block N. repeng's default layers are
  ``range(-1, -num_hidden_layers, -1)`` -> 1 .. L-1, never layer 0; a repeng vector
  trained with layer 0 is a valid repeng file that llama.cpp refuses.
* EasySteer: ``direction.{layer}`` keyed by the decoder layer id parsed from the module
  name ``model.layers.{layer}``; ``vllm/steer_vectors/layers.py``
  ``DecoderLayerWithSteerVector.process_output_hook`` adds it to that layer's output.
  Same mapping as repeng.
* The off-by-one is in llama.cpp's own generator: ``tools/cvector-generator`` collects
  ``l_out`` of layers ``il = 0 .. n_layer-2`` and names the result of layer ``il``
  ``direction.{il+1}`` (``pca.hpp`` ``run_pca``, ``mean.hpp`` ``run``). llama.cpp then
  applies it one block later than where it was measured. ``"llama.cpp"`` reproduces
  what llama.cpp does with such a file; ``"cvector-generator"`` puts the vector back
  where the generator measured it.

Strength: llama.cpp's ``--control-vector-scaled FILE S`` multiplies every direction by
S; ``load_control_vector(..., scale=S)`` does the same at import. A request's
``steer[i].scale`` multiplies again at serving time.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from emosteer.request.bank import BankError, ModelInfo, VectorBank

GGUF_MAGIC = b"GGUF"
ARCH = "controlvector"
FLAVOURS = ("repeng", "easysteer")

_DIRECTION = re.compile(r"direction\.([0-9]+)")
_RESERVED_KEYS = ("model_hint", "method", "layer_count")
_MAX_EXTRA_KEYS = 512
_MAX_STR = 1024
_MAX_LIST = 64


@dataclass(frozen=True)
class _Convention:
    name: str
    offset: int  # direction index N = emosteer layer l + offset
    min_direction: int  # the smallest N the tool reads
    note: str  # why a row cannot be expressed


CONVENTIONS: dict[str, _Convention] = {
    c.name: c
    for c in (
        _Convention("llama.cpp", 0, 1,
                    "llama.cpp has no control vector for layer 0 and refuses a file holding "
                    "direction.0"),
        _Convention("repeng", 0, 0, ""),
        _Convention("easysteer", 0, 0, ""),
        _Convention("cvector-generator", 1, 1,
                    "direction.N is read by llama.cpp only for N <= num_layers-1"),
    )
}


def _convention(convention: Any) -> _Convention:
    if not isinstance(convention, str) or convention not in CONVENTIONS:
        raise BankError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    return CONVENTIONS[convention]


def direction_index(layer: int, info: ModelInfo, convention: str = "llama.cpp") -> int | None:
    """The ``N`` of ``direction.N`` that holds emosteer row ``layer`` under
    ``convention``, or None when the convention cannot express that row."""
    c = _convention(convention)
    n = layer + c.offset
    return n if c.min_direction <= n <= info.num_layers - 1 else None


def is_gguf(data_or_path: Any) -> bool:
    """Whether bytes, or the file at a path, start with the GGUF magic ``b"GGUF"``.
    A missing or unreadable file is not one."""
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        return bytes(data_or_path[:4]) == GGUF_MAGIC
    if isinstance(data_or_path, (str, os.PathLike)):
        try:
            with open(data_or_path, "rb") as f:
                return f.read(4) == GGUF_MAGIC
        except OSError:
            return False
    return False


def layer_ranges(layers: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    out: list[str] = []
    xs = sorted(layers)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out) or "(none)"


def _hint_matches(hint: str, architecture: str) -> bool:
    """A loose match of a free-text model hint (``"llama"``, ``"qwen2"``) against the
    served architecture (``"LlamaForCausalLM"``)."""
    norm = lambda s: re.sub(r"[^a-z0-9]", "", s.lower())  # noqa: E731
    h, a = norm(hint), norm(architecture)
    return bool(h) and bool(a) and (h in a or a in h)


def _json_value(value: Any) -> Any:
    """A GGUF metadata value as something a bank header can hold (bounded in size)."""
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value[:_MAX_STR]
    if isinstance(value, (list, tuple)):
        if len(value) > _MAX_LIST:
            return f"<array of {len(value)} values>"
        return [_json_value(v) for v in value]
    return repr(value)[:_MAX_STR]


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # a field the reader cannot decode: keep that it was there
        return None


# ---------------------------------------------------------------------------- import
def load_control_vector(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    info: ModelInfo,
    name: str,
    *,
    convention: str = "llama.cpp",
    scale: float = 1.0,
) -> VectorBank:
    """Read a GGUF control vector into a bank (``info``) holding one ``"residual"`` entry
    ``name`` of shape ``[num_layers, hidden_size]`` float32; layers the file lacks are zero.

    ``source`` is a path or the file's bytes (an HTTP upload). ``convention`` maps
    ``direction.N`` to emosteer layers (module docstring); ``scale`` multiplies every
    direction (llama.cpp's control-vector strength). The entry's metadata records the
    source format, file, model hint (and whether it matches ``info.architecture``: a
    mismatch is recorded, not refused), method (EasySteer), convention, layers, scale.

    Raises BankError naming the problem: not a GGUF file, no ``direction.N`` tensors, a
    bad tensor name, a duplicated layer, a layer outside the model, a non-float tensor,
    a tensor that is not 1-D, a length other than ``info.hidden_size``, NaN or inf.
    """
    if not isinstance(info, ModelInfo):
        raise BankError(f"info must be a ModelInfo, got {type(info).__name__}")
    conv = _convention(convention)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise BankError(f"scale must be a finite number, got {scale!r}")
    scale = float(scale)

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = "upload"
        _check_magic(data[:9], where, len(data))
        fd, tmp = tempfile.mkstemp(suffix=".gguf")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return _load(tmp, where, "upload", info, name, conv, scale)
        finally:
            os.unlink(tmp)
    if not isinstance(source, (str, os.PathLike)):
        raise BankError(f"source must be a path or bytes, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise BankError(f"control vector file {path!r} does not exist")
    if os.path.isdir(path):
        raise BankError(f"{path!r} is a folder, expected a GGUF file")
    with open(path, "rb") as f:
        head = f.read(9)
    _check_magic(head, path, os.path.getsize(path))
    return _load(path, path, os.path.basename(path), info, name, conv, scale)


def _check_magic(head: bytes, where: str, size: int) -> None:
    if head[:4] == GGUF_MAGIC:
        return
    if size == 0:
        raise BankError(f"{where}: not a GGUF file (it is empty)")
    hint = ""
    if head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        hint = " (it looks like a safetensors file; an emosteer bank is read with VectorBank.load)"
    raise BankError(f"{where}: not a GGUF file (it starts with {head[:4]!r}, a GGUF file with "
                    f"{GGUF_MAGIC!r}){hint}")


def _read(path: str, where: str, info: ModelInfo, conv: _Convention) -> dict[str, Any]:
    """The checked directions and metadata of a GGUF file (copies; the file's memory map
    is gone when this returns, so a temporary file can be removed)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError ... on bad data
        raise BankError(f"{where}: not a readable GGUF file, truncated or corrupt "
                       f"({type(e).__name__}: {e})") from None

    L, d = info.num_layers, info.hidden_size
    arch_field = reader.fields.get("general.architecture")
    out: dict[str, Any] = {
        "arch": _field_value(arch_field) if arch_field is not None else None,
        "hint": None, "method": None, "layer_count": None, "layer_count_type": None,
        "extra": {}, "ignored": [], "types": set(), "directions": {},
    }
    for key, field in reader.fields.items():
        if not key.startswith(ARCH + "."):
            continue
        sub = key[len(ARCH) + 1:]
        value = _field_value(field)
        if sub == "model_hint":
            out["hint"] = value if isinstance(value, str) else None
        elif sub == "method":
            out["method"] = value if isinstance(value, str) else None
        elif sub == "layer_count":
            out["layer_count"] = value if isinstance(value, int) else None
            out["layer_count_type"] = field.types[0] if field.types else None
        elif len(out["extra"]) < _MAX_EXTRA_KEYS:
            out["extra"][sub[:_MAX_STR]] = _json_value(value)
    out["int32_layer_count"] = out.pop("layer_count_type") == GGUFValueType.INT32

    directions: dict[int, tuple[str, np.ndarray]] = out["directions"]  # N -> (name, values)
    float_types = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64}
    for t in reader.tensors:
        tname = t.name
        m = _DIRECTION.fullmatch(tname)
        if m is None:
            if tname.startswith("direction."):
                raise BankError(f"{where}: tensor {tname!r}: the layer index after 'direction.' "
                                "must be a non-negative integer")
            if conv.name == "llama.cpp":
                raise BankError(f"{where}: tensor {tname!r} is not a direction.N tensor "
                                "(llama.cpp refuses a control vector file holding other tensors; "
                                "convention 'repeng' or 'easysteer' skips them)")
            out["ignored"].append(tname)
            continue
        n = int(m.group(1))
        if n in directions:
            raise BankError(f"{where}: tensors {directions[n][0]!r} and {tname!r} both name "
                            f"layer {n} (duplicated layer)")
        layer = n - conv.offset
        if n < conv.min_direction:
            raise BankError(f"{where}: tensor {tname!r}: direction.{n} is not a valid layer "
                            f"under convention {conv.name!r} ({conv.note}); a repeng or EasySteer "
                            "file may use direction.0: load it with convention='repeng'")
        if not 0 <= layer < L:
            raise BankError(f"{where}: tensor {tname!r} is emosteer layer {layer} under convention "
                            f"{conv.name!r}, outside the model: it has {L} layers (0..{L - 1})")
        if n > L - 1:  # cvector-generator: a row llama.cpp would never apply
            raise BankError(f"{where}: tensor {tname!r} (emosteer layer {layer} under convention "
                            f"{conv.name!r}) is outside the model for llama.cpp, which reads "
                            f"direction.N only up to N = {L - 1}, its last layer")
        if t.tensor_type not in float_types:
            raise BankError(f"{where}: tensor {tname!r} has type {t.tensor_type.name}; a direction "
                            "must be float (F32, or F16/F64, converted to float32)")
        dims = [int(x) for x in t.shape]  # ggml order: dims[0] is the row length
        if not dims or any(x != 1 for x in dims[1:]):
            raise BankError(f"{where}: tensor {tname!r} has shape {tuple(reversed(dims))}; a "
                            "direction must be 1-D [hidden_size]")
        if dims[0] != d:
            raise BankError(f"{where}: tensor {tname!r} has length {dims[0]}, the model's "
                            f"hidden_size is {d}")
        raw = np.asarray(t.data)
        if not np.isfinite(raw).all():
            raise BankError(f"{where}: tensor {tname!r} holds NaN or inf")
        with np.errstate(over="ignore"):  # F64 beyond the float32 range: refused just below
            values = np.array(raw, dtype=np.float32).reshape(-1)  # a copy, native byte order
        if not np.isfinite(values).all():
            raise BankError(f"{where}: tensor {tname!r} holds values beyond the float32 range")
        out["types"].add(t.tensor_type.name)
        directions[n] = (tname, values)
    return out


def _load(path: str, where: str, label: str, info: ModelInfo, name: str, conv: _Convention,
          scale: float) -> VectorBank:
    r = _read(path, where, info, conv)
    directions = r["directions"]
    if not directions:
        found = ", ".join(repr(x) for x in r["ignored"][:10]) or "none"
        raise BankError(f"{where}: no direction.N tensors (tensors found: {found})")

    L, d = info.num_layers, info.hidden_size
    tensor = torch.zeros(L, d, dtype=torch.float32)
    layers = []
    for n, (tname, values) in sorted(directions.items()):
        row = torch.from_numpy(values)
        if scale != 1.0:
            row = row * scale
            if not bool(torch.isfinite(row).all()):
                raise BankError(f"{where}: tensor {tname!r} times scale {scale:g} overflows float32")
        tensor[n - conv.offset] = row
        layers.append(n - conv.offset)

    arch, hint, method = r["arch"], r["hint"], r["method"]
    if arch == ARCH and method is not None:
        flavour = "easysteer"
    elif arch == ARCH and r["int32_layer_count"]:
        flavour = "llama.cpp"  # cvector-generator writes layer_count as int32, repeng uint32
    elif arch == ARCH:
        flavour = "repeng"
    else:
        flavour = "gguf"
    meta: dict[str, Any] = {
        "source_format": f"gguf/{flavour}",
        "source_file": label[:_MAX_STR],
        "gguf_architecture": _json_value(arch) if arch is not None else None,
        "model_hint": hint[:_MAX_STR] if hint is not None else None,
        "model_hint_matches": _hint_matches(hint, info.architecture) if hint is not None else None,
        "layer_convention": conv.name,
        "layers": layers,
        "scale": scale,
    }
    if method is not None:
        meta["method"] = method[:_MAX_STR]
    if r["layer_count"] is not None:
        meta["gguf_layer_count"] = r["layer_count"]
    if r["types"] != {"F32"}:
        meta["gguf_tensor_types"] = sorted(r["types"])
    if r["extra"]:
        meta["gguf_metadata"] = r["extra"]
    if r["ignored"]:
        meta["ignored_tensors"] = r["ignored"][:_MAX_LIST]
    bank = VectorBank(info)
    bank.add(name, "residual", tensor, **meta)
    return bank


# ---------------------------------------------------------------------------- export
def save_control_vector(
    bank: VectorBank,
    name: str,
    path: str | os.PathLike,
    *,
    model_hint: str | None = None,
    flavour: str = "repeng",
    method: str | None = None,
    convention: str = "llama.cpp",
    layers: Iterable[int] | None = None,
) -> list[str]:
    """Write the ``"residual"`` entry ``name`` as a GGUF control vector in repeng's layout
    (architecture ``controlvector``, ``controlvector.model_hint``,
    ``controlvector.layer_count`` = number of directions, float32 ``direction.N``);
    ``flavour="easysteer"`` adds ``controlvector.method`` and the entry's imported
    ``controlvector.<key>`` values. Returns the tensor names written.

    Rows that are all zero are skipped; ``layers`` limits the rows written (default:
    every non-zero row). ``model_hint`` defaults to the hint the entry was imported
    with, else the bank's architecture. A non-zero row the convention cannot express
    (under ``"llama.cpp"``: row 0, which llama.cpp never steers and whose
    ``direction.0`` makes it refuse the file) raises BankError naming the rows; leave
    them out with ``layers`` rather than losing them silently.
    """
    if not isinstance(bank, VectorBank):
        raise BankError(f"bank must be a VectorBank, got {type(bank).__name__}")
    conv = _convention(convention)
    if flavour not in FLAVOURS:
        raise BankError(f"flavour must be one of {list(FLAVOURS)}, got {flavour!r}")
    if method is not None and flavour != "easysteer":
        raise BankError("method is written only by flavour 'easysteer' (controlvector.method)")
    for what, value in (("model_hint", model_hint), ("method", method)):
        if value is not None and not isinstance(value, str):
            raise BankError(f"{what} must be a string, got {type(value).__name__}")
    if name in bank and bank.kind(name) == "probe":
        raise BankError(f"{name}: kind 'probe' is a classifier [L, d+1] (weights and a bias per "
                        "layer), not a steering direction; only residual entries export to GGUF")
    x = bank.get(name, "residual").to(torch.float32)
    meta = bank.meta(name)
    L = x.shape[0]
    if layers is None:
        rows = list(range(L))
    else:
        rows = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
                raise BankError(f"layers: {layer!r} is not a layer of {name!r} (0..{L - 1})")
            rows.append(layer)
        rows = sorted(set(rows))
    rows = [r for r in rows if bool(x[r].any())]
    if not rows:
        raise BankError(f"{name}: nothing to write: every selected row is zero")
    info = bank.info or ModelInfo("unknown", L, x.shape[1], 1, x.shape[1], 1, 1)
    written: dict[int, int] = {}
    bad = []
    for r in rows:
        n = direction_index(r, info, conv.name)
        if n is None:
            bad.append(r)
        else:
            written[n] = r
    if bad:
        keep = [r for r in rows if r not in bad]
        raise BankError(
            f"{name}: row(s) {layer_ranges(bad)} cannot be written under convention {conv.name!r} "
            f"({conv.note}); leave them out (layers={layer_ranges(keep) if keep else '[]'}, "
            f"CLI --layers) or pick another convention"
        )

    hint = model_hint if model_hint is not None else meta.get("model_hint")
    if not isinstance(hint, str):
        hint = bank.info.architecture if bank.info is not None else "unknown"
    extras = meta.get("gguf_metadata") if flavour == "easysteer" else None
    if method is None and flavour == "easysteer":
        method = meta.get("method") if isinstance(meta.get("method"), str) else "emosteer"

    from gguf import GGUFWriter

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"  # written whole, then renamed over path
    try:
        writer = GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", hint)
        if flavour == "easysteer":
            writer.add_string(f"{ARCH}.method", method)
        writer.add_uint32(f"{ARCH}.layer_count", len(written))
        if isinstance(extras, dict):
            for key, value in extras.items():
                if not isinstance(key, str) or key.split(".")[0] in _RESERVED_KEYS:
                    continue
                if isinstance(value, bool):
                    writer.add_bool(f"{ARCH}.{key}", value)
                elif isinstance(value, (int, float)):  # EasySteer writes numbers as float32
                    writer.add_float32(f"{ARCH}.{key}", float(value))
                elif isinstance(value, str):
                    writer.add_string(f"{ARCH}.{key}", value)
        names = []
        for n, r in sorted(written.items()):
            writer.add_tensor(f"direction.{n}", np.ascontiguousarray(x[r].numpy(), dtype=np.float32))
            names.append(f"direction.{n}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return names


__all__ = [
    "CONVENTIONS",
    "FLAVOURS",
    "direction_index",
    "is_gguf",
    "layer_ranges",
    "load_control_vector",
    "save_control_vector",
]
