"""Takes the README's screenshot of the playground (docs/playground.png) on a real model:
``emosteer serve`` of MODEL with BANK on loopback, the page in headless Chromium driven by
the browser code of tests/vllm/test_playground.py; a report opened, its preset chosen,
a run of plain vs steered answers at two strengths.

    python scripts/playground_screenshot.py --bank emosteer-report/bank.safetensors \\
        --report emosteer-report/results.json       # what `make demo` writes

Needs Debian's chromium + chromium-driver (bash scripts/install.sh chromium) and selenium.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model folder or 'default'")
    ap.add_argument("--bank", required=True, help="bank of MODEL with the report's vectors")
    ap.add_argument("--report", required=True, help="results.json of emosteer demo (or attribution.json)")
    ap.add_argument("--preset", default="joy.preset", help="preset to choose (from the report or the bank)")
    ap.add_argument("--strengths", default="", help="more strengths, e.g. '4, 8'")
    ap.add_argument("--prompt", default="Describe a walk in the park on a Sunday morning.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("-o", "--out", default=str(ROOT / "docs" / "playground.png"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests" / "vllm"))
    import test_playground as page
    from selenium.webdriver.support.ui import Select
    from vllm_support import Server

    from emosteer.models import resolve_model

    if page._missing():
        print(page._missing(), file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(str(resolve_model(args.model)), str(Path(args.bank).resolve()), False,
                        f"{tmp}/server.log", extra=("--enforce-eager",))
        drv = None
        try:
            server.wait_ready()
            drv = page.start_browser(Path(tmp) / "profile")
            drv.get(f"http://127.0.0.1:{server.port}/emosteer/")
            page.connect(drv)
            page.by_id(drv, "report-file").send_keys(str(Path(args.report).resolve()))
            page.wait_for(drv, lambda d: page.loaded(d, "report") >= 1, "the report")
            Select(page.by_id(drv, "preset")).select_by_value(args.preset)
            page.set_field(drv, "prompt", args.prompt)
            page.set_field(drv, "max-tokens", args.max_tokens)
            page.set_field(drv, "strengths", args.strengths)
            cols = page.run_and_wait(drv, timeout=600)
            failed = [c.text for c in cols if c.get_attribute("data-state") != "done"]
            if failed:
                print(f"a column failed: {failed}", file=sys.stderr)
                return 1
            out = page.shot(drv, Path(tmp), "playground")
            Path(args.out).write_bytes(out.read_bytes())
            print(f"wrote {args.out}")
        finally:
            if drv is not None:
                drv.quit()
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
