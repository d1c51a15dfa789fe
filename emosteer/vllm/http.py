"""emosteer's HTTP routes on vLLM's OpenAI server: vectors, captures and status.

Loaded by vLLM as the ``vllm.endpoint_plugins`` entry ``emosteer`` (only when
``VLLM_PLUGINS`` names it; ``emosteer serve`` sets it). The routes sit under ``/v1``, so
vLLM's ``--api-key`` guards them like the OpenAI routes. Their engine side is the
``emosteer_rpc`` worker method that the general plugin installs
(``emosteer/vllm/patches/worker_base.py``) and the scheduler's ``emosteer_status``.

Routes (errors are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``):

``POST /v1/emosteer/vectors?name=&format=&convention=&scale=``
    Body: a bank file (safetensors, as ``emosteer extract`` writes) or a GGUF control
    vector (llama.cpp / repeng / EasySteer). ``format`` is ``auto`` (by magic bytes),
    ``safetensors`` or ``gguf``. A GGUF file needs ``name``; a single-entry bank may be
    renamed by it. At most ``upload_mib`` MiB (plugin setting). Checked against the
    served model before anything changes. Every worker registers the new contents
    first, then the front end switches: a request accepted before the switch runs with
    the old contents (workers keep them), one accepted after with the new.
``GET /v1/emosteer/vectors``
    Names, kinds, shapes, content hashes and metadata, and the model they fit.
``DELETE /v1/emosteer/vectors/{name}``
    New requests naming it are refused at once; requests accepted before finish with
    the contents they were accepted with (deferred removal).
``GET /v1/emosteer/captures/{key}?format=json|safetensors&wait=<s>``
    The captures (and the error, if the engine failed the request) of the request that
    set ``vllm_xargs.emosteer_key = key``. Fetchable once, after its answer is
    complete (``wait`` seconds, at most 60, to wait for that; else 409); kept at most
    ``capture_ttl_s`` seconds and ``keep_captures`` requests.
``GET /v1/emosteer/status``
    Slots, pool rows, capture rows in use, requests waiting for them, the bank, and
    per-worker state.
``POST /v1/emosteer/score``
    Body ``{"texts": [...], "target": "joy"}``: per text its emotion words (character
    offsets), the target's hit rate and the repeated 3-gram share (the analysis
    package's definitions, ``emosteer.playground.score_texts``); ``GET`` lists the targets.
``GET /emosteer/``
    The browser playground (``emosteer/playground/static``): a public static page whose
    calls to the routes above carry the API key the user enters in it.

No code travels in any request or upload: uploads are safetensors or GGUF tensors only.
"""


import asyncio
import json
import logging
import time
from typing import Any

logger = logging.getLogger("emosteer.vllm")

ROUTE = "/v1/emosteer"
MAX_WAIT_S = 60.0
MAX_SCORE_BYTES = 2**20
PAGE = "/emosteer"


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


_TYPES = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError",
          413: "PayloadTooLargeError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


def _error_response(e: HTTPError):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        status_code=e.status,
        content={"error": {"message": e.message, "type": _TYPES.get(e.status, "Error"),
                           "param": e.param, "code": e.status}},
    )


