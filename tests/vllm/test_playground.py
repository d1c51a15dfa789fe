"""The browser playground (``GET /emosteer/`` of ``emosteer serve``) in headless Chromium
(Debian's chromium + chromium-driver, driven by Selenium) against the real server on
loopback: the tiny Llama of the shared ``servers`` (conftest), no mock anywhere.

One page, one browser, its states in order: the page loads and asks for the key; the
vector list is the API's; an invalid strength shows the server's 400 at the strength
field; a run streams plain and steered answers side by side, token by token, equal to the
same requests made without the page, with the server's scores; an upload appears in the
list (an oversized one shows the 413 at the file control); a demo results.json renders
as heatmaps whose hover shows layer, head, recovery and CI and whose click adds the
head to the config. Each state is screenshotted into the test's tmp dir;
scripts/playground_screenshot.py takes the README's (docs/playground.png) on a real model
with the browser code here.

Skips, saying why, where Chromium, its driver or Selenium is missing
(``bash scripts/install.sh chromium`` installs them on Debian; ``make test`` does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from vllm_support import API_KEY

ROOT = Path(__file__).resolve().parents[2]
DEMO_RESULTS = ROOT / "benchmarks" / "results" / "demo" / "results.json"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1440,1000")
PROMPT = "Tell me about the weather."


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    """Why the browser tests cannot run here (checked before any server starts)."""
    if not CHROMIUM or not CHROMEDRIVER:
        return ("no Chromium: the playground's browser tests need Debian's chromium and chromium-driver "
                "(bash scripts/install.sh chromium; make test installs them)")
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


browser_test = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def start_browser(profile: Path):
    """Headless Chromium driven by Selenium, with a fresh profile (also used by
    scripts/playground_screenshot.py)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    drv.set_page_load_timeout(60)
    return drv


def connect(drv, key: str = API_KEY) -> None:
    """Enter the API key in the open page and wait for its vectors and status."""
    set_field(drv, "api-key", key)
    by_id(drv, "connect").click()
    wait_for(drv, lambda d: loaded(d, "vector-table") >= 1 and loaded(d, "status") >= 1, "vectors and status")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    drv = start_browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("playground-screens")


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]  # the cached server: --upload-mib 1


def wait_for(drv, cond, what: str, timeout: float = 120.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout, poll_frequency=0.05).until(lambda d: cond(d), message=what)


def by_id(drv, id_):
    return drv.find_element("id", id_)


def err_at(drv, control: str) -> str:
    return drv.find_element("css selector", f'.err[data-for="{control}"]').text


def set_field(drv, id_, value) -> None:
    el = by_id(drv, id_)
    el.clear()
    el.send_keys(str(value))


def loaded(drv, id_) -> int:
    return int(by_id(drv, id_).get_attribute("data-loaded") or 0)


def shot(drv, shots: Path, name: str) -> Path:
    """The whole page (not only the window) as shots/name.png."""
    path = Path(shots) / f"{name}.png"
    w, h = drv.execute_script("const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]")
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False})
    try:
        assert drv.save_screenshot(str(path)), path
    finally:
        drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


def run_and_wait(drv, timeout: float = 300):
    drv.execute_script("document.getElementById('outputs').dataset.state = ''")
    by_id(drv, "run").click()
    wait_for(drv, lambda d: by_id(d, "outputs").get_attribute("data-state") == "done", "the run to end", timeout)
    return drv.find_elements("css selector", "#outputs .column")


@browser_test
def test_page_loads_asks_for_the_key_and_connects(server, browser, shots):
    base = f"http://127.0.0.1:{server.port}"
    for path in ("/emosteer/", "/emosteer/app.js", "/emosteer/style.css"):  # public static files
        with urllib.request.urlopen(base + path, timeout=30) as r:
            assert r.status == 200 and r.read(), path
    for method, path in (("GET", "/v1/emosteer/score"), ("POST", "/v1/emosteer/score")):
        with pytest.raises(urllib.error.HTTPError) as e:  # ... but what it calls needs the key
            urllib.request.urlopen(urllib.request.Request(base + path, b"{}" if method == "POST" else None,
                                                          method=method), timeout=30)
        assert e.value.code == 401
    status, body = server.post("/v1/emosteer/score", {"texts": ["so happy"], "target": "bliss"})
    assert status == 400 and body["error"]["param"] == "target", body
    status, body = server.post("/v1/emosteer/score", {"texts": "so happy"})
    assert status == 400 and body["error"]["param"] == "texts", body
    browser.get(base + "/emosteer")  # redirected to /emosteer/
    wait_for(browser, lambda d: "401" in err_at(d, "connect"), "the page to say the key is missing")
    assert "api-key" in err_at(browser, "connect")
    shot(browser, shots, "0-no-key")
    connect(browser)
    assert err_at(browser, "connect") == ""
    info = server.get("/v1/emosteer/vectors")[1]["model"]
    assert f"{info['num_layers']} layers" in by_id(browser, "model").text
    assert by_id(browser, "layer-hi").get_attribute("max") == str(info["num_layers"] - 1)
    assert "slots in use" in by_id(browser, "status").text
    shot(browser, shots, "1-connected")


