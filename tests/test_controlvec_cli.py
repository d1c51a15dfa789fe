"""The `emosteer bank import / export` commands on GGUF control vectors (no engine)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emosteer.request.bank import ModelInfo, VectorBank
from tests.controlvec_files import D, INFO, L, field, rand_rows, vec, write_gguf, write_repeng_style

CLI_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
    "intermediate_size": 32, "num_hidden_layers": L, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 64, "torch_dtype": "float32",
}
runner = CliRunner()


def run(*args):
    from emosteer.cli import app

    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(res, *needles):
    assert res.exit_code == 2, f"exit {res.exit_code}: {res.output}"
    assert "Traceback" not in res.output, res.output
    for n in needles:
        assert n in res.output, f"{n!r} not in: {res.output}"


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CLI_CONFIG))
    assert ModelInfo.from_hf_config(CLI_CONFIG) == INFO
    return d


def test_cli_import_export(tmp_path, model_dir):
    src = tmp_path / "repeng.gguf"
    write_repeng_style(src, "llama", {1: vec(seed=1), 4: vec(seed=4)})
    bank_path = tmp_path / "bank.safetensors"
    res = run("bank", "import", src, "--name", "calm", "--model", model_dir, "--out", bank_path)
    assert res.exit_code == 0, res.output
    assert "calm" in res.output and "1,4" in res.output and "model hint 'llama'" in res.output
    bank = VectorBank.load(bank_path)
    assert bank.names() == ["calm"]
    assert np.array_equal(bank.get("calm")[4].numpy(), vec(seed=4))
    assert bank.meta("calm")["layer_convention"] == "llama.cpp"

    # --into keeps what the bank held; --scale and --convention reach the loader
    res = run("bank", "import", src, "--name", "calm2", "--model", model_dir, "--out", bank_path,
              "--into", bank_path, "--scale", "2", "--convention", "cvector-generator")
    assert res.exit_code == 0, res.output
    bank = VectorBank.load(bank_path)
    assert bank.names() == ["calm", "calm2"]
    assert np.array_equal(bank.get("calm2")[3].numpy(), vec(seed=4) * np.float32(2))

    res = run("bank", "show", bank_path)
    assert res.exit_code == 0 and "calm2" in res.output

    out = tmp_path / "calm.gguf"
    res = run("bank", "export", bank_path, "--name", "calm", "--out", out)
    assert res.exit_code == 0, res.output
    assert "direction.1" in res.output and "direction.4" in res.output
    r = gguf.GGUFReader(out)
    assert [t.name for t in r.tensors] == ["direction.1", "direction.4"]
    assert field(r, "controlvector.model_hint")[0] == "llama"

    res = run("bank", "export", bank_path, "--name", "calm", "--out", out, "--flavour",
              "easysteer", "--method", "pca", "--model-hint", "my-llama", "--layers", "4")
    assert res.exit_code == 0, res.output
    r = gguf.GGUFReader(out)
    assert field(r, "controlvector.method")[0] == "pca"
    assert field(r, "controlvector.model_hint")[0] == "my-llama"
    assert [t.name for t in r.tensors] == ["direction.4"]


def test_cli_errors(tmp_path, model_dir):
    bank_path = tmp_path / "bank.safetensors"
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("these are not the vectors you are looking for")
    assert_user_error(run("bank", "import", not_gguf, "--name", "x", "--model", model_dir,
                          "--out", bank_path), "FILE", "not a GGUF file")
    assert not bank_path.exists()
    assert_user_error(run("bank", "import", tmp_path / "missing.gguf", "--name", "x", "--model",
                          model_dir, "--out", bank_path), "FILE", "does not exist")
    src = tmp_path / "v.gguf"
    write_gguf(src, {"direction.1": vec(D + 4)})
    assert_user_error(run("bank", "import", src, "--name", "x", "--model", model_dir,
                          "--out", bank_path), "FILE", "length 20", "hidden_size is 16")
    write_repeng_style(src, "llama", {1: vec()})
    assert_user_error(run("bank", "import", src, "--name", "x", "--model", model_dir, "--out",
                          bank_path, "--convention", "llamacpp"), "--convention", "llama.cpp")
    assert_user_error(run("bank", "import", src, "--name", "x", "--model", model_dir, "--out",
                          tmp_path / "no" / "b.safetensors"), "--out", "does not exist")
    assert_user_error(run("bank", "import", src, "--name", "x", "--model", tmp_path / "nomodel",
                          "--out", bank_path), "--model")
    assert_user_error(run("bank", "import", src, "--name", "x", "--model", model_dir, "--out",
                          bank_path, "--into", not_gguf), "--into")

    # export: row 0 is refused under llama.cpp, with the way out named
    bank = VectorBank(INFO)
    bank.add("joy", "residual", rand_rows(range(L)))
    bank.add("joy.h", "head", torch.randn(L, 2, 8))
    bank.add("joy.probe", "probe", torch.randn(L, D + 1))
    bank.save(bank_path)
    out = tmp_path / "joy.gguf"
    assert_user_error(run("bank", "export", bank_path, "--name", "joy", "--out", out),
                      "row(s) 0", "--layers")
    assert not out.exists()
    res = run("bank", "export", bank_path, "--name", "joy", "--out", out, "--layers", "1-5")
    assert res.exit_code == 0, res.output
    assert len(gguf.GGUFReader(out).tensors) == 5
    assert_user_error(run("bank", "export", bank_path, "--name", "joy", "--out", out,
                          "--layers", "1-9"), "--layers", "6 is not a layer", "0..5")
    assert_user_error(run("bank", "export", bank_path, "--name", "joy", "--out", out,
                          "--layers", "a-b"), "--layers")
    assert_user_error(run("bank", "export", bank_path, "--name", "joy.h", "--out", out),
                      "--name", "residual")
    assert_user_error(run("bank", "export", bank_path, "--name", "joy.probe", "--out", out),
                      "--name", "is a probe", "residual entries only")
    assert_user_error(run("bank", "export", bank_path, "--name", "joy", "--out", out,
                          "--flavour", "gguf"), "--flavour")
    assert_user_error(run("bank", "export", bank_path, "--name", "joy", "--out", out,
                          "--method", "pca", "--layers", "1"), "--method")
    assert_user_error(run("bank", "export", src, "--name", "joy", "--out", out), "FILE")
