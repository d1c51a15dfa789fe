"""What every benchmark shares: where results go, the description of the machine and of
the code a run measured, the long CSVs the benchmarks append to and read back, and the
matplotlib figure they save.

Standard library at import (torch and matplotlib are imported by the functions that
need them), so the table scripts and the tests import it cheaply.
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")


# ------------------------------------------------------------------ the machine
def machine_info() -> dict:
    """The machine a run measures:

    - ``machine``: the GPU's name, else the CPU model (``/proc/cpuinfo``);
    - ``cores``: ``"<usable by this process>/<all>"``; ``ncpu``: all of them;
    - ``arch``: ``platform.machine()``;
    - ``device``: the GPU's name, else ``cpu-<ncpu>c-<arch>``;
    - ``tag``: ``device`` with spaces as underscores (plot file names).
    """
    arch = platform.machine()
    cpu = platform.processor() or arch
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ncpu = os.cpu_count() or 1
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:
        avail = ncpu
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - no torch: describe the CPU
        pass
    device = gpu or f"cpu-{ncpu}c-{arch}"
    return {"machine": gpu or cpu, "cores": f"{avail}/{ncpu}", "ncpu": ncpu, "arch": arch,
            "device": device, "tag": device.replace(" ", "_")}


def device_name(device) -> str:
    """The kernel benchmarks' device column: the GPU's name, else
    ``cpu-<torch threads>t-<arch>``."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{torch.get_num_threads()}t-{platform.machine()}"


# ------------------------------------------------------------------ the code
def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                          cwd=HERE).stdout.strip()


def git_commit() -> str:
    """The checkout's short commit hash, ``-dirty`` when tracked files are modified;
    '' outside a git checkout."""
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("-dirty" if dirty and sha else "")


def version_string() -> str:
    """``emosteer-<version>+<commit>/torch-<version>``: the kernel benchmarks' version
    column (``src`` for a source tree that is not installed)."""
    import torch

    try:
        from importlib.metadata import version

        ver = version("emosteer")
    except Exception:  # noqa: BLE001 - not installed: still benchmark the source tree
        ver = "src"
    try:
        sha = _git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"emosteer-{ver}{'+' + sha if sha else ''}/torch-{torch.__version__}"


# ------------------------------------------------------------------ host
def host_counters() -> dict:
    """System-wide counters since boot that tell a slow round caused by the host from one
    caused by the code: ``steal_s`` (CPU seconds the hypervisor gave to other guests,
    summed over cores), ``iowait_s`` (seconds cores sat idle waiting on I/O) and
    ``major_faults`` (page faults that had to read from disk, e.g. code or weights the
    kernel had paged out). Linux only; ``{}`` where ``/proc`` is missing. Take one before
    and one after a timed block and subtract (``host_delta``)."""
    try:
        with open("/proc/stat") as f:
            cpu = f.readline().split()
        with open("/proc/vmstat") as f:
            vm = dict(line.split() for line in f if line.startswith("pgmajfault "))
    except OSError:
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    return {"steal_s": int(cpu[8]) / hz, "iowait_s": int(cpu[5]) / hz,
            "major_faults": int(vm.get("pgmajfault", 0))}


def host_delta(before: dict, after: dict) -> dict:
    """``after - before`` per counter of ``host_counters`` (``{}`` if either is empty)."""
    if not before or not after:
        return {}
    return {k: round(after[k] - before[k], 3) for k in before}


def host_disturbed(delta: dict, seconds: float, max_steal: float) -> bool:
    """Whether a timed block of ``seconds`` lost more than ``max_steal`` (a fraction) of
    the machine's CPU time to the hypervisor (``delta`` from ``host_delta``). On a
    shared virtual machine other guests take cores in bursts of seconds; a round with
    most threads in one parallel region then waits on the descheduled core, and the
    round's time says more about the neighbours than about the code. ``max_steal <= 0``
    or no counters: never disturbed."""
    if max_steal <= 0 or not delta or seconds <= 0:
        return False
    return delta["steal_s"] / (seconds * (os.cpu_count() or 1)) > max_steal


# ------------------------------------------------------------------ CSV
def append_csv(rows: Sequence[dict], path: str, columns: Sequence[str]) -> None:
    """Append rows to the long CSV at ``path`` (header written when the file is new);
    every benchmark writes its results through this one function."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(columns):
            # A column was added since the file was written: rewrite it with the new
            # header (the old rows' new cells empty), never mixing two layouts.
            missing = [c for c in header if c not in columns]
            if missing:
                raise ValueError(f"{path} has columns {missing} that this benchmark no longer writes")
            old = read_csv(path)
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(columns))
                writer.writeheader()
                writer.writerows(old)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list[dict]:
    """Every row of the CSV at ``path``, as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ plots
def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Lay out ``fig``, write it to ``path`` (its folder created) and close it."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
