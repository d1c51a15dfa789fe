"""``emosteer.LLM``: vLLM's offline ``LLM`` with per-request steering and captures.

A thin wrapper: it starts a ``vllm.LLM`` with emosteer's settings in
``additional_config``, checks every request config before anything reaches the engine,
puts each config into its request's ``SamplingParams.extra_args`` and runs every prompt
in one call: the engine's scheduler admits a steered request when its slot is free (the
others wait in vLLM's queue, see ``emosteer/vllm/admission.py``). Each ``RequestOutput``
gets ``.emosteer_captures`` (fetched from the workers) and ``.emosteer_error`` (None, or
why the engine stopped that request instead of running it without its interventions).
Everything else is plain vLLM; ``.llm`` is the wrapped engine.
"""

from __future__ import annotations

import copy
import os
import uuid
from typing import Any

from emosteer.request.bank import VectorBank
from emosteer.request.spec import SteerSpec
from emosteer.vllm.frontend import EXTRA_KEY, RESULT_KEY, FrontendSteering, frontend_for
from emosteer.vllm.results import merge_results


class EmosteerRequestError(RuntimeError):
    """Requests whose interventions could not be applied in the engine (each was stopped,
    none ran without them); ``.errors`` maps prompt index -> message. Raised by
    ``LLM.generate(..., raise_on_error=True)``; by default errors are attached to the
    outputs instead."""

    def __init__(self, errors: "dict[int | str, str]"):
        self.errors = errors
        lines = "; ".join(f"prompt {i}: {m}" for i, m in sorted(errors.items(), key=lambda kv: str(kv[0]))[:5])
        super().__init__(f"{len(errors)} request(s) failed in the engine: {lines}")


