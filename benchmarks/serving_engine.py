"""The engine processes of bench_serving.py: one vLLM engine per process (plain vLLM or
``emosteer.LLM``), driven by the parent over a JSON-lines protocol.

The parent's ``Worker`` starts this file as a script (``--worker plain|plugin`` and the
engine's settings), in its own process group. The process starts its engine, says hello
(versions, the plugin's settings) on a private copy of its stdout, then answers every
request line on its stdin (a condition, a number of prompts, max tokens) with one reply
line: the tokens generated, the seconds taken, the token ids and the number of captures.
Everything vLLM prints goes to stderr (a log file of the parent's choosing).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
STARTUP_TIMEOUT_S = 3600.0  # compiling on a small CPU takes a while
REQUEST_TIMEOUT_S = 3600.0


# ------------------------------------------------------------------ the engine process
def worker_main(args) -> None:
    """One engine: reads JSON requests from stdin, answers one line each on the private
    protocol fd (the original stdout); stdout itself goes to stderr (vLLM's chatter)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # os.dup: not inherited by children
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        run = _start_engine(args)
    except BaseException as e:  # noqa: BLE001 - report, then exit
        send({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
        return
    send({"ok": True, **run.hello})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        try:
            send({"ok": True, **run(req["condition"], req["n"], req["max_tokens"])})
        except BaseException as e:  # noqa: BLE001 - the parent decides
            send({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
    proto.close()
    run.shutdown()


class _Engine:
    def __init__(self, gen, hello, info, llm):
        self.gen, self.hello, self.info, self.llm = gen, hello, info, llm
        self._prompts: list[str] = []

    def shutdown(self) -> None:
        """Stop vLLM's engine-core process(es) before this process exits."""
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - the parent kills the process group if need be
            pass

    def __call__(self, condition: str, n: int, max_tokens: int) -> dict:
        from bench_e2e import _prompts
        from bench_serving import condition_configs
        from vllm import SamplingParams

        if len(self._prompts) < n:
            self._prompts = _prompts(n)
        prompts = self._prompts[:n]
        cfgs = condition_configs(condition, n, self.info["num_layers"], self.info["num_heads"])
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.gen(prompts, sp, cfgs)
        secs = time.perf_counter() - t0
        ids = [list(o.outputs[0].token_ids) for o in outs]
        caps = sum(getattr(o, "emosteer_captures", None) is not None for o in outs)
        return {"tokens": sum(map(len, ids)), "seconds": secs, "token_ids": ids, "captures": caps}


def _start_engine(args) -> _Engine:
    import torch
    import vllm
    from transformers import AutoConfig

    from emosteer import __version__ as emo_version
    from emosteer.request.bank import ModelInfo

    info = ModelInfo.from_hf_config(AutoConfig.from_pretrained(args.model_path))
    common = dict(dtype=args.worker_dtype, seed=0, max_model_len=args.max_model_len,
                  enforce_eager=args.worker_eager, enable_prefix_caching=args.prefix_caching)
    ld_before = os.environ.get("LD_PRELOAD", "")
    hello = {"vllm": vllm.__version__, "torch": torch.__version__, "emosteer": emo_version,
             "max_slots": "", "impl": ""}
    if args.worker == "plain":
        llm = vllm.LLM(args.model_path, **common)

        def gen(prompts, sp, cfgs):
            return llm.generate(prompts, sp, use_tqdm=False)

        reg = sys.modules.get("emosteer.vllm")
        hello["plugin_loaded"] = bool(reg is not None and getattr(reg, "_registered", False))
    else:
        import emosteer
        from bench_e2e import _bank

        bank, _ = _bank(args.model_path)
        kw = {} if args.max_slots is None else {"max_slots": args.max_slots}
        ellm = emosteer.LLM(args.model_path, bank=bank, **kw, **common)

        def gen(prompts, sp, cfgs):
            steer = None if all(c is None for c in cfgs) else cfgs
            return ellm.generate(prompts, sp, steer=steer, use_tqdm=False)

        hello["max_slots"] = getattr(ellm, "max_slots", args.max_slots or "")
        try:
            hello["impl"] = str(ellm.status()[0].get("impl", ""))
        except Exception:  # noqa: BLE001 - informational only
            pass
        hello["plugin_loaded"] = True
    # vLLM's CPU platform adds libgomp/tcmalloc to LD_PRELOAD for its engine processes.
    hello["ld_preload"] = os.environ.get("LD_PRELOAD", ld_before)
    hello["torch_threads"] = torch.get_num_threads()
    engine = llm if args.worker == "plain" else ellm.llm
    return _Engine(gen, hello, {"num_layers": info.num_layers, "num_heads": info.num_heads}, engine)


# ------------------------------------------------------------------ the parent's handle
class Worker:
    """A child engine process and its JSON-lines channel."""

    def __init__(self, kind: str, model: str, dtype: str, eager: bool, args, env: dict,
                 log_dir: str | None):
        self.kind = f"{kind}/{dtype}/{'eager' if eager else 'compiled'}"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind,
               "--model-path", model, "--worker-dtype", dtype,
               "--max-model-len", str(args.max_model_len)]
        cmd += ["--worker-eager"] if eager else []
        cmd += ["--prefix-caching"] if args.prefix_caching else []
        cmd += [] if args.max_slots is None else ["--max-slots", str(args.max_slots)]
        env = dict(env)
        if kind == "plain":
            env["VLLM_PLUGINS"] = "none"  # an allow-list naming no plugin: emosteer is excluded
        self.log_path = None
        err = None
        if log_dir:
            self.log_path = os.path.join(log_dir, f"{kind}_{dtype}_{'eager' if eager else 'compiled'}.log")
            err = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=err, text=True, bufsize=1,
                                     cwd=os.path.dirname(HERE), start_new_session=True)
        if err is not None:
            err.close()
        self.hello: dict | None = None

    def _fail(self, msg: str) -> RuntimeError:
        tail = ""
        if self.log_path and os.path.exists(self.log_path):
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
            keep = [x for x in lines if "Error" in x or "error" in x or "Traceback" in x][-8:]
            tail = "\n".join(keep or lines[-15:])
            tail = f"\n--- {self.log_path} (excerpt) ---\n{tail}"
        return RuntimeError(f"{self.kind}: {msg}{tail}")

    def recv(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"no reply within {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 5.0))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    self.proc.wait(timeout=30)
                    raise self._fail(f"exited (code {self.proc.returncode})")
                msg = json.loads(line)
                if not msg.get("ok"):
                    raise self._fail(f"{msg.get('error')}\n{msg.get('trace', '')}")
                return msg
            if self.proc.poll() is not None:
                raise self._fail(f"exited (code {self.proc.returncode})")

    def ready(self) -> dict:
        if self.hello is None:
            self.hello = self.recv(STARTUP_TIMEOUT_S)
        return self.hello

    def request(self, condition: str, n: int, max_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"op": "run", "condition": condition, "n": n,
                                          "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return self.recv(REQUEST_TIMEOUT_S)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        self.kill()  # also any engine process left behind in the worker's group

    def kill(self) -> None:
        """SIGKILL this worker's process group (it and the engine processes it spawned)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="one engine process of bench_serving.py")
    ap.add_argument("--worker", choices=("plain", "plugin"), required=True)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--worker-dtype", required=True)
    ap.add_argument("--worker-eager", action="store_true")
    ap.add_argument("--max-model-len", type=int, required=True)
    ap.add_argument("--prefix-caching", action="store_true")
    ap.add_argument("--max-slots", type=int, default=None)
    return ap.parse_args(argv)


if __name__ == "__main__":
    worker_main(parse_args())
