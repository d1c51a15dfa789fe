"""The README's "Serve with vLLM" examples, run as written against the real server: the
`emosteer serve` line (parsed with --dry-run), the curl block (bash) and the `openai`
client block."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_support import API_KEY

DOC = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### Serve with vLLM"


def blocks(lang: str) -> list[str]:
    text = DOC.read_text()
    assert SECTION in text, f"no {SECTION!r} section in {DOC}"
    text = text.split(SECTION, 1)[1].split("\n### ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_serve_line_parses(tiny_model, bank_path):
    line = blocks("bash")[0].split("#", 1)[0].strip()
    args = line.replace("MODEL", tiny_model).replace("bank.safetensors", bank_path)
    args = args.replace('"$KEY"', API_KEY).split()[2:]  # after "emosteer serve"
    got = subprocess.run([sys.executable, "-m", "emosteer.cli", "serve", *args, "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert "vllm.entrypoints.openai.api_server" in got.stdout and "--api-key" in got.stdout
    assert "VLLM_PLUGINS=" in got.stdout and "emosteer" in got.stdout


def test_curl_block(servers, bank, tmp_path, tiny_model, bank_path):
    from emosteer.request.bank import VectorBank
    from emosteer.request.controlvec import save_control_vector

    cached, _ = servers
    joy = bank.get("joy").clone()
    joy[0] = 0  # llama.cpp's layout has no direction for layer 0
    cv = VectorBank(bank.info)
    cv.add("joy", "residual", joy)
    save_control_vector(cv, "joy", tmp_path / "joy.gguf", model_hint="llama")
    env = dict(os.environ, URL=f"http://127.0.0.1:{cached.port}", KEY=API_KEY, MODEL=tiny_model,
               BANK=bank_path, GGUF=str(tmp_path / "joy.gguf"))
    got = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks("bash")[1]], env=env,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr + got.stdout
    lines, rest, dec = [], got.stdout.strip(), json.JSONDecoder()
    while rest:  # curl prints each body without a newline: decode them one after another
        obj, end = dec.raw_decode(rest)
        lines.append(obj)
        rest = rest[end:].lstrip()
    registered, registered_cv, listing, completion, caps, status, removed = lines
    assert "joy" in registered["registered"] and registered_cv["registered"] == ["joy.cv"]
    assert {"joy", "joy.cv"} <= {v["name"] for v in listing["vectors"]}
    assert completion["choices"][0]["text"]
    assert caps["key"] == "readme-1" and list(caps["residual"]) == ["1"] and len(caps["positions"]) == 1
    assert status["admission"]["slots_in_use"] == 0
    assert removed == {"removed": "joy.cv"}


def test_openai_block(servers, tiny_model, capsys, info):
    pytest.importorskip("openai")
    cached, _ = servers
    ns = {"URL": f"http://127.0.0.1:{cached.port}", "KEY": API_KEY, "MODEL": tiny_model,
          "__name__": "readme_server"}
    exec(compile(blocks("python")[0], str(DOC), "exec"), ns)
    assert tuple(ns["caps"]["heads"][1].shape) == (1, info.num_heads, info.head_dim)
    printed = capsys.readouterr().out
    assert "steer[0].vector" in printed and "nope" in printed
