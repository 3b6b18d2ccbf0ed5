"""`evl serve INDEX_DIR`: a small web page and JSON API over an index.

    GET  /                      the page: a search box, a grid of results, a player, a question box
    GET  /api/info              what the index holds and whether questions can be asked
    GET  /api/search?q=&k=&rerank=    ranked items (video path, segment times, score)
    GET  /api/thumbnail/{item}  the item's PNG thumbnail
    GET  /api/video/{item}      the item's video file (range requests for seeking)
    POST /api/ask               {"item": id, "question": "..."} → answer, score, alternatives, frames read

Safety: files are served by item id only — the path comes from the index's metadata, resolved under
the indexed folder and checked to stay inside it — so nothing a request carries reaches the file
system. Every parameter is validated (types, ranges, lengths) and request bodies are capped. The
server binds to 127.0.0.1 unless `--host` says otherwise. The JSON API is described at /openapi.json.
"""


from pathlib import Path
from typing import Any

from evl.search import optional
from evl.search.query import MAX_QUERY_CHARS

MAX_BODY_BYTES = 16 * 1024
MAX_RESULTS = 100
PAGE = Path(__file__).with_name("page.html")


def create_app(index_dir: str | Path, ask_model: str | Path | None = None, backend: str | None = None) -> Any:
    """The FastAPI app over the index at `index_dir`; `ask_model`: a (frame-)QA checkpoint for questions;
    `backend`: how queries are embedded (`evl.load`'s; default the index model folder's own)."""
    fastapi = optional("fastapi")
    from fastapi import Body, HTTPException, Query, Request
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field

    from evl.errors import EvlError
    from evl.search.index import IndexDamaged
    from evl.search.query import SearchIndex

    index = SearchIndex(index_dir, backend=backend)
    asker = _load_asker(ask_model) if ask_model else None
    app = fastapi.FastAPI(title="evl search", version="1", description="Text search and questions over indexed videos.")
    app.add_middleware(BodyCap, limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the default handler echoes the input back, and JSON cannot carry NaN or Infinity: say it in words
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "input": repr(e.get("input"))[:200]}
                  for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(IndexDamaged)
    async def damaged(request: Request, exc: IndexDamaged) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    class Hit(BaseModel):
        item: int
        path: str
        start: float | None
        end: float | None
        score: float
        dual_score: float

    class AskRequest(BaseModel):
        item: int = Field(ge=0, le=2**62)
        question: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)

    class AskAnswer(BaseModel):
        answer: str
        score: float
        alternatives: list[tuple[str, float]]
        frames: list[dict[str, Any]]
        seconds: float

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"items": len(index), "kind": index.info.get("kind"), "segment": index.info.get("segment"),
                "can_ask": asker is not None,
                "rebuilt": index.rebuilt}

    @app.get("/api/search", response_model=list[Hit])
    def search(q: str = Query(min_length=1, max_length=MAX_QUERY_CHARS),
               k: int = Query(10, ge=1, le=MAX_RESULTS), rerank: int = Query(0, ge=0, le=MAX_RESULTS)) -> list[Hit]:
        try:
            return [Hit(**vars(h)) for h in index.search(q, k, rerank)]
        except IndexDamaged:
            raise
        except EvlError as e:
            raise HTTPException(400, str(e)) from e

    @app.get("/api/thumbnail/{item}")
    def thumbnail(item: int = PathParam(ge=0, le=2**62)) -> Response:
        data = index.thumbnail(item)
        if data is None:
            raise HTTPException(404, f"no item {item}")
        return Response(data, media_type="image/png")

    @app.get("/api/video/{item}")
    def video(item: int = PathParam(ge=0, le=2**62)) -> FileResponse:
        path = index.video_path(item)
        if path is None:
            raise HTTPException(404, f"no item {item}")
        return FileResponse(path)

    @app.post("/api/ask", response_model=AskAnswer)
    def ask(body: AskRequest = Body()) -> AskAnswer:
        if asker is None:
            raise HTTPException(409, "this server has no question-answering model; start it with --ask-model CKPT")
        path = index.video_path(body.item)
        if path is None:
            raise HTTPException(404, f"no item {body.item}")
        start, end = index.window(body.item)
        try:
            result = asker(path, body.question, start, end)
        except IndexDamaged:
            raise
        except EvlError as e:
            raise HTTPException(400, str(e)) from e
        return AskAnswer(**result)

    return app


class BodyCap:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app sees it, whether
    it announces its length (Content-Length) or not (chunked transfer): the body is counted as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await self._refuse(send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        from starlette.responses import JSONResponse

        await JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)(
            {"type": "http"}, None, send)


def _load_asker(checkpoint: str | Path):
    import time

    from evl.api import load
    from evl.errors import ConfigError

    model = load(checkpoint)
    if not model.can("answer"):
        raise ConfigError(f"--ask-model {checkpoint} is a {model.kind!r} model, which cannot answer questions: pass a "
                          "frame-QA checkpoint (evl vlap train) or a QA one (evl finetune qa-tiny)")

    def run(path: Path, question: str, start: float | None, end: float | None) -> dict:
        t0 = time.perf_counter()
        a = model.answer((path, start, end), question)
        return {"answer": a.answer, "score": a.score, "alternatives": a.alternatives, "frames": a.frames or [],
                "seconds": round(time.perf_counter() - t0, 3)}

    return run


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, ask_model: str | Path | None = None,
          backend: str | None = None) -> None:
    uvicorn = optional("uvicorn")
    uvicorn.run(create_app(index_dir, ask_model, backend), host=host, port=port, log_level="warning")