@browser_test
def test_vector_list_is_the_apis(server, browser):
    status, listing = server.get("/v1/emosteer/vectors")
    assert status == 200, listing
    rows = [[c.text for c in tr.find_elements("tag name", "td")]
            for tr in browser.find_elements("css selector", "#vector-table tbody tr")]
    assert [r[:3] for r in rows] == [[v["name"], v["kind"], f"[{', '.join(map(str, v['shape']))}]"]
                                     for v in listing["vectors"]]
    boxes = browser.find_elements("css selector", "#vectors input[type=checkbox]")
    assert [b.get_attribute("value") for b in boxes] == [v["name"] for v in listing["vectors"]
                                                          if v["kind"] == "residual"]
    neuron_sets = [o.get_attribute("value") for o in browser.find_elements("css selector", "#neuron-set option")]
    assert neuron_sets == [""] + [v["name"] for v in listing["vectors"] if v["kind"] == "neurons"]


@browser_test
def test_invalid_strength_shows_the_servers_error_at_the_field(server, browser, shots):
    set_field(browser, "prompt", PROMPT)
    set_field(browser, "max-tokens", 16)
    set_field(browser, "strength", "1e6")
    run_and_wait(browser)
    shot(browser, shots, "3-bad-strength")
    err = err_at(browser, "strength")
    assert "steer[0].scale" in err and "400" in err, err
    assert "bad" in by_id(browser, "strength").get_attribute("class")
    assert err_at(browser, "run") == ""  # the plain column ran
    plain, steered = browser.find_elements("css selector", "#outputs .column")
    assert plain.get_attribute("data-state") == "done" and steered.get_attribute("data-state") == "error"


def _chat(server, cfg, max_tokens: int) -> str:
    body = {"model": server.model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0}
    if cfg is not None:
        body["vllm_xargs"] = {"emosteer": json.dumps(cfg)}
    status, out = server.post("/v1/chat/completions", body)
    assert status == 200, out
    return out["choices"][0]["message"]["content"]


@browser_test
def test_run_streams_plain_and_steered_side_by_side(server, browser, shots):
    import jsonschema

    from emosteer.playground import score_texts
    from emosteer.request.schema import json_schema

    set_field(browser, "strength", 1)  # the tiny model answers nothing printable at 4
    wait_for(browser, lambda d: '"scale": 1' in by_id(d, "config").get_attribute("value"), "the config")
    cfg = json.loads(by_id(browser, "config").get_attribute("value"))
    jsonschema.validate(cfg, json_schema())  # what the page builds is a valid request config
    assert [s["vector"] for s in cfg["steer"]] == ["joy"] and cfg["steer"][0]["scale"] == 1
    set_field(browser, "strengths", "0.5")  # one more column: a third request at another strength
    plain, steered, half = run_and_wait(browser)
    shot(browser, shots, "2-run")
    assert [c.get_attribute("data-label") for c in (plain, steered, half)] == ["plain", "strength 1", "strength 0.5"]
    texts = []
    for col in (plain, steered, half):
        assert col.get_attribute("data-state") == "done", col.text
        assert col.find_element("class name", "col-err").text == ""
        chunks = int(col.find_element("class name", "metrics").text.split(" chunks")[0])
        assert chunks > 1, col.text  # streamed token by token, not in one piece
        texts.append(browser.execute_script("return arguments[0].textContent",
                                            col.find_element("class name", "text")))
    # The same requests without the page: the answers the page showed.
    cfg_half = {"steer": [{**cfg["steer"][0], "scale": 0.5}]}
    assert texts == [_chat(server, None, 16), _chat(server, cfg, 16), _chat(server, cfg_half, 16)]
    assert texts[0] != texts[1]
    # The numbers under each answer are the analysis package's for that text.
    target = by_id(browser, "target").get_attribute("value")
    for col, text, want in zip((plain, steered, half), texts, score_texts(texts, target)):
        got_hit = col.get_attribute("data-hit-rate")
        assert (None if got_hit == "" else float(got_hit)) == want["hit_rate"]
        assert float(col.get_attribute("data-rep3")) == want["rep3"]
        marks = [m.get_attribute("textContent") for m in col.find_elements("css selector", "mark.emo")]
        assert marks == [text[s:e] for s, e, _ in want["words"]]
    assert err_at(browser, "run") == "" and err_at(browser, "strength") == ""
    set_field(browser, "strengths", "")


def test_scores_mark_the_lexicons_words():
    """The scores the page shows on text with emotion words (the tiny model's text has
    few): offsets in code points, negation honoured, the fluency module's 3-grams."""
    from emosteer.analysis.emotion import hit_rate
    from emosteer.analysis.fluency import repeated_ngram_share
    from emosteer.playground import score_texts

    text = "😀 She was HAPPY, not sad; happy happy happy happy."
    (got,) = score_texts([text], "joy")
    assert [text[s:e] for s, e, _ in got["words"]] == ["HAPPY", "happy", "happy", "happy", "happy"]
    assert got["hit_rate"] == hit_rate(text, "joy") == 1.0
    assert got["rep3"] == repeated_ngram_share(text, 3) > 0
    with pytest.raises(ValueError):
        score_texts([text], "bliss")


