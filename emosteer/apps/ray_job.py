"""``emosteer generate --ray``: the same JSONL job on Ray Data, one vLLM engine per actor.

The rows not yet in OUT (by ``id``) become a Ray Dataset; ``map_batches`` runs them
through a pool of actors, each hosting an ``emosteer.LLM`` (the plugin is loaded in
every engine process the actor starts) and calling the same ``run_batch`` as the local
path, so a row's output is the same either way. The driver appends each finished
batch to OUT and fsyncs it before taking the next one, in input order. A rerun resumes
from OUT, and a row is written only once. If an actor dies mid-run, Ray restarts it and
retries its unfinished batches (on another node, if its node is gone). If the driver
itself dies, the rerun skips every row already written. At the end the driver prints,
per node, the rows it wrote from that node and their engine time (rows/s).

Why actors hosting ``emosteer.LLM`` rather than ``ray.data.llm``'s processor: the
processor's engine stage returns text only, while a row here also needs emosteer's
per-request error (a request the engine could not apply must not be written as if it
had run). Its ``sampling_params.extra_args`` would carry the config.

``address``: a running cluster (``ray start --head`` on one machine, ``ray start
--address=...`` on the others); None starts a local one. Every machine needs this
package installed (the workers import it).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from emosteer.apps.generate import GenerateConfig, append_lines, pending_rows, run_batch

# The engine settings every actor's process needs (the driver's own values win).
_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU", "TOKENIZERS_PARALLELISM",
        "VLLM_LOGGING_LEVEL", "EMOSTEER_IMPL", "EMOSTEER_BANK", "VLLM_PLUGINS")


class NarrativeWorker:
    """A Ray Data actor: one ``emosteer.LLM``, many batches."""

    def __init__(self, cfg: dict):
        from emosteer.apps.generate import _start_llm

        self.cfg = GenerateConfig(**cfg)
        # The engine runs inside this actor's process (no engine-core or worker child
        # process): an actor that is killed, or whose node is lost, leaves no engine
        # process behind holding its memory. (vLLM's Ray executor refuses the CPU
        # platform, and one engine per actor needs no executor of its own.)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.llm = _start_llm(self.cfg, distributed_executor_backend="uni")

    def __call__(self, batch: dict) -> dict:
        import ray

        t0 = time.perf_counter()
        rows = [json.loads(s) for s in batch["row"]]
        records, failed = run_batch(self.llm, rows, self.cfg)
        seconds = time.perf_counter() - t0
        by_id = {str(r["id"]): r for r in records}
        lines, errors = [], []
        for r in rows:
            rid = str(r["id"])
            lines.append(json.dumps(by_id[rid], ensure_ascii=False) if rid in by_id else "")
            errors.append(failed.get(rid, ""))
        node = ray.get_runtime_context().get_node_id()
        # Each row carries its batch's node and time (the batch's time on its first row
        # only, so that summing over rows gives the engine time per node).
        return {"id": [str(r["id"]) for r in rows], "line": lines, "error": errors,
                "node": [node] * len(rows), "seconds": [seconds] + [0.0] * (len(rows) - 1)}


class NodeStats:
    """Rows written and engine seconds per Ray node, for the per-node throughput line."""

    def __init__(self):
        self.rows: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, node: str, rows: int, seconds: float) -> None:
        self.rows[node] = self.rows.get(node, 0) + rows
        self.seconds[node] = self.seconds.get(node, 0.0) + seconds

    def lines(self) -> list[str]:
        out = []
        for node in sorted(self.rows):
            n, t = self.rows[node], self.seconds[node]
            rate = f"{n / t:.2f} rows/s" if t > 0 else "n/a"
            out.append(f"node {node[:12]}: {n} rows in {t:.1f} s of engine time ({rate})")
        return out


def generate_jsonl_ray(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    cfg: GenerateConfig,
    workers: int = 1,
    address: str | None = None,
    cpus_per_worker: float = 1.0,
    progress: bool = True,
) -> int:
    """Generate every row of ``in_path`` not yet in ``out_path`` on Ray Data; returns
    rows written. Raises ``EmosteerRequestError`` naming the rows the engine could not
    apply (written rows stay; a rerun retries exactly the failed ones)."""
    import ray
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    rows, todo = pending_rows(in_path, out_path)
    if not todo:
        return 0
    env = {k: os.environ[k] for k in _ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env}, ignore_reinit_error=True)
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # OUT in input order, like the local path
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"row": json.dumps(r, ensure_ascii=False)} for r in todo],
                                 override_num_blocks=max(1, math.ceil(len(todo) / cfg.batch_size)))
        results = ds.map_batches(
            NarrativeWorker,
            fn_constructor_kwargs={"cfg": asdict(cfg)},
            batch_size=cfg.batch_size,
            batch_format="numpy",
            # Ray Data's actor pools restart a dead actor and retry its batches by default.
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
        )
        written = 0
        failed: dict[str, str] = {}
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="generate (ray)",
                   unit="row", disable=not progress)
        seen: set[str] = set()  # rows already in OUT are not in todo
        stats = NodeStats()
        with open(out_path, "a", encoding="utf-8") as f:
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                lines = []
                for rid, line, error, node, sec in zip(batch["id"], batch["line"], batch["error"],
                                                       batch["node"], batch["seconds"]):
                    rid = str(rid)
                    stats.add(str(node), 0, float(sec))  # engine time, written or not
                    if rid in seen:  # a retried batch never writes a row twice
                        continue
                    if error:
                        failed[rid] = str(error)
                        continue
                    seen.add(rid)
                    lines.append(str(line))
                    stats.add(str(node), 1, 0.0)
                append_lines(f, lines)
                written += len(lines)
                bar.update(len(batch["id"]))
        bar.close()
        for line in stats.lines():  # throughput per node, on the driver's stderr
            print(f"emosteer generate (ray): {line}", file=sys.stderr, flush=True)
    finally:
        if started_here:
            ray.shutdown()
    if failed:
        from emosteer.llm import EmosteerRequestError

        raise EmosteerRequestError(failed)
    return written


__all__ = ["generate_jsonl_ray", "NarrativeWorker", "NodeStats"]
