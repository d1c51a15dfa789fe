"""The ``emosteer`` command: help, schema, bank show, model info, and bad input.

Bad input must end with exit code 2 and a one-line message naming the field, never a
traceback. None of these tests starts an engine or converts a model.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from emosteer.cli import app

runner = CliRunner()

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 384, "torch_dtype": "float32",
}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(res, *needles):
    out = res.output
    assert res.exit_code == 2, f"exit {res.exit_code}: {out}"
    assert "Traceback" not in out, out
    for n in needles:
        assert n in out, f"{n!r} not in: {out}"


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_CONFIG))
    return d


@pytest.fixture()
def bank_file(tmp_path):
    from emosteer.request.bank import ModelInfo, VectorBank

    info = ModelInfo.from_hf_config(TINY_CONFIG)
    bank = VectorBank(info)
    bank.add("joy", "residual", torch.randn(2, 128), n_pairs=4, tau=0.5)
    bank.add("joy.h", "head", torch.randn(2, 4, 32))
    mask = torch.zeros(2, 256)
    mask[1, :5] = 1
    bank.add("joy.ena", "neurons", mask)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    return path


# ---------------------------------------------------------------- help and output
def test_help_lists_every_command():
    res = run("--help")
    assert res.exit_code == 0, res.output
    for cmd in ("model", "extract", "attribute", "generate", "demo", "schema", "bank"):
        assert cmd in res.output
    for sub in (("model", "--help"), ("bank", "--help"), ("demo", "--help"),
                ("extract", "--help"), ("attribute", "--help"), ("generate", "--help")):
        r = run(*sub)
        assert r.exit_code == 0, r.output


def test_no_args_shows_help():
    res = run()
    assert "Usage" in res.output


def test_schema_is_the_published_schema():
    from emosteer.request.schema import json_schema

    res = run("schema")
    assert res.exit_code == 0
    assert json.loads(res.stdout) == json_schema()


def test_bank_show(bank_file):
    res = run("bank", "show", bank_file)
    assert res.exit_code == 0, res.output
    for needle in ("joy.h", "joy.ena", "residual", "neurons", "5 set", "2×4×32", "n_pairs"):
        assert needle in res.output, needle


def test_bank_show_probe(tmp_path):
    """A probe lists its best layer and that layer's held-out accuracy."""
    from emosteer.request.bank import ModelInfo, VectorBank

    bank = VectorBank(ModelInfo.from_hf_config(TINY_CONFIG))
    bank.add("joy.probe", "probe", torch.randn(2, 129), heldout_accuracy=[0.625, 0.875],
             best_layer=1, n_heldout=4)
    bank.add("sad.probe", "probe", torch.randn(2, 129), heldout_accuracy=None, best_layer=0)
    bank.save(tmp_path / "b.safetensors")
    res = run("bank", "show", tmp_path / "b.safetensors")
    assert res.exit_code == 0, res.output
    for needle in ("joy.probe", "probe", "2×129", "best layer 1: 0.875", "best layer 0: no"):
        assert needle in res.output, needle


def test_model_info(model_dir):
    res = run("model", "info", model_dir)
    assert res.exit_code == 0, res.output
    assert "num_layers" in res.output and "LlamaForCausalLM" in res.output


# ---------------------------------------------------------------- bad input: exit 2
def test_bank_show_missing_file(tmp_path):
    assert_user_error(run("bank", "show", tmp_path / "nope.safetensors"), "FILE", "does not exist")


def test_bank_show_not_a_bank(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_text("not a bank")
    assert_user_error(run("bank", "show", p), "FILE")


def test_model_info_bad_path(tmp_path):
    assert_user_error(run("model", "info", tmp_path / "missing"), "PATH")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("model", "info", tmp_path / "empty"), "PATH", "config.json")


@pytest.mark.parametrize("args, field", [
    (("--emotion", "blah"), "--emotion"),
    (("--emotion", "joy", "--tau", "1.5"), "--tau"),
    (("--emotion", "joy", "--max-tokens", "0"), "--max-tokens"),
    (("--emotion", "joy", "--max-pairs", "-1"), "--max-pairs"),
    (("--emotion", "joy", "--pairs", "/nonexistent/pairs.jsonl"), "--pairs"),
    (("--emotion", "joy", "--backend", "tpu"), "--backend"),
])
def test_extract_bad_input(tmp_path, model_dir, args, field):
    res = run("extract", "--model", model_dir, "--out", tmp_path / "b.safetensors", *args)
    assert_user_error(res, field)