class Service:
    """The state behind the routes, one per API-server process."""

    def __init__(self, engine_client: Any, args: Any):
        from emosteer.vllm.frontend import frontend_for

        self.engine = engine_client
        self.fe = frontend_for(engine_client.input_processor, engine_client.vllm_config)
        self.lock = asyncio.Lock()  # one registration or removal at a time
        count = getattr(args, "api_server_count", 1) or 1
        self.single_front_end = int(count) <= 1

    # -- helpers -----------------------------------------------------------------------
    async def rpc(self, op: str, payload: Any = None) -> list:
        return await self.engine.collective_rpc("emosteer_rpc", args=(op, payload))

    def _mutable(self) -> None:
        if not self.single_front_end:
            raise HTTPError(409, "vectors cannot be changed over HTTP with --api-server-count > 1 "
                                 "(each API process holds its own front end); register them at "
                                 "start-up with --bank")

    # -- vectors -----------------------------------------------------------------------
    def parse_upload(self, data: bytes, name: str | None, fmt: str, convention: str | None,
                     scale: float | None):
        from emosteer.request.bank import BankError, VectorBank
        from emosteer.request.spec import SpecError
        from emosteer.vllm.frontend import check_name

        if fmt not in ("auto", "safetensors", "gguf"):
            raise HTTPError(400, f"format must be auto, safetensors or gguf, got {fmt!r}", "format")
        if not data:
            raise HTTPError(400, "the upload is empty: send the file as the request body", "body")
        try:
            if name is not None:
                check_name(name, "name")
        except SpecError as e:
            raise HTTPError(400, str(e), "name") from None
        is_gguf = data[:4] == b"GGUF"
        if fmt == "auto":
            fmt = "gguf" if is_gguf else "safetensors"
        if fmt == "gguf" and not is_gguf:
            raise HTTPError(400, "format=gguf but the body does not start with the GGUF magic", "body")
        try:
            if fmt == "gguf":
                if name is None:
                    raise HTTPError(400, "a GGUF control vector needs ?name= to register it under", "name")
                from emosteer.request.controlvec import load_control_vector

                kw = {}
                if convention is not None:
                    kw["convention"] = convention
                if scale is not None:
                    kw["scale"] = scale
                bank = load_control_vector(bytes(data), self.fe.info, name, **kw)
            else:
                if convention is not None or scale is not None:
                    raise HTTPError(400, "convention and scale apply to GGUF control vectors only",
                                    "convention" if convention is not None else "scale")
                bank = VectorBank.from_bytes(bytes(data), where="upload")
                if name is not None:
                    if len(bank) != 1:
                        raise HTTPError(400, f"?name= renames a single-entry bank; this one has "
                                             f"{len(bank)} entries {bank.names()[:8]}", "name")
                    (old,) = bank.names()
                    renamed = VectorBank(bank.info)
                    renamed.add(name, bank.kind(old), bank.get(old), **bank.meta(old))
                    bank = renamed
            if len(bank) == 0:
                raise HTTPError(400, "the uploaded bank holds no entries", "body")
            for n in bank.names():
                try:
                    check_name(n, "name")
                except SpecError as e:
                    raise HTTPError(400, f"entry {n!r}: {e}", "name") from None
            if bank.info is None:
                raise HTTPError(400, "the uploaded bank does not say which model it was made for "
                                     "(its header has no 'model')", "body")
            bank.validate_against(self.fe.info)
        except BankError as e:
            raise HTTPError(400, str(e), "body") from None
        except ValueError as e:  # e.g. a bad convention name
            raise HTTPError(400, str(e), "convention" if "convention" in str(e) else "body") from None
        return bank

    async def register(self, bank) -> dict:
        self._mutable()
        async with self.lock:
            data = self.fe.registration(bank)
            replaced = [n for n in bank.names() if n in self.fe.bank]
            try:
                await self.rpc("register", data)
            except Exception as e:
                raise HTTPError(500, f"emosteer: a worker could not register the vectors "
                                     f"({type(e).__name__}: {e}); nothing was switched") from None
            self.fe.bank.update(bank)
        logger.info("emosteer: registered %s over HTTP", bank.names())
        return {"registered": bank.names(), "replaced": replaced}

    async def remove(self, name: str) -> dict:
        self._mutable()
        async with self.lock:
            if name not in self.fe.bank:
                raise HTTPError(404, f"no vector named {name!r}; known: {self.fe.bank.names()[:20]}", "name")
            self.fe.bank.remove(name)  # new requests naming it are refused from now on
            try:
                await self.rpc("remove", [name])
            except Exception as e:
                raise HTTPError(500, f"emosteer: a worker could not remove {name!r} "
                                     f"({type(e).__name__}: {e})") from None
        logger.info("emosteer: removed %s over HTTP", name)
        return {"removed": name}

    def listing(self) -> dict:
        bank = self.fe.bank
        vectors = []
        for n in bank.names():
            t = bank.get(n)
            vectors.append({"name": n, "kind": bank.kind(n), "shape": list(t.shape),
                            "dtype": str(t.dtype).replace("torch.", ""),
                            "hash": bank.content_hash(n), "meta": bank.meta(n)})
        return {"model": self.fe.info.to_dict(), "vectors": vectors,
                "presets": {n: p["config"] for n, p in bank.presets.items()}}

    # -- captures ----------------------------------------------------------------------
    def _running(self, request_id: str) -> bool:
        op = getattr(self.engine, "output_processor", None)
        ids = getattr(op, "external_req_ids", None)
        if ids is None:
            return False
        if ids.get(request_id):
            return True
        # n > 1: vLLM runs the samples as child requests "<index>_<parent id>"
        return any(k.endswith("_" + request_id) and v for k, v in list(ids.items()))

    async def captures(self, key: str, wait: float) -> dict:
        from emosteer.request.spec import SpecError
        from emosteer.vllm.frontend import check_name
        from emosteer.vllm.results import merge_results

        try:
            check_name(key, "key")
        except SpecError as e:
            raise HTTPError(400, str(e), "key") from None
        got = self.fe.key_info(key)
        if got is None:
            raise HTTPError(404, f"no results under key {key!r}: unknown, already fetched, or "
                                 "expired (capture_ttl_s)", "key")
        samples, request_id = got
        deadline = time.monotonic() + max(0.0, min(float(wait), MAX_WAIT_S))
        while self._running(request_id):
            if time.monotonic() >= deadline:
                raise HTTPError(409, f"the request of key {key!r} is still running; fetch after "
                                     "its answer is complete, or pass ?wait=<seconds>", "key")
            await asyncio.sleep(0.05)
        keys = [key] if samples == 1 else [f"{key}#{i}" for i in range(samples)]
        wkeys = self.fe.worker_keys(keys)
        per_rank = await self.rpc("fetch", list(wkeys.values()))
        self.fe.release_key(key)
        merged = merge_results(per_rank, wkeys)
        if not merged:
            raise HTTPError(404, f"no results under key {key!r}: the request captured nothing, or "
                                 "its results expired (capture_ttl_s / keep_captures)", "key")
        # A sample without results was dropped (keep_captures / capture_ttl_s) while its
        # siblings were kept: it gets an error, never a silent null.
        lost = {"error": "this sample's captures were dropped before they could be fetched (the "
                         "workers keep keep_captures unfetched results for capture_ttl_s seconds)",
                "captures": None}
        return {k: merged.get(k, lost) for k in keys}

    async def status(self, memory: bool = False) -> dict:
        admission = await self.engine.engine_core.call_utility_async("emosteer_status")
        workers = await self.rpc("status")
        out = {"admission": admission, "workers": workers, "bank": self.fe.bank.names(),
               "settings": self.fe.settings.to_dict()}
        if memory:  # walks every Python object in each worker: asked for, never by default
            from emosteer.vllm.worker.memory import memory_report

            out["memory"] = {"api": memory_report(top=40), "workers": await self.rpc("memory")}
        return out


