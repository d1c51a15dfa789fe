"""The vector bank: named steering vectors, masks and probes, with the model shape they fit.

A request never carries tensors; it names entries of a bank (``SteerSpec`` →
``VectorBank``). A bank is one safetensors file: tensors keyed by name, and one header
metadata key ``"emosteer"`` holding JSON ``{format_version, model, entries}`` so that a
bank built for one model is refused, with the mismatching field named, by another.
Helpers at the end split head- and neuron-indexed entries for vLLM tensor parallelism.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

FORMAT_VERSION = 2
# Kinds renamed since an earlier file format: files of that version are read with the
# new name; ``VectorBank.add`` names the new one. (Format 1 called "head_mask" "heads",
# one letter from "head".)
RENAMED_KINDS = {1: {"heads": "head_mask"}}
METADATA_KEY = "emosteer"

# kind -> (shape as names of ModelInfo fields, is a 0/1 mask); "<field>+1" is that field
# plus one (a probe row holds d weights and a bias)
KINDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "residual": (("num_layers", "hidden_size"), False),  # [L, d]: S_l per layer
    "head": (("num_layers", "num_heads", "head_dim"), False),  # [L, H, D]
    "neurons": (("num_layers", "intermediate_size"), True),  # [L, I] 0/1
    "head_mask": (("num_layers", "num_heads"), True),  # [L, H] 0/1: heads VEE boosts
    # [N, L, H, D]: one head vector per listed prompt position (position-aligned patching)
    "head_positions": (("positions", "num_layers", "num_heads", "head_dim"), False),
    # [L, d + 1]: a linear probe per layer, row l = (w_l, b_l); it scores the output
    # residual h of decoder layer l as w_l . h + b_l (> 0: the emotion is present)
    "probe": (("num_layers", "hidden_size+1"), False),
}


class BankError(ValueError):
    """A bank entry, file or model description is wrong; the message names what."""


@dataclass(frozen=True)
class ModelInfo:
    """The shape facts of a decoder (the text tower of an LVLM) that vectors must fit."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str):
            raise BankError(f"ModelInfo.architecture must be a string, got {self.architecture!r}")
        for f in fields(self):
            if f.name == "architecture":
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise BankError(f"ModelInfo.{f.name} must be a positive int, got {value!r}")

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelInfo":
        """Build from a transformers config (or its dict). For vision-language configs
        (Qwen2-VL, Qwen3-VL, LLaVA, ...) the decoder facts come from ``text_config``;
        the architecture name stays the outer model's."""
        if hasattr(config, "to_dict"):
            cfg = config.to_dict()
        elif isinstance(config, Mapping):
            cfg = dict(config)
        else:  # a plain namespace holding config attributes
            cfg = dict(vars(config))
        archs = cfg.get("architectures") or []
        architecture = archs[0] if archs else str(cfg.get("model_type") or "")
        text = cfg.get("text_config") or cfg.get("llm_config") or cfg
        if hasattr(text, "to_dict"):
            text = text.to_dict()

        def pick(*keys: str, default: Any = None) -> Any:
            # the text config wins; the outer one only fills what it lacks
            for source in (text, cfg):
                for k in keys:
                    if source.get(k) is not None:
                        return source[k]
            if default is None:
                raise BankError(f"config has none of {keys}; cannot build ModelInfo")
            return default

        num_layers = pick("num_hidden_layers", "n_layer", "num_layers")
        hidden = pick("hidden_size", "n_embd", "d_model")
        heads = pick("num_attention_heads", "n_head")
        if not isinstance(heads, int) or heads <= 0:
            raise BankError(f"config num_attention_heads must be a positive int, got {heads!r}")
        if pick("head_dim", default=0) == 0 and hidden % heads != 0:
            raise BankError(f"hidden_size {hidden} not divisible by num_attention_heads {heads}")
        head_dim = pick("head_dim", default=hidden // heads)
        inter = pick("intermediate_size", "n_inner", default=4 * hidden)
        kv = pick("num_key_value_heads", default=heads)
        return cls(
            architecture=architecture,
            num_layers=int(num_layers),
            hidden_size=int(hidden),
            num_heads=int(heads),
            head_dim=int(head_dim),
            intermediate_size=int(inter),
            num_kv_heads=int(kv),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        if not isinstance(d, dict):
            raise BankError(f"model info must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - d.keys())
        unknown = sorted(d.keys() - names)
        if missing:
            raise BankError(f"model info lacks field(s) {missing}")
        if unknown:
            raise BankError(f"model info has unknown field(s) {unknown}")
        return cls(**d)

    def shape_of(self, kind: str) -> tuple[int, ...]:
        """The tensor shape an entry of ``kind`` must have for this model."""
        if kind not in KINDS:
            raise BankError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
        return tuple(self._dim(n) for n in KINDS[kind][0])

    def _dim(self, name: str) -> int | None:
        if name == "positions":  # any number of positions
            return None
        if name.endswith("+1"):
            return getattr(self, name[:-2]) + 1
        return getattr(self, name)


def _json_safe(value: Any, where: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BankError(f"{where} is not JSON-serialisable: {e}") from None


class VectorBank:
    """Named tensors of the kinds in ``KINDS``, each shaped for one model.

    Re-adding a name replaces the entry; its ``content_hash`` changes, so a spec
    fingerprint that mixes the bank in (``SteerSpec.fingerprint(bank)``) changes too and
    a slot holding the old tensor is never reused for the new one.
    """

    def __init__(self, info: ModelInfo | None = None, keep_versions: int = 0):
        if info is not None and not isinstance(info, ModelInfo):
            raise BankError(f"info must be a ModelInfo or None, got {type(info).__name__}")
        self.info = info
        self._tensors: dict[str, torch.Tensor] = {}
        self._entries: dict[str, dict] = {}  # name -> {"kind": ..., **meta}
        self._hashes: dict[str, str] = {}
        # Replaced or removed entries, newest last: (name, hash) -> (entry, tensor). A
        # serving engine keeps a few so that requests admitted under the old contents
        # still get exactly them (see ``pinned``).
        self.keep_versions = int(keep_versions)
        # Named request configs (``"<emotion>.preset"``): what ``generate --preset`` sends.
        self.presets: dict[str, dict] = {}
        self._retired: "collections.OrderedDict[tuple[str, str], tuple[dict, torch.Tensor]]" = (
            collections.OrderedDict()
        )

    def _retire(self, name: str) -> None:
        if self.keep_versions <= 0 or name not in self._entries:
            return
        key = (name, self.content_hash(name))
        self._retired[key] = (self._entries[name], self._tensors[name])
        self._retired.move_to_end(key)
        while len(self._retired) > self.keep_versions:
            self._retired.popitem(last=False)

    def pinned(self, hashes: Mapping[str, str]) -> "VectorBank":
        """A bank holding, for each name in ``hashes``, the version with that content hash
        (the current one, or a retired one); tensors are shared, not copied. Raises
        ``KeyError`` naming the vector when that version is no longer held."""
        out = VectorBank(self.info)
        for name, want in hashes.items():
            if name in self._entries and self.content_hash(name) == want:
                entry, tensor = self._entries[name], self._tensors[name]
            elif (name, want) in self._retired:
                entry, tensor = self._retired[(name, want)]
            else:
                raise KeyError(
                    f"vector {name!r} was removed or replaced after this request was accepted "
                    "and its old contents are no longer held; send the request again"
                )
            out._entries[name], out._tensors[name], out._hashes[name] = entry, tensor, want
        return out

    # -- entries ---------------------------------------------------------------------
    def add(self, name: str, kind: str, tensor: torch.Tensor, **meta: Any) -> None:
        """Add (or replace) an entry; checks kind, rank, shape against ``info``, finite
        values, 0/1 masks and JSON-serialisable metadata."""
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise BankError(f"entry name must be a non-empty string, got {name!r}")
        if kind not in KINDS:
            renamed = {old: new for m in RENAMED_KINDS.values() for old, new in m.items()}
            hint = f" (kind {kind!r} is now called {renamed[kind]!r})" if kind in renamed else ""
            raise BankError(f"{name}: unknown kind {kind!r}{hint}; expected one of {sorted(KINDS)}")
        if not isinstance(tensor, torch.Tensor):
            raise BankError(f"{name}: tensor must be a torch.Tensor, got {type(tensor).__name__}")
        _json_safe(meta, f"{name}: metadata")
        t = self._check_tensor(name, kind, tensor)
        self._retire(name)
        self._tensors[name] = t
        self._entries[name] = {"kind": kind, **meta}
        self._hashes.pop(name, None)

    def _check_tensor(self, name: str, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        dims, is_mask = KINDS[kind]
        if tensor.dim() != len(dims):
            raise BankError(
                f"{name}: kind {kind!r} needs a {len(dims)}-d tensor "
                f"[{', '.join(dims)}], got shape {tuple(tensor.shape)}"
            )
        if self.info is not None:
            want = self.info.shape_of(kind)
            for axis, (dim_name, got, exp) in enumerate(zip(dims, tensor.shape, want)):
                if exp is not None and got != exp:
                    raise BankError(
                        f"{name}: shape {tuple(tensor.shape)} does not fit the model: "
                        f"axis {axis} ({dim_name}) is {got}, model has {exp}"
                    )
        t = tensor.detach().to("cpu").contiguous().clone()
        if is_mask:
            if not bool(((t == 0) | (t == 1)).all()):
                raise BankError(f"{name}: kind {kind!r} is a 0/1 mask; found other values")
            return t.to(torch.float32)
        if not t.is_floating_point():
            raise BankError(f"{name}: kind {kind!r} needs a floating tensor, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise BankError(f"{name}: tensor holds NaN or inf")
        return t

    def remove(self, name: str) -> None:
        self._require(name)
        self._retire(name)
        del self._tensors[name], self._entries[name]
        self._hashes.pop(name, None)

    def _require(self, name: str) -> None:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)[:20]) or "(bank is empty)"
            raise BankError(f"no vector named {name!r} in the bank; known: {known}")

    def get(self, name: str, kind: str | None = None) -> torch.Tensor:
        self._require(name)
        if kind is not None and self._entries[name]["kind"] != kind:
            raise BankError(
                f"vector {name!r} is of kind {self._entries[name]['kind']!r}, expected {kind!r}"
            )
        return self._tensors[name]

    def kind(self, name: str) -> str:
        self._require(name)
        return self._entries[name]["kind"]

    def meta(self, name: str) -> dict:
        self._require(name)
        return {k: v for k, v in self._entries[name].items() if k != "kind"}

    def names(self, kind: str | None = None) -> list[str]:
        return sorted(n for n, e in self._entries.items() if kind is None or e["kind"] == kind)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        arch = self.info.architecture if self.info else "?"
        return f"VectorBank({len(self)} entries, model={arch})"

    def content_hash(self, name: str) -> str:
        """sha256 hex over kind, dtype, shape and bytes of the entry."""
        self._require(name)
        if name not in self._hashes:
            t = self._tensors[name]
            h = hashlib.sha256()
            h.update(f"{self._entries[name]['kind']}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._hashes[name] = h.hexdigest()
        return self._hashes[name]

    def overlay(self, extra: Mapping[str, tuple[str, torch.Tensor]]) -> "VectorBank":
        """A bank holding this one's entries (shared, not copied) plus ``extra``
        (name -> (kind, tensor), checked like ``add``): a request's inline vectors."""
        out = VectorBank(self.info)
        out._tensors, out._entries, out._hashes = dict(self._tensors), dict(self._entries), dict(self._hashes)
        out.presets = self.presets
        for name, (kind, tensor) in extra.items():
            out.add(name, kind, tensor, source="inline")
        return out

    def update(self, other: "VectorBank") -> None:
        """Add every entry and preset of ``other`` (replacing same names), checked against
        ``info``."""
        if self.info is not None and other.info is not None:
            other.validate_against(self.info)
        for n in other.names():
            self.add(n, other.kind(n), other.get(n), **other.meta(n))
        for n, cfg in other.presets.items():
            self.presets[n] = cfg

    # -- presets ---------------------------------------------------------------------
    def set_preset(self, name: str, config: dict, **meta: Any) -> None:
        """Store a request config under ``name`` (checked like a request: SpecError names
        the field); ``meta`` (JSON) says where it came from."""
        from emosteer.request.spec import SteerSpec

        if not isinstance(name, str) or not name:
            raise BankError(f"preset name must be a non-empty string, got {name!r}")
        spec = SteerSpec.parse(config)
        _json_safe(meta, f"{name}: preset metadata")
        self.presets[name] = {"config": spec.to_dict(), **meta}

    def preset(self, name: str) -> dict:
        """The request config stored under ``name``; BankError listing the known ones."""
        if name not in self.presets:
            raise BankError(f"no preset {name!r} in the bank (known: {sorted(self.presets) or 'none'})")
        return dict(self.presets[name]["config"])

    # -- validation ------------------------------------------------------------------
    def validate_against(self, info: ModelInfo, check_architecture: bool = True) -> None:
        """Raise BankError naming the first field or entry that does not fit ``info``."""
        if self.info is not None:
            for f in fields(ModelInfo):
                if f.name == "architecture" and not check_architecture:
                    continue
                mine, theirs = getattr(self.info, f.name), getattr(info, f.name)
                if mine != theirs:
                    raise BankError(
                        f"bank was built for a different model: {f.name} is {mine!r} in the "
                        f"bank, {theirs!r} in the model"
                    )
        for name in self.names():
            kind = self._entries[name]["kind"]
            got, want = tuple(self._tensors[name].shape), info.shape_of(kind)
            if any(w is not None and g != w for g, w in zip(got, want)) or len(got) != len(want):
                raise BankError(f"{name}: shape {got} does not fit the model ({kind} needs {want})")

    # -- files -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        header = {
            "format_version": FORMAT_VERSION,
            "model": self.info.to_dict() if self.info is not None else None,
            "entries": self._entries,
        }
        if self.presets:
            header["presets"] = self.presets
        save_file(dict(self._tensors), os.fspath(path), metadata={METADATA_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike, where: str | None = None) -> "VectorBank":
        """Read a bank file; BankError names the problem on a missing or bad file
        (messages start with ``where``, default the path)."""
        from safetensors import safe_open

        path = os.fspath(path)
        fname = path
        path = where or path
        if not os.path.isfile(fname):
            raise BankError(f"bank file {path!r} does not exist")
        try:
            with safe_open(fname, framework="pt") as f:
                raw_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise BankError(f"{path}: not a readable safetensors file ({e})") from None
        if METADATA_KEY not in raw_meta:
            raise BankError(f"{path}: safetensors header lacks the {METADATA_KEY!r} metadata key")
        try:
            header = json.loads(raw_meta[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise BankError(f"{path}: {METADATA_KEY!r} metadata is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise BankError(f"{path}: {METADATA_KEY!r} metadata must be a JSON object")
        version = header.get("format_version")
        if version != FORMAT_VERSION and version not in RENAMED_KINDS:
            raise BankError(
                f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
            )
        model = header.get("model")
        try:
            info = ModelInfo.from_dict(model) if model is not None else None
        except (BankError, TypeError) as e:
            raise BankError(f"{path}: model: {e}") from None
        entries = header.get("entries")
        if not isinstance(entries, dict):
            raise BankError(f"{path}: entries must be a JSON object")
        missing = sorted(entries.keys() - tensors.keys())
        orphans = sorted(tensors.keys() - entries.keys())
        if missing:
            raise BankError(f"{path}: entries without a tensor: {missing}")
        if orphans:
            raise BankError(f"{path}: tensors without an entry: {orphans}")
        bank = cls(info)
        presets = header.get("presets") or {}
        if not isinstance(presets, dict) or not all(isinstance(v, dict) and "config" in v for v in presets.values()):
            raise BankError(f"{path}: presets must map names to {{'config': ...}} objects")
        for name, p in presets.items():
            try:
                bank.set_preset(name, p["config"], **{k: v for k, v in p.items() if k != "config"})
            except ValueError as e:
                raise BankError(f"{path}: preset {name!r}: {e}") from None
        for name in sorted(entries):
            entry = entries[name]
            if not isinstance(entry, dict) or "kind" not in entry:
                raise BankError(f"{path}: entries.{name} must be an object with a 'kind'")
            meta = {k: v for k, v in entry.items() if k != "kind"}
            kind = RENAMED_KINDS.get(version, {}).get(entry["kind"], entry["kind"])
            try:
                bank.add(name, kind, tensors[name], **meta)
            except BankError as e:
                raise BankError(f"{path}: {e}") from None
        return bank


    @classmethod
    def from_bytes(cls, data: bytes, where: str = "upload") -> "VectorBank":
        """A bank from a bank file's bytes (an HTTP upload, a worker RPC)."""
        import tempfile

        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
            raise BankError(f"{where}: not a safetensors bank file (too short)")
        fd, tmp = tempfile.mkstemp(suffix=".safetensors")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(data))
            return cls.load(tmp, where=where)
        finally:
            os.unlink(tmp)

    def to_bytes(self) -> bytes:
        """The bank file's bytes (what ``save`` writes)."""
        import tempfile

        fd, tmp = tempfile.mkstemp(suffix=".safetensors")
        os.close(fd)
        try:
            self.save(tmp)
            with open(tmp, "rb") as f:
                return f.read()
        finally:
            os.unlink(tmp)


# -- tensor parallelism ---------------------------------------------------------------
def _contiguous_shard(total: int, tp_size: int, tp_rank: int, what: str) -> range:
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise BankError(f"tp_size must be a positive int, got {tp_size!r}")
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
        raise BankError(f"tp_rank must be in [0, {tp_size}), got {tp_rank!r}")
    if total % tp_size != 0:
        raise BankError(f"{what} {total} is not divisible by tp_size {tp_size}")
    per = total // tp_size
    return range(tp_rank * per, (tp_rank + 1) * per)


def head_shard(num_heads: int, tp_size: int, tp_rank: int) -> range:
    """Global head ids held by ``tp_rank``: vLLM splits attention heads contiguously,
    e.g. 8 heads, tp 2 -> rank 0 holds 0..3, rank 1 holds 4..7."""
    return _contiguous_shard(num_heads, tp_size, tp_rank, "num_heads")


def neuron_shard(intermediate_size: int, tp_size: int, tp_rank: int) -> range:
    """Global MLP neuron ids held by ``tp_rank`` (vLLM's column-parallel gate_up_proj
    splits the intermediate dimension contiguously)."""
    return _contiguous_shard(intermediate_size, tp_size, tp_rank, "intermediate_size")


def shard_entry(tensor: torch.Tensor, kind: str, tp_size: int, tp_rank: int) -> torch.Tensor:
    """The part of a bank entry that ``tp_rank`` needs: head kinds sliced by head,
    neuron masks by neuron, residual vectors and probes whole (the residual stream is
    replicated)."""
    if kind not in KINDS:
        raise BankError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    if tensor.dim() != len(KINDS[kind][0]):
        raise BankError(f"kind {kind!r} needs a {len(KINDS[kind][0])}-d tensor, got {tuple(tensor.shape)}")
    if kind in ("residual", "probe"):
        _contiguous_shard(tp_size, tp_size, tp_rank, "tp_size")  # checks the tp arguments
        return tensor
    if kind in ("head", "head_mask"):
        r = head_shard(tensor.shape[1], tp_size, tp_rank)
    elif kind == "head_positions":
        r = head_shard(tensor.shape[2], tp_size, tp_rank)
        return tensor[:, :, r.start : r.stop].contiguous()
    else:
        r = neuron_shard(tensor.shape[1], tp_size, tp_rank)
    return tensor[:, r.start : r.stop].contiguous()


__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "BankError",
    "ModelInfo",
    "VectorBank",
    "head_shard",
    "neuron_shard",
    "shard_entry",
]