def test_extract_out_folder_missing(tmp_path, model_dir):
    res = run("extract", "--model", model_dir, "--emotion", "joy",
              "--out", tmp_path / "no" / "b.safetensors")
    assert_user_error(res, "--out")


def test_extract_bad_model(tmp_path):
    res = run("extract", "--model", tmp_path / "nomodel", "--emotion", "joy",
              "--out", tmp_path / "b.safetensors")
    assert_user_error(res, "--model")


@pytest.mark.parametrize("args, field", [
    (("--what", "layers,tails"), "--what"),
    (("--alpha", "0"), "--alpha"),
    (("--emotion", "joy,fear"), "--emotion"),
    (("--n-prompts", "0"), "--n-prompts"),
])
def test_attribute_bad_input(tmp_path, model_dir, bank_file, args, field):
    base = {"--emotion": "joy"}
    extra = list(args)
    if "--emotion" not in extra:
        extra += ["--emotion", base["--emotion"]]
    res = run("attribute", "--model", model_dir, "--bank", bank_file, "--out", tmp_path / "o",
              *extra)
    assert_user_error(res, field)


def test_attribute_bank_problems(tmp_path, model_dir, bank_file):
    res = run("attribute", "--model", model_dir, "--bank", tmp_path / "missing.safetensors",
              "--emotion", "joy", "--out", tmp_path / "o")
    assert_user_error(res, "--bank", "does not exist")
    res = run("attribute", "--model", model_dir, "--bank", bank_file, "--emotion", "fear",
              "--out", tmp_path / "o")
    assert_user_error(res, "--bank", "fear")
    other = dict(TINY_CONFIG, hidden_size=256)
    d = tmp_path / "other"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(other))
    res = run("attribute", "--model", d, "--bank", bank_file, "--emotion", "joy",
              "--out", tmp_path / "o")
    assert_user_error(res, "--bank", "hidden_size")


def _rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_generate_bad_input(tmp_path, model_dir, bank_file):
    out = tmp_path / "out.jsonl"
    assert_user_error(run("generate", tmp_path / "missing.jsonl", out), "IN", "does not exist")
    bad = _rows(tmp_path / "bad.jsonl", [
        {"id": "a", "prompt": "hi"},
        {"id": "b", "prompt": "hi", "steer": {"steer": [{"vector": "joy", "layers": [0],
                                                         "scale": "big"}]}}])
    assert_user_error(run("generate", bad, out, "--model", model_dir), "'b'", "steer[0].scale")
    nobank = _rows(tmp_path / "nobank.jsonl", [
        {"id": "a", "prompt": "hi", "steer": {"steer": [{"vector": "joy", "layers": [0],
                                                         "scale": 2.0}]}}])
    assert_user_error(run("generate", nobank, out, "--model", model_dir), "--bank")
    unknown = _rows(tmp_path / "unknown.jsonl", [
        {"id": "a", "prompt": "hi", "steer": {"steer": [{"vector": "anger", "layers": [0],
                                                         "scale": 2.0}]}}])
    assert_user_error(run("generate", unknown, out, "--model", model_dir, "--bank", bank_file),
                      "anger")
    layer = _rows(tmp_path / "layer.jsonl", [
        {"id": "a", "prompt": "hi", "steer": {"steer": [{"vector": "joy", "layers": [7],
                                                         "scale": 2.0}]}}])
    assert_user_error(run("generate", layer, out, "--model", model_dir, "--bank", bank_file),
                      "steer[0].layers")
    noprompt = _rows(tmp_path / "noprompt.jsonl", [{"id": "a"}])
    assert_user_error(run("generate", noprompt, out), "prompt")
    emo = _rows(tmp_path / "emo.jsonl", [{"id": "a", "prompt": "hi", "emotion": "glee"}])
    assert_user_error(run("generate", emo, out, "--model", model_dir), "emotion")
    ok = _rows(tmp_path / "ok.jsonl", [{"id": "a", "prompt": "hi"}])
    assert_user_error(run("generate", ok, out, "--batch-size", "0"), "--batch-size")
    assert_user_error(run("generate", ok, out, "--temperature", "-1"), "--temperature")
    assert_user_error(run("generate", ok, out, "--model", model_dir, "--preset", "joy.preset"),
                      "--preset", "--bank")
    assert_user_error(run("generate", ok, out, "--model", model_dir, "--bank", bank_file,
                          "--preset", "joy.preset"), "--preset", "no preset 'joy.preset'")
    img = _rows(tmp_path / "img.jsonl", [{"id": "a", "prompt": "hi", "image": "nope.png"}])
    assert_user_error(run("generate", img, out, "--model", model_dir), "image", "not found")


