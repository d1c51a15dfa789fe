"""Control-vector files written the way llama.cpp, repeng and EasySteer write them (their
writer logic copied from the source, cited at each helper), and small tensors, shared by
tests/test_controlvec.py and tests/test_controlvec_cli.py."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from emosteer.request.bank import ModelInfo, VectorBank

L, D = 6, 16
INFO = ModelInfo("LlamaForCausalLM", num_layers=L, hidden_size=D, num_heads=2, head_dim=8,
                 intermediate_size=32, num_kv_heads=1)  # fmt: skip


def rand_rows(rows, seed=0) -> torch.Tensor:
    """[L, D] float32 with random non-zero values on ``rows``, zeros elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(L, D)
    for r in rows:
        x[r] = torch.randn(D, generator=g) + 0.01  # never an all-zero row
    return x


def bank_with(x: torch.Tensor, name="joy", **meta) -> VectorBank:
    b = VectorBank(INFO)
    b.add(name, "residual", x, **meta)
    return b


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"{key} missing; fields: {list(reader.fields)}"
    return f.contents(), f.types[0]


# ------------------------------------------------------------ writers of the tools
def write_repeng_style(path, model_type: str, directions: dict[int, np.ndarray]) -> None:
    """What repeng writes: vgel/repeng repeng/extract.py ``ControlVector.export_gguf``
    (the same in release 0.4.0 and at the repository's head), copied line for line."""
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_easysteer_style(path, method: str, directions: dict[int, np.ndarray],
                          metadata: dict, model_type: str = "unknown") -> None:
    """What EasySteer writes: ZJU-REAL/EasySteer easysteer/steer/utils.py
    ``StatisticalControlVector.export_gguf`` (numbers as float32, strings, one level of
    nested numeric dicts as ``key.subkey``), copied."""
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_string(f"{arch}.method", method)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for key, value in metadata.items():
        if isinstance(value, (int, float)):
            writer.add_float32(f"{arch}.{key}", float(value))
        elif isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        elif isinstance(value, dict):
            for subkey, subvalue in value.items():
                if isinstance(subvalue, (int, float)):
                    writer.add_float32(f"{arch}.{key}.{subkey}", float(subvalue))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_cvector_generator_style(path, model_hint: str, v_final: list[np.ndarray]) -> None:
    """What llama.cpp's cvector-generator writes (tools/cvector-generator
    cvector-generator.cpp ``export_gguf``: ``layer_count`` as int32; pca.hpp /
    mean.hpp name the vector of ``l_out`` layer ``il`` ``direction.{il+1}``)."""
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_int32("controlvector.layer_count", len(v_final))
    for il, v in enumerate(v_final):
        writer.add_tensor(f"direction.{il + 1}", v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(path, tensors: dict[str, np.ndarray], arch: str = "controlvector") -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def vec(n=D, value=None, dtype=np.float32, seed=0) -> np.ndarray:
    if value is not None:
        return np.full(n, value, dtype=dtype)
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)