def _service(request) -> Service:
    svc = getattr(request.app.state, "emosteer", None)
    if svc is None:
        raise HTTPError(503, "emosteer's routes are not initialised (no engine in this server)")
    return svc


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    try:
        declared = int(declared) if declared is not None else None
    except ValueError:
        raise HTTPError(400, "bad Content-Length header", "body") from None
    too_big = HTTPError(413, f"upload of {declared if declared is not None else 'more than'} bytes "
                             f"exceeds upload_mib ({limit // 2**20} MiB)", "body")
    if declared is not None and declared > 16 * limit:
        raise too_big  # not worth reading: answer now (the client may see the connection close)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        # else: keep reading (and dropping) what was sent, so the client gets the answer
        # instead of a reset connection; bounded by the check above or by the limit's 16 x
        if size > 16 * limit:
            raise too_big
    if size > limit:
        raise too_big
    return b"".join(chunks)


def _float_param(value: str | None, field: str) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except ValueError:
        raise HTTPError(400, f"{field} must be a number, got {value!r}", field) from None
    if out != out or out in (float("inf"), float("-inf")):
        raise HTTPError(400, f"{field} must be finite, got {value!r}", field)
    return out


def build_router():
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse, Response

    router = APIRouter()

    def guarded(fn):
        import functools

        @functools.wraps(fn)
        async def wrapper(request: Request, *args, **kwargs):
            try:
                return await fn(request, *args, **kwargs)
            except HTTPError as e:
                return _error_response(e)
            except Exception as e:  # never a bare 500 without a message
                logger.exception("emosteer: HTTP route failed")
                return _error_response(HTTPError(500, f"emosteer: {type(e).__name__}: {e}"))

        return wrapper

    @router.post(ROUTE + "/vectors")
    @guarded
    async def post_vectors(request: Request):
        svc = _service(request)
        q = request.query_params
        unknown = sorted(set(q) - {"name", "format", "convention", "scale"})
        if unknown:
            raise HTTPError(400, f"unknown query parameter(s) {unknown}; allowed: name, format, "
                                 "convention, scale", unknown[0])
        data = await _read_body(request, svc.fe.settings.upload_mib * 2**20)
        bank = svc.parse_upload(data, q.get("name"), q.get("format", "auto"), q.get("convention"),
                                _float_param(q.get("scale"), "scale"))
        return JSONResponse(status_code=201, content=await svc.register(bank))

    @router.get(ROUTE + "/vectors")
    @guarded
    async def get_vectors(request: Request):
        return JSONResponse(_service(request).listing())

    @router.delete(ROUTE + "/vectors/{name}")
    @guarded
    async def delete_vector(request: Request, name: str):
        return JSONResponse(await _service(request).remove(name))

    @router.get(ROUTE + "/captures/{key}")
    @guarded
    async def get_captures(request: Request, key: str):
        from emosteer.vllm.results import to_json, to_safetensors

        q = request.query_params
        fmt = q.get("format", "json")
        if fmt not in ("json", "safetensors"):
            raise HTTPError(400, f"format must be json or safetensors, got {fmt!r}", "format")
        wait = _float_param(q.get("wait"), "wait") or 0.0
        results = await _service(request).captures(key, wait)
        if fmt == "safetensors":
            if len(results) != 1:
                raise HTTPError(400, "format=safetensors returns one sample; this key has "
                                     f"{len(results)} (n > 1): use format=json", "format")
            ((k, r),) = results.items()
            return Response(to_safetensors(k, r), media_type="application/octet-stream")
        items = [to_json(k, r) for k, r in results.items()]
        return JSONResponse(items[0] if len(items) == 1 else {"key": key, "samples": items})

    @router.get(ROUTE + "/status")
    @guarded
    async def get_status(request: Request):
        memory = request.query_params.get("memory", "0").lower()
        if memory not in ("0", "1", "false", "true"):
            raise HTTPError(400, f"memory must be 0 or 1, got {memory!r}", "memory")
        body = await _service(request).status(memory=memory in ("1", "true"))
        return JSONResponse(json.loads(json.dumps(body, default=str)))

    @router.get(ROUTE + "/score")
    @guarded
    async def get_score(request: Request):
        from emosteer.playground import score_targets

        return JSONResponse({"targets": score_targets()})

    @router.post(ROUTE + "/score")
    @guarded
    async def post_score(request: Request):
        from emosteer.playground import score_texts

        try:
            body = json.loads(await _read_body(request, MAX_SCORE_BYTES))
        except ValueError as e:
            raise HTTPError(400, f"the body must be JSON {{\"texts\": [...], \"target\": ...}} ({e})",
                            "body") from None
        texts = body.get("texts") if isinstance(body, dict) else None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise HTTPError(400, "texts must be a list of strings", "texts")
        target = body.get("target", "joy")
        if not isinstance(target, str):
            raise HTTPError(400, f"target must be an emotion name, got {target!r}", "target")
        try:
            scores = await asyncio.to_thread(score_texts, texts, target)
        except ValueError as e:
            raise HTTPError(400, str(e), "target") from None
        return JSONResponse({"target": target, "scores": scores})

    return router


class EmosteerEndpoints:
    """The ``vllm.endpoint_plugins`` entry (a zero-argument factory)."""

    name = "emosteer"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from starlette.staticfiles import StaticFiles

        from emosteer.playground import STATIC

        app.include_router(build_router())
        app.mount(PAGE, StaticFiles(directory=STATIC, html=True), name="emosteer-playground")

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            return
        from emosteer.vllm import is_registered

        if not is_registered():
            logger.error("emosteer: the HTTP routes are loaded but the general plugin is not "
                         "(VLLM_PLUGINS must name 'emosteer' for both); the routes answer 503")
            return
        state.emosteer = Service(engine_client, args)
        logger.info("emosteer: HTTP routes under %s", ROUTE)