def test_demo_bad_input(tmp_path):
    assert_user_error(run("demo", "--emotion", "surprise"), "--emotion", "built-in")
    f = tmp_path / "file"
    f.write_text("x")
    assert_user_error(run("demo", "--out", f), "--out")
    assert_user_error(run("demo", "--model", tmp_path / "nomodel"), "--model")
    assert_user_error(run("demo", "--backend", "gpu"), "--backend")
    assert_user_error(run("demo", "--quick", "--full"), "--full")


# ---------------------------------------------------------------- a real run (HF, tiny)
def test_extract_then_attribute_on_tiny_model(tmp_path):
    """extract → bank show → attribute on a tiny random Llama, HF backend (seconds)."""
    from emosteer.request.bank import VectorBank
    from emosteer.models.tiny import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    bank = tmp_path / "bank.safetensors"
    res = run("extract", "--model", model, "--emotion", "joy", "--backend", "hf",
              "--max-pairs", "4", "--max-tokens", "4", "--out", bank)
    assert res.exit_code == 0, res.output
    assert {"joy", "joy.h", "joy.probe"} <= set(VectorBank.load(bank).names())
    assert "probe 'joy.probe' [L, d+1]: best layer" in res.output
    assert (tmp_path / "bank.safetensors.extract.json").is_file()
    assert run("bank", "show", bank).exit_code == 0
    out = tmp_path / "attr"
    res = run("attribute", "--model", model, "--bank", bank, "--emotion", "joy", "--backend",
              "hf", "--n-prompts", "2", "--max-tokens", "4", "--top-heads", "2",
              "--top-neurons", "4", "--out", out)
    assert res.exit_code == 0, res.output
    for name in ("attribution.json", "layers.png", "heads.png", "bank.safetensors"):
        assert (out / name).is_file(), name
    assert {"joy.vee", "joy.ena"} <= set(VectorBank.load(out / "bank.safetensors").names())
    res = run("extract", "--model", model, "--emotion", "joy", "--backend", "hf", "--no-probes",
              "--max-pairs", "2", "--max-tokens", "2", "--out", tmp_path / "np.safetensors")
    assert res.exit_code == 0, res.output
    assert VectorBank.load(tmp_path / "np.safetensors").names() == ["joy", "joy.h"]


# ------------------------------------------------------------------------------ serve
def test_serve_dry_run_builds_the_vllm_command(model_dir, bank_file, monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    res = run("serve", model_dir, "--bank", bank_file, "--max-slots", 8, "--port", 8123,
              "--additional-config", '{"emosteer": {"pool_mib": 16}, "other": 1}', "--dry-run")
    assert res.exit_code == 0, res.output
    assert "-m vllm.entrypoints.openai.api_server --model" in res.output
    assert "--port 8123" in res.output
    cfg = json.loads(res.output.split("--additional-config ", 1)[1].split(" --port")[0])
    assert cfg == {"emosteer": {"pool_mib": 16, "max_slots": 8}, "other": 1}
    plugins = res.output.split("VLLM_PLUGINS=", 1)[1].split()[0].split(",")
    assert "emosteer" in plugins and "lora_filesystem_resolver" in plugins  # nothing dropped


def test_serve_keeps_the_users_plugin_list(model_dir):
    from emosteer.cli.serve import serve_command

    _, env = serve_command(str(model_dir), None, {}, [], environ={"VLLM_PLUGINS": "mine"})
    assert env["VLLM_PLUGINS"] == "mine,emosteer" and "EMOSTEER_BANK" not in env


def test_serve_bad_input(tmp_path, model_dir, bank_file):
    assert_user_error(run("serve", tmp_path / "nope", "--dry-run"), "MODEL")
    assert_user_error(run("serve", model_dir, "--bank", tmp_path / "no.safetensors", "--dry-run"), "--bank")
    assert_user_error(run("serve", model_dir, "--max-slots", 0, "--dry-run"), "--max-slots")
    other = dict(TINY_CONFIG, hidden_size=64)
    d = tmp_path / "other"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(other))
    assert_user_error(run("serve", d, "--bank", bank_file, "--dry-run"), "--bank", "hidden_size")
    assert_user_error(run("serve", model_dir, "--additional-config", "{bad", "--dry-run"),
                      "--additional-config")


def test_generate_ray_options_need_ray(tmp_path, model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    assert_user_error(run("generate", src, tmp_path / "out.jsonl", "--model", model_dir, "--workers", 2),
                      "--ray")