@browser_test
def test_upload_appears_in_the_list_and_remove_takes_it_out(server, browser, info, tmp_path, shots):
    import torch

    from emosteer.request.bank import VectorBank

    def names():
        return [tr.find_element("tag name", "td").text
                for tr in browser.find_elements("css selector", "#vector-table tbody tr")]

    bank = VectorBank(info)
    bank.add("pg.up", "residual", torch.randn(info.num_layers, info.hidden_size))
    path = tmp_path / "pg.safetensors"
    bank.save(str(path))
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (2 * 2**20))  # over the server's --upload-mib 1
    by_id(browser, "upload-file").send_keys(str(big))
    by_id(browser, "upload").click()
    wait_for(browser, lambda d: err_at(d, "upload-file") != "", "the 413 at the file control")
    assert "413" in err_at(browser, "upload-file") and "upload_mib" in err_at(browser, "upload-file")
    shot(browser, shots, "4-too-big")
    try:
        n = loaded(browser, "vector-table")
        by_id(browser, "upload-file").send_keys(str(path))
        by_id(browser, "upload").click()
        wait_for(browser, lambda d: loaded(d, "vector-table") > n, "the list after the upload")
        assert "registered pg.up" in by_id(browser, "upload-done").text
        assert err_at(browser, "upload-file") == ""
        assert "pg.up" in names()
        assert names() == [v["name"] for v in server.get("/v1/emosteer/vectors")[1]["vectors"]]
        shot(browser, shots, "5-uploaded")
        n = loaded(browser, "vector-table")
        row = next(tr for tr in browser.find_elements("css selector", "#vector-table tbody tr")
                   if tr.find_element("tag name", "td").text == "pg.up")
        row.find_element("tag name", "button").click()
        browser.switch_to.alert.accept()
        wait_for(browser, lambda d: loaded(d, "vector-table") > n, "the list after the removal")
        assert "pg.up" not in names()
        assert names() == [v["name"] for v in server.get("/v1/emosteer/vectors")[1]["vectors"]]
    finally:
        server.request("DELETE", "/v1/emosteer/vectors/pg.up")  # 404 once the page removed it


@browser_test
def test_report_heatmaps_hover_and_click_adds_a_head(browser, shots):
    import jsonschema
    from selenium.webdriver.common.action_chains import ActionChains

    from emosteer.request.schema import json_schema

    results = json.loads(DEMO_RESULTS.read_text())
    maps = results["head_maps"]["maps"]["joy"]
    L, H = len(maps["recovery"]), len(maps["recovery"][0])
    by_id(browser, "report-file").send_keys(str(DEMO_RESULTS))
    wait_for(browser, lambda d: loaded(d, "report") >= 1, "the report's heatmaps")
    depth = browser.execute_script("return state.info.num_layers")
    assert err_at(browser, "report-file") == (  # the demo's model is not the tiny test model
        f"results.json is of a model with {L} layers; the server's has {depth}: its layers and heads "
        "do not apply here")
    profile = browser.find_elements("css selector", "#layer-profile td.cell")
    assert len(profile) == len(results["emotions"]["joy"]["layer_profile"]["layers"])
    recovery = browser.find_element("css selector", 'table.head-map[data-map="0"]')
    assert len(recovery.find_elements("css selector", "td.cell")) == L * H
    top = {tuple(t) for t in results["head_maps"]["top"]["joy"]}
    boxed = {(int(c.get_attribute("data-row")), int(c.get_attribute("data-col")))
             for c in recovery.find_elements("css selector", "td.top")}
    assert boxed == top
    layer, head = sorted(top)[0]
    cell = recovery.find_element("css selector", f'td[data-row="{layer}"][data-col="{head}"]')
    ActionChains(browser).move_to_element(cell).perform()
    wait_for(browser, lambda d: by_id(d, "tip").is_displayed(), "the tooltip")
    tip = by_id(browser, "tip").text
    lo, hi = maps["ci95"][layer][head]
    assert tip == (f"layer {layer}, head {head}: patching recovery {maps['recovery'][layer][head]:.4f} "
                   f"(95 % CI {lo:.4f} – {hi:.4f})"), tip
    shot(browser, shots, "6-report-hover")
    cell.click()
    assert f"layer {layer}, head {head} is not in the served model" in err_at(browser, "heads")
    cfg = json.loads(by_id(browser, "config").get_attribute("value"))
    assert cfg["heads"] == [{"layer": layer, "head": head, "mode": "scale", "scale": 2}]
    jsonschema.validate(cfg, json_schema())
    assert "joy.preset" in [o.get_attribute("value") for o in browser.find_elements("css selector", "#preset option")]
    shot(browser, shots, "7-report-head-added")