class LLM:
    """``emosteer.LLM(model, bank=None, max_slots=256, **vllm_kwargs)``.

    ``bank``: a bank file path or a ``VectorBank``, registered in every worker right
    after start-up (``EMOSTEER_BANK`` also works: workers load it at start-up). ``capture_rows``: rows of the per-step capture buffer
    (default 4096). Other keyword arguments go to ``vllm.LLM``.
    """

    def __init__(
        self,
        model: str,
        bank: "str | os.PathLike | VectorBank | None" = None,
        max_slots: int = 256,
        capture_rows: int | None = None,
        **vllm_kwargs: Any,
    ):
        import vllm

        from emosteer.vllm import register

        register()  # vLLM loads the plugin itself; this makes it explicit and early
        additional = dict(vllm_kwargs.pop("additional_config", None) or {})
        settings = dict(additional.get(EXTRA_KEY) or {})
        settings["max_slots"] = int(max_slots)
        if capture_rows is not None:
            settings["capture_rows"] = int(capture_rows)
        additional[EXTRA_KEY] = settings
        self.max_slots = int(max_slots)
        # The bank is registered after start-up rather than named in additional_config:
        # that config is part of vLLM's compile-cache key, and a new bank file must not
        # cost a recompile. (Servers may name one there, or set EMOSTEER_BANK.)
        if isinstance(bank, (str, os.PathLike)):
            bank = VectorBank.load(bank)
        self.llm = vllm.LLM(model, additional_config=additional, **vllm_kwargs)
        self.frontend  # built now, with the settings and EMOSTEER_BANK the workers saw
        if bank is not None:
            self.register_vectors(bank)

    # -- bank ------------------------------------------------------------------------
    @property
    def frontend(self) -> FrontendSteering:
        ip = self.llm.llm_engine.input_processor
        return frontend_for(ip, self.llm.llm_engine.vllm_config)

    @property
    def bank(self) -> VectorBank:
        """The bank as the front end sees it (the workers hold the same entries)."""
        return self.frontend.bank

    def register_vectors(self, bank: "VectorBank | str | os.PathLike") -> list[str]:
        """Add (or replace) bank entries in every worker and in the front end."""
        if not isinstance(bank, VectorBank):
            bank = VectorBank.load(bank)
        data = self.frontend.registration(bank)
        # Workers first, then the front end: a request accepted before the switch is
        # pinned to the old contents (which workers keep), one accepted after finds the new.
        results = self.llm.collective_rpc("emosteer_rpc", args=("register", data))
        self.frontend.bank.update(bank)
        return list(results[0])

    def status(self) -> list[dict]:
        """Per-worker state (requests, bank names, impl ...), each with ``"admission"``:
        the scheduler's slots and pool rows in use and the requests waiting for them."""
        workers = self.llm.collective_rpc("emosteer_rpc", args=("status",))
        admission = self.admission_status()
        for w in workers:
            w["admission"] = admission
        return workers

    def admission_status(self) -> dict | None:
        """The scheduler's admission state: ``slots_in_use``, ``waiting_for_slots``,
        ``pool_rows_in_use`` ... (None if the engine runs without the plugin)."""
        client = self.llm.llm_engine.engine_core
        if hasattr(client, "call_utility"):
            return client.call_utility("emosteer_status")
        # The in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): its EngineCore itself.
        return client.engine_core.emosteer_status()

    # -- generation ------------------------------------------------------------------
    def generate(
        self,
        prompts: Any,
        sampling_params: Any = None,
        steer: Any = None,
        use_tqdm: bool = True,
        raise_on_error: bool = False,
        **kwargs: Any,
    ) -> list:
        """Like ``vllm.LLM.generate``; ``steer`` is None, one spec (dict, JSON string or
        SteerSpec) for every prompt, or a list with one per prompt (None = plain).
        Raises SpecError (naming the field) before anything runs on a bad config. A
        request the engine could not apply comes back with ``.emosteer_error`` set (and
        no text generated without its interventions); ``raise_on_error=True`` raises
        ``EmosteerRequestError`` instead."""
        from vllm import SamplingParams

        single = isinstance(prompts, (str, dict))
        plist = [prompts] if single else list(prompts)
        n = len(plist)
        if isinstance(steer, (list, tuple)):
            if len(steer) != n:
                raise ValueError(f"steer has {len(steer)} entries for {n} prompts")
            raw = list(steer)
        else:
            raw = [steer] * n
        if sampling_params is None:
            sampling_params = self.llm.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sps = [sampling_params] * n
        else:
            sps = list(sampling_params)
            if len(sps) != n:
                raise ValueError(f"sampling_params has {len(sps)} entries for {n} prompts")
        fe = self.frontend
        specs: list[SteerSpec | None] = []
        for i, r in enumerate(raw):
            spec = None if r is None else fe.check(r, None, sps[i].max_tokens)
            if spec is not None and spec.intervenes():
                fe.plan(spec)  # SpecError now if it could never be admitted
            specs.append(None if spec is None or spec.is_empty() else spec)
        params, keys = [], []
        for sp, spec in zip(sps, specs):
            if spec is None:
                params.append(sp)
                keys.append(None)
                continue
            # A shallow copy with its own extra_args: vLLM deep-copies the parameters of
            # every request itself (InputProcessor.process_inputs), so a deep copy here
            # would be a second one (about 1 ms a request on this CPU).
            sp = copy.copy(sp)
            key = uuid.uuid4().hex
            sp.extra_args = {**(sp.extra_args or {}), EXTRA_KEY: spec.to_dict(), RESULT_KEY: key}
            params.append(sp)
            keys.append(key)
        # The workers park at most keep_captures unfetched results: a call with more
        # capturing requests runs in parts of at most that many, each fetched at once.
        ns = [int(getattr(sp, "n", 1) or 1) for sp in params]
        limit = max(1, self.frontend.settings.keep_captures)
        outs: list = []
        errors: dict[int, str] = {}
        lo = 0
        while lo < n:
            hi, count = lo, 0
            while hi < n and (hi == lo or count + (ns[hi] if keys[hi] else 0) <= limit):
                count += ns[hi] if keys[hi] else 0
                hi += 1
            part = {k: (v[lo:hi] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
            got_outs = self.llm.generate(plist[lo:hi], params[lo:hi], use_tqdm=use_tqdm, **part)
            self._attach(got_outs, keys[lo:hi], ns[lo:hi], specs[lo:hi], lo, errors)
            outs += got_outs
            lo = hi
        if errors and raise_on_error:
            raise EmosteerRequestError(errors)
        return outs

    def _attach(self, outs: list, keys: list, ns: list[int], specs: list, offset: int,
                errors: dict[int, str]) -> None:
        """Fetch the results of ``outs`` (one part of a call) and set their
        ``.emosteer_captures`` / ``.emosteer_error``; errors land in ``errors`` by index in
        the whole call. A request that asked for captures and has none to fetch gets an
        error: its captures were dropped (never a silent None)."""
        # n > 1: each sample has its own results, under "<key>#<sample index>".
        sample_keys = [None if k is None else ([k] if m == 1 else [f"{k}#{j}" for j in range(m)])
                       for k, m in zip(keys, ns)]
        wanted = [k for ks in sample_keys if ks for k in ks]
        fetched = self._fetch(wanted) if wanted else {}
        for i, out in enumerate(outs):
            got = [fetched.get(k) for k in sample_keys[i]] if sample_keys[i] else []
            caps = [g["captures"] if g else None for g in got]
            if ns[i] == 1:
                out.emosteer_captures = caps[0] if caps else None
            else:  # one capture set per sample, in CompletionOutput.index order
                out.emosteer_captures = caps if any(c is not None for c in caps) else None
                for c in out.outputs:
                    c.emosteer_captures = caps[c.index] if caps else None
            error = next((g["error"] for g in got if g and g["error"]), None)
            if error is None and keys[i] is not None and any(
                c.finish_reason == "error" for c in out.outputs
            ):
                stops = [c.stop_reason for c in out.outputs
                         if isinstance(c.stop_reason, str) and c.stop_reason.startswith("emosteer: ")]
                error = (stops[0][len("emosteer: "):] if stops
                         else "the engine stopped this request (see the engine log)")
            if (error is None and keys[i] is not None and specs[i] is not None
                    and specs[i].capture is not None and any(g is None for g in got)):
                error = ("its captures were dropped before they could be fetched (the workers keep "
                         "keep_captures unfetched results for capture_ttl_s seconds); nothing was returned")
            out.emosteer_error = error
            if error is not None:
                errors[offset + i] = error

    def _fetch(self, keys: list[str]) -> dict[str, dict]:
        """key -> {"error", "captures"}: worker results merged over TP ranks."""
        wkeys = self.frontend.worker_keys(keys)
        per_rank = self.llm.collective_rpc("emosteer_rpc", args=("fetch", list(wkeys.values())))
        for key in keys:
            self.frontend.release_key(key.split("#", 1)[0])
        return merge_results(per_rank, wkeys)

    def __getattr__(self, name: str) -> Any:
        # Anything else (get_tokenizer, collective_rpc, chat ...) is vLLM's.
        if name == "llm":
            raise AttributeError(name)
        return getattr(self.llm, name)


__all__ = ["LLM", "EmosteerRequestError"]
