"""The one prepared GPU check: what only a GPU can show, in one command that fits a lease.

On a lent GPU machine (no vLLM and no network there; its python3 holds a CUDA build of
torch and Triton), from the repository root::

    python3 benchmarks/gpu_check.py --out "$OUT"            # about 5 minutes on an H200

Steps, each with its own time limit, each logged to ``<out>/<step>.log``; a failing step
is recorded and the next one still runs:

1. ``env``: the card (``nvidia-smi -L``), torch, CUDA and Triton versions.
2. ``build``: ``setup.py build_ext --inplace`` (``emosteer._C`` and ``emosteer._C_cuda``,
   SASS for the card's architecture).
3. ``ops``: the op tests (``tests/ops``): every kernel, the CUDA C++ ones and the
   compiled Triton ones, against the torch reference on random non-zero inputs, odd
   shapes and every dtype, CUDA-graph capture included where the tests have it.
4. ``bench``: ``benchmarks/bench_ops.py`` on the GPU (every op, CUDA vs Triton vs torch)
   into ``<out>/ops_gpu.csv`` and its plot.
5. ``vee``: ``benchmarks/bench_attn_image_boost.py`` on the GPU (the VEE attention
   recompute against plain attention), its CSV copied to ``<out>``.

``<out>/gpu_check.json`` sums it up (card, per step: status, seconds, the log's tail).
Commit the CSVs, plots and the summary under ``benchmarks/results/`` with the card's
name in the file names.

``--dry-run`` runs the same steps on the CPU at their smallest (no build; one op's tests
on the torch reference; bench_ops on one op, one size; the VEE step only checked to
exist): ``make test`` runs it (tests/test_gpu_check.py), so the script cannot rot on
machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def steps(out: str, dry: bool) -> list[tuple[str, list[str], float]]:
    """(name, command, time limit in seconds) of each step."""
    py = sys.executable
    probe = ("import torch, platform; print('python', platform.python_version()); "
             "print('torch', torch.__version__, 'cuda', torch.version.cuda); "
             "print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu');"
             "\ntry:\n import triton; print('triton', triton.__version__)\n"
             "except ImportError:\n print('triton missing')")
    env = [py, "-c", probe]
    if dry:
        return [
            ("env", env, 60),
            ("ops", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                     "tests/ops/test_neuron_gain.py", "-k", "torch and float32"], 300),
            ("bench", [py, os.path.join(HERE, "bench_ops.py"), "--device", "cpu", "--quick",
                       "--ops", "neuron_gain", "--impls", "torch", "--dtypes", "float32",
                       "--tokens", "7", "--csv", os.path.join(out, "ops_gpu.csv"),
                       "--plot", os.path.join(out, "ops_gpu.png")], 300),
            ("vee", [py, os.path.join(HERE, "bench_attn_image_boost.py"), "--help"], 60),
        ]
    return [
        ("env", env, 60),
        ("build", [py, os.path.join(ROOT, "setup.py"), "build_ext", "--inplace"], 600),
        ("ops", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops"], 900),
        ("bench", [py, os.path.join(HERE, "bench_ops.py"), "--device", "cuda", "--csv",
                   os.path.join(out, "ops_gpu.csv"), "--plot", os.path.join(out, "ops_gpu.png")], 600),
        ("vee", [py, os.path.join(HERE, "bench_attn_image_boost.py"), "--full"], 600),
    ]


def run_step(name: str, cmd: list[str], limit: float, out: str, env: dict) -> dict:
    log_path = os.path.join(out, f"{name}.log")
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        log.write((" ".join(cmd) + "\n").encode())
        log.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log_path, "rb") as f:
        tail = f.read()[-1500:].decode(errors="replace")
    return {"step": name, "ok": rc == 0, "returncode": rc, "seconds": round(time.monotonic() - t0, 1),
            "log": os.path.basename(log_path), "tail": tail}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the logs, CSVs, plots and gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at their smallest")
    ap.add_argument("--only", nargs="+", default=None, help="run only these steps")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU visible to torch (use --dry-run on a CPU machine)", file=sys.stderr)
            return 2
        major, minor = torch.cuda.get_device_capability(0)
        env.setdefault("EMOSTEER_CUDA_ARCHS", f"{major}{minor}")
    card = "cpu (dry run)"
    if shutil.which("nvidia-smi") and not a.dry_run:
        card = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    results = []
    for name, cmd, limit in steps(a.out, a.dry_run):
        if a.only and name not in a.only:
            continue
        res = run_step(name, cmd, limit, a.out, env)
        results.append(res)
        print(f"gpu_check: {name:6s} {'ok' if res['ok'] else 'FAILED (' + str(res['returncode']) + ')'} "
              f"in {res['seconds']} s", flush=True)
        if name == "vee" and not a.dry_run:
            src = os.path.join(HERE, "results", "attn_image_boost.csv")
            if os.path.exists(src):
                shutil.copy(src, os.path.join(a.out, "attn_image_boost_gpu.csv"))
    summary = {"card": card, "dry_run": a.dry_run, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "steps": results, "ok": all(r["ok"] for r in results)}
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"gpu_check: {'all steps passed' if summary['ok'] else 'some steps FAILED'}; "
          f"summary in {os.path.join(a.out, 'gpu_check.json')}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
