"""GGUF control vectors (llama.cpp / repeng / EasySteer) in and out of the vector bank.

Files are written the way the tools write them (``tests/controlvec_files.py``: their
writer logic copied from the source, cited at each helper) and read back with ``gguf.GGUFReader`` directly, so the
layout is checked independently of emosteer's own reader. No model, no engine.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types

import gguf
import numpy as np
import pytest
import torch

from emosteer.request.bank import BankError
from emosteer.request.controlvec import (
    CONVENTIONS,
    direction_index,
    is_gguf,
    layer_ranges,
    load_control_vector,
    save_control_vector,
)
from tests.controlvec_files import (
    INFO,
    L,
    D,
    bank_with,
    bits,
    field,
    rand_rows,
    vec,
    write_cvector_generator_style,
    write_easysteer_style,
    write_gguf,
    write_repeng_style,
)


# ----------------------------------------------------------------------- round trip
ROUND_TRIP = {  # convention -> rows it can express (llama.cpp: no row 0; generator: no row L-1)
    "llama.cpp": range(1, L),
    "repeng": range(0, L),
    "easysteer": range(0, L),
    "cvector-generator": range(0, L - 1),
}


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("flavour", ["repeng", "easysteer"])
def test_round_trip_is_bit_exact(tmp_path, convention, flavour):
    x = rand_rows(ROUND_TRIP[convention], seed=3)
    x[2] = -0.0 * x[2] + x[2]  # keep some negative values and odd bit patterns around
    x[2, 0] = 1e-40  # a float32 subnormal survives
    path = tmp_path / "v.gguf"
    names = save_control_vector(bank_with(x), "joy", path, flavour=flavour, convention=convention)
    assert len(names) == len(ROUND_TRIP[convention])
    back = load_control_vector(path, INFO, "joy", convention=convention)
    got = back.get("joy", "residual")
    assert got.dtype == torch.float32 and got.shape == (L, D)
    assert torch.equal(bits(got), bits(x))
    meta = back.meta("joy")
    assert meta["layer_convention"] == convention
    assert meta["layers"] == list(ROUND_TRIP[convention])
    assert meta["source_format"] == f"gguf/{flavour}"
    assert back.info == INFO


def test_zero_rows_are_skipped_and_absent_layers_are_zero(tmp_path):
    x = rand_rows([2, 4])
    path = tmp_path / "v.gguf"
    assert save_control_vector(bank_with(x), "joy", path) == ["direction.2", "direction.4"]
    got = load_control_vector(path, INFO, "joy").get("joy")
    assert torch.equal(got, x)
    assert not got[[0, 1, 3, 5]].any()


def test_bytes_source_equals_path_source(tmp_path):
    x = rand_rows([1, 5])
    path = tmp_path / "v.gguf"
    save_control_vector(bank_with(x), "joy", path)
    a = load_control_vector(path, INFO, "joy")
    b = load_control_vector(path.read_bytes(), INFO, "joy")
    assert a.content_hash("joy") == b.content_hash("joy")
    assert b.meta("joy")["source_file"] == "upload"
    assert a.meta("joy")["source_file"] == "v.gguf"
    # a bytearray / memoryview upload works too, and nothing is left in the temp folder
    c = load_control_vector(memoryview(bytearray(path.read_bytes())), INFO, "joy")
    assert c.content_hash("joy") == a.content_hash("joy")


def test_scale_multiplies_like_llama_cpp_strength(tmp_path):
    x = rand_rows([1, 3])
    path = tmp_path / "v.gguf"
    save_control_vector(bank_with(x), "joy", path)
    got = load_control_vector(path, INFO, "joy", scale=-0.5)
    # llama.cpp: dst[j] += src[j] * strength, in float32
    assert torch.equal(got.get("joy"), x * torch.tensor(-0.5, dtype=torch.float32))
    assert got.meta("joy")["scale"] == -0.5


# -------------------------------------------------- our files, read by GGUFReader
def test_export_layout_read_with_gguf_reader(tmp_path):
    x = rand_rows([1, 2, 5])
    path = tmp_path / "v.gguf"
    save_control_vector(bank_with(x), "joy", path, model_hint="llama")
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == ("controlvector", gguf.GGUFValueType.STRING)
    assert field(r, "controlvector.model_hint") == ("llama", gguf.GGUFValueType.STRING)
    # repeng: len(self.directions), a uint32
    assert field(r, "controlvector.layer_count") == (3, gguf.GGUFValueType.UINT32)
    assert r.get_field("controlvector.method") is None  # repeng flavour: no method
    keys = {k for k in r.fields if not k.startswith("GGUF.")}
    assert keys == {"general.architecture", "controlvector.model_hint", "controlvector.layer_count"}
    assert [t.name for t in r.tensors] == ["direction.1", "direction.2", "direction.5"]
    for t, row in zip(r.tensors, (1, 2, 5)):
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [D]  # 1-D, n_embd: what llama.cpp requires
        assert np.array_equal(np.asarray(t.data), x[row].numpy())


def test_model_hint_defaults(tmp_path):
    x = rand_rows([1])
    path = tmp_path / "v.gguf"
    save_control_vector(bank_with(x), "joy", path)  # emosteer entry: the architecture
    assert field(gguf.GGUFReader(path), "controlvector.model_hint")[0] == "LlamaForCausalLM"
    write_repeng_style(path, "qwen2", {3: vec()})
    imported = load_control_vector(path, INFO, "v")
    save_control_vector(imported, "v", tmp_path / "w.gguf")  # an imported entry keeps its hint
    assert field(gguf.GGUFReader(tmp_path / "w.gguf"), "controlvector.model_hint")[0] == "qwen2"


def test_easysteer_flavour_writes_method(tmp_path):
    x = rand_rows([1, 4])
    path = tmp_path / "v.gguf"
    save_control_vector(bank_with(x), "joy", path, flavour="easysteer", method="diffmean")
    r = gguf.GGUFReader(path)
    assert field(r, "controlvector.method") == ("diffmean", gguf.GGUFValueType.STRING)
    assert field(r, "controlvector.layer_count") == (2, gguf.GGUFValueType.UINT32)
    back = load_control_vector(path, INFO, "joy", convention="easysteer")
    m = back.meta("joy")
    assert m["method"] == "diffmean" and m["source_format"] == "gguf/easysteer"
    # no method given: the default names the writer
    save_control_vector(bank_with(x), "joy", path, flavour="easysteer")
    assert field(gguf.GGUFReader(path), "controlvector.method")[0] == "emosteer"


# ----------------------------------------------- files written the way the tools do
def test_repeng_written_file_lands_on_its_layers(tmp_path):
    dirs = {5: vec(seed=5), 3: vec(seed=3), 1: vec(seed=1)}  # repeng's order: last layer first
    path = tmp_path / "repeng.gguf"
    write_repeng_style(path, "llama", dirs)
    bank = load_control_vector(path, INFO, "honesty", convention="repeng")
    got = bank.get("honesty")
    for layer in range(L):
        want = dirs.get(layer, np.zeros(D, np.float32))
        assert np.array_equal(got[layer].numpy(), want), layer
    m = bank.meta("honesty")
    assert m["source_format"] == "gguf/repeng"
    assert m["model_hint"] == "llama" and m["model_hint_matches"] is True
    assert m["gguf_layer_count"] == 3 and m["layers"] == [1, 3, 5]
    # the llama.cpp convention reads the same file to the same layers
    assert torch.equal(load_control_vector(path, INFO, "h").get("h"), got)


def test_repeng_layer_zero_needs_repeng_convention(tmp_path):
    path = tmp_path / "repeng0.gguf"
    write_repeng_style(path, "llama", {0: vec(seed=0), 2: vec(seed=2)})
    with pytest.raises(BankError, match=r"direction\.0.*llama\.cpp.*convention='repeng'"):
        load_control_vector(path, INFO, "x")
    got = load_control_vector(path, INFO, "x", convention="repeng").get("x")
    assert np.array_equal(got[0].numpy(), vec(seed=0))


def test_easysteer_written_file_records_method_and_metadata(tmp_path):
    path = tmp_path / "es.gguf"
    write_easysteer_style(path, "pca", {2: vec(seed=2), 4: vec(seed=4)},
                          {"normalize": 1, "token_pos": "last",
                           "explained_variance": {2: 0.25, 4: 0.5}}, model_type="qwen2")
    bank = load_control_vector(path, INFO, "es", convention="easysteer")
    m = bank.meta("es")
    assert m["source_format"] == "gguf/easysteer" and m["method"] == "pca"
    assert m["model_hint"] == "qwen2" and m["model_hint_matches"] is False  # recorded, not refused
    assert m["gguf_metadata"] == {"normalize": 1.0, "token_pos": "last",
                                  "explained_variance.2": 0.25, "explained_variance.4": 0.5}
    assert np.array_equal(bank.get("es")[4].numpy(), vec(seed=4))
    # exported again as EasySteer: method and metadata go back
    out = tmp_path / "es2.gguf"
    save_control_vector(bank, "es", out, flavour="easysteer", convention="easysteer")
    r = gguf.GGUFReader(out)
    assert field(r, "controlvector.method")[0] == "pca"
    assert field(r, "controlvector.explained_variance.4") == (0.5, gguf.GGUFValueType.FLOAT32)
    assert field(r, "controlvector.token_pos")[0] == "last"
    # ... but not in repeng's layout, which has no such keys
    save_control_vector(bank, "es", out)
    assert {k for k in gguf.GGUFReader(out).fields if k.startswith("controlvector.")} == {
        "controlvector.model_hint", "controlvector.layer_count"}


def test_cvector_generator_file_and_the_off_by_one(tmp_path):
    # the generator's v_final[il] comes from l_out of layer il and is named direction.il+1
    v_final = [vec(seed=il) for il in range(L - 1)]
    path = tmp_path / "gen.gguf"
    write_cvector_generator_style(path, "llama", v_final)
    as_llama = load_control_vector(path, INFO, "a")  # where llama.cpp applies it
    as_measured = load_control_vector(path, INFO, "b", convention="cvector-generator")
    assert as_llama.meta("a")["source_format"] == "gguf/llama.cpp"  # int32 layer_count
    for il, v in enumerate(v_final):
        assert np.array_equal(as_llama.get("a")[il + 1].numpy(), v)
        assert np.array_equal(as_measured.get("b")[il].numpy(), v)
    assert not as_llama.get("a")[0].any() and not as_measured.get("b")[L - 1].any()


def test_direction_index_mapping():
    assert [direction_index(l, INFO, "llama.cpp") for l in range(L)] == [None, 1, 2, 3, 4, 5]
    assert [direction_index(l, INFO, "repeng") for l in range(L)] == [0, 1, 2, 3, 4, 5]
    assert [direction_index(l, INFO, "cvector-generator") for l in range(L)] == [1, 2, 3, 4, 5, None]
    with pytest.raises(BankError, match="convention must be one of"):
        direction_index(1, INFO, "gguf")


def test_model_hint_mismatch_is_recorded_not_refused(tmp_path):
    path = tmp_path / "v.gguf"
    write_repeng_style(path, "gpt2", {1: vec()})
    m = load_control_vector(path, INFO, "x").meta("x")
    assert m["model_hint"] == "gpt2" and m["model_hint_matches"] is False


def test_f16_and_1_by_d_tensors_are_read(tmp_path):
    path = tmp_path / "v.gguf"
    v16 = vec(dtype=np.float16)
    write_gguf(path, {"direction.1": v16, "direction.2": vec(seed=2).reshape(1, D)})
    bank = load_control_vector(path, INFO, "x")
    assert np.array_equal(bank.get("x")[1].numpy(), v16.astype(np.float32))  # exact
    assert np.array_equal(bank.get("x")[2].numpy(), vec(seed=2))  # ne = [D, 1]: 1-D for ggml
    assert bank.meta("x")["gguf_tensor_types"] == ["F16", "F32"]


def test_other_tensors_skipped_by_repeng_refused_by_llama_cpp(tmp_path):
    path = tmp_path / "v.gguf"
    write_gguf(path, {"direction.1": vec(), "norm.weight": vec()})
    with pytest.raises(BankError, match=r"'norm\.weight' is not a direction\.N tensor"):
        load_control_vector(path, INFO, "x")
    m = load_control_vector(path, INFO, "x", convention="repeng").meta("x")
    assert m["ignored_tensors"] == ["norm.weight"]


# -------------------------------------------------------------------------- refusals
def _file(tmp_path, tensors, arch="controlvector"):
    path = tmp_path / "bad.gguf"
    write_gguf(path, tensors, arch)
    return path


def _duplicate_name_file(tmp_path):
    path = _file(tmp_path, {"direction.1": vec(), "direction.2": vec()})
    data = path.read_bytes().replace(b"direction.2", b"direction.1")  # same length, same slot
    path.write_bytes(data)
    return path


NAN = vec()
NAN[3] = np.nan
INF = vec()
INF[0] = -np.inf

REFUSALS = [
    # (make source, convention, message pattern)
    (lambda p: b"", "llama.cpp", r"not a GGUF file \(it is empty\)"),
    (lambda p: b"hello, world", "llama.cpp", r"not a GGUF file \(it starts with b'hell'"),
    (lambda p: bank_with(rand_rows([1])).to_bytes(), "llama.cpp", r"not a GGUF file.*safetensors"),
    (lambda p: b"GGUF\x03\x00\x00\x00" + b"\x07" * 20, "llama.cpp", "not a readable GGUF file"),
    (lambda p: _file(p, {}), "llama.cpp", r"no direction\.N tensors \(tensors found: none\)"),
    (lambda p: _file(p, {"bias": vec()}), "repeng", r"no direction\.N tensors.*'bias'"),
    (lambda p: _file(p, {"direction.1": vec(D + 1)}), "llama.cpp",
     r"'direction\.1' has length 17, the model's hidden_size is 16"),
    (lambda p: _file(p, {"direction.6": vec()}), "llama.cpp",
     r"'direction\.6' is emosteer layer 6.*outside the model: it has 6 layers \(0\.\.5\)"),
    (lambda p: _file(p, {"direction.0": vec()}), "llama.cpp", r"direction\.0 is not a valid layer"),
    (lambda p: _file(p, {"direction.0": vec()}), "cvector-generator", r"direction\.0 is not a valid"),
    (lambda p: _file(p, {"direction.6": vec()}), "cvector-generator", r"emosteer layer 5.*outside"),
    (lambda p: _file(p, {"direction.2": np.arange(D, dtype=np.int32)}), "llama.cpp",
     r"'direction\.2' has type I32; a direction must be float"),
    (lambda p: _file(p, {"direction.2": NAN}), "llama.cpp", r"'direction\.2' holds NaN or inf"),
    (lambda p: _file(p, {"direction.3": INF}), "llama.cpp", r"'direction\.3' holds NaN or inf"),
    (lambda p: _file(p, {"direction.1": vec(value=1e300, dtype=np.float64)}), "llama.cpp",
     "beyond the float32 range"),
    (lambda p: _file(p, {"direction.3": vec(), "direction.03": vec()}), "llama.cpp",
     r"'direction\.3' and 'direction\.03' both name layer 3 \(duplicated layer\)"),
    (lambda p: _duplicate_name_file(p), "llama.cpp", r"duplicated tensor with name direction\.1"),
    (lambda p: _file(p, {"direction.2": np.zeros((2, D), np.float32)}), "llama.cpp",
     r"'direction\.2' has shape \(2, 16\); a direction must be 1-D"),
    (lambda p: _file(p, {"direction.x": vec()}), "repeng",
     r"'direction\.x': the layer index after 'direction\.' must be a non-negative integer"),
]


@pytest.mark.parametrize("make, convention, pattern", REFUSALS,
                         ids=[f"{i}-{r[2][:30]}" for i, r in enumerate(REFUSALS)])
def test_refusals_name_the_problem(tmp_path, make, convention, pattern):
    source = make(tmp_path)
    with pytest.raises(BankError, match=pattern):
        load_control_vector(source, INFO, "x", convention=convention)
    if not isinstance(source, bytes):  # the same problem in an upload
        with pytest.raises(BankError, match=pattern):
            load_control_vector(source.read_bytes(), INFO, "x", convention=convention)


def test_bad_arguments(tmp_path):
    path = tmp_path / "v.gguf"
    write_repeng_style(path, "llama", {1: vec()})
    with pytest.raises(BankError, match="does not exist"):
        load_control_vector(tmp_path / "nope.gguf", INFO, "x")
    with pytest.raises(BankError, match="is a folder"):
        load_control_vector(tmp_path, INFO, "x")
    with pytest.raises(BankError, match="convention must be one of"):
        load_control_vector(path, INFO, "x", convention="llamacpp")
    for bad in (float("nan"), float("inf"), True, "2"):
        with pytest.raises(BankError, match="scale must be a finite number"):
            load_control_vector(path, INFO, "x", scale=bad)
    with pytest.raises(BankError, match="overflows float32"):
        write_gguf(path, {"direction.1": vec(value=3e38)})
        load_control_vector(path, INFO, "x", scale=10.0)
    with pytest.raises(BankError, match="ModelInfo"):
        load_control_vector(path, {"num_layers": 6}, "x")
    with pytest.raises(BankError, match="entry name"):
        load_control_vector(path, INFO, "")
    with pytest.raises(BankError, match="path or bytes"):
        load_control_vector(42, INFO, "x")


def test_export_refusals(tmp_path):
    path = tmp_path / "v.gguf"
    x = rand_rows([0, 1, 2])
    bank = bank_with(x)
    bank.add("joy.h", "head", torch.randn(L, 2, 8))
    with pytest.raises(BankError, match=r"row\(s\) 0 cannot be written under convention "
                                        r"'llama\.cpp'.*direction\.0.*layers=1-2"):
        save_control_vector(bank, "joy", path)
    assert not path.exists()  # nothing half-written
    # leaving row 0 out is explicit
    assert save_control_vector(bank, "joy", path, layers=[1, 2]) == ["direction.1", "direction.2"]
    assert save_control_vector(bank, "joy", path, convention="repeng")[0] == "direction.0"
    with pytest.raises(BankError, match=r"row\(s\) 5 cannot be written.*cvector-generator"):
        save_control_vector(bank_with(rand_rows([4, 5])), "joy", path, convention="cvector-generator")
    with pytest.raises(BankError, match="kind 'head', expected 'residual'"):
        save_control_vector(bank, "joy.h", path)
    bank.add("joy.probe", "probe", torch.randn(L, D + 1))  # a classifier, not a direction
    with pytest.raises(BankError, match="joy.probe: kind 'probe' is a classifier.*only residual"):
        save_control_vector(bank, "joy.probe", path)
    with pytest.raises(BankError, match="no vector named 'sad'"):
        save_control_vector(bank, "sad", path)
    with pytest.raises(BankError, match="every selected row is zero"):
        save_control_vector(bank, "joy", path, layers=[3, 4])
    with pytest.raises(BankError, match=r"layers: 6 is not a layer of 'joy' \(0\.\.5\)"):
        save_control_vector(bank, "joy", path, layers=[1, 6])
    with pytest.raises(BankError, match="flavour must be one of"):
        save_control_vector(bank, "joy", path, flavour="llama.cpp")
    with pytest.raises(BankError, match="only by flavour 'easysteer'"):
        save_control_vector(bank, "joy", path, method="pca", layers=[1])
    leftovers = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert leftovers == []


def test_is_gguf(tmp_path):
    path = tmp_path / "v.gguf"
    write_repeng_style(path, "llama", {1: vec()})
    assert is_gguf(path) and is_gguf(str(path)) and is_gguf(path.read_bytes())
    assert is_gguf(b"GGUF") and is_gguf(bytearray(b"GGUF\x03"))
    assert not is_gguf(b"GGU") and not is_gguf(b"") and not is_gguf(b"\x00GGUF")
    assert not is_gguf(tmp_path / "missing.gguf") and not is_gguf(tmp_path)
    assert not is_gguf(None) and not is_gguf(12)


def test_layer_ranges():
    assert layer_ranges([5, 1, 2, 3, 9, 10]) == "1-3,5,9-10"
    assert layer_ranges([]) == "(none)"


# ----------------------------------------------------------------- the real repeng
@pytest.fixture()
def repeng(monkeypatch):
    """repeng itself, when importable (``EMOSTEER_REPENG_PATH`` may name a folder that
    ``pip install --no-deps --target`` filled). It imports scikit-learn for PCA at the top of
    repeng/extract.py; the GGUF functions do not use it, so a stub stands in when absent.
    Not a project dependency (it pulls scikit-learn and transformers)."""
    extra = os.environ.get("EMOSTEER_REPENG_PATH")
    if extra:
        monkeypatch.syspath_prepend(extra)
    try:
        import sklearn.decomposition  # noqa: F401
    except ImportError:
        stub, decomposition = types.ModuleType("sklearn"), types.ModuleType("sklearn.decomposition")
        for m in (stub, decomposition):  # importlib.util.find_spec (transformers) wants a spec
            m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
        decomposition.PCA = None
        stub.decomposition = decomposition
        monkeypatch.setitem(sys.modules, "sklearn", stub)
        monkeypatch.setitem(sys.modules, "sklearn.decomposition", decomposition)
    if not hasattr(np, "float_"):  # repeng 0.4.0 (PyPI) annotates with np.float_, gone in NumPy 2
        monkeypatch.setattr(np, "float_", np.float64, raising=False)
    return pytest.importorskip("repeng", reason="repeng is not installed")


def test_against_real_repeng(tmp_path, repeng):
    dirs = {4: vec(seed=4), 2: vec(seed=2), 1: vec(seed=1)}
    theirs = tmp_path / "theirs.gguf"
    repeng.ControlVector(model_type="llama", directions=dirs).export_gguf(theirs)
    got = load_control_vector(theirs, INFO, "v").get("v")
    for layer in range(L):
        assert np.array_equal(got[layer].numpy(), dirs.get(layer, np.zeros(D, np.float32)))
    # and repeng reads ours
    ours = tmp_path / "ours.gguf"
    x = rand_rows([1, 3, 5])
    save_control_vector(bank_with(x), "joy", ours, model_hint="llama")
    cv = repeng.ControlVector.import_gguf(ours)
    assert cv.model_type == "llama" and sorted(cv.directions) == [1, 3, 5]
    for layer in (1, 3, 5):
        assert np.array_equal(np.asarray(cv.directions[layer]), x[layer].numpy())
