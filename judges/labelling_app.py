"""The labelling web app: one page and a small JSON API over the labelling queue.

`flywheel label serve` runs it with uvicorn. Every request needs an active annotator's
token (`Authorization: Bearer TOKEN`; `flywheel annotators add NAME` prints one), checked
against the database on every request, so a revoked token stops at once. The app never
holds the database: each request opens it, runs one short transaction and closes it, one
request at a time in this process, so a flow in another process gets the file between
requests (the store retries a lock conflict with back-off). A body over
`MAX_BODY_BYTES` is refused with 413 before it is read in full; any malformed body is 422.

    GET  /                          the labelling page
    GET  /api/me                    who the token belongs to, their label count, gold accuracy, labels per hour
    POST /api/next                  lease the next pair (the same one again while the lease lives), with the
                                    request's guidelines and whether it is the person's first pair of it
    POST /api/pairs/{pair_id}/label {"lease_id": int, "choice": "left"|"right"|"tie"|"both_bad"}
    POST /api/pairs/{pair_id}/skip  {"lease_id": int}
    GET  /api/progress              done / remaining for the whole queue, and the caller's count
    GET  /api/labels?before=ID&limit=N  the caller's own labels, newest first, a page at a time
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, and
# they name the `Annotator` dependency made inside `create_app`.
import random
import threading
import time
from importlib import resources
from os import PathLike
from typing import Annotated, Any, Callable, TypeVar

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from judges.human import HUMAN_JUDGE_NAME, Choice, token_sha256
from storage import queue
from storage.store import Store, StoreError, Transaction

T = TypeVar("T")


class LeaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Ids are DuckDB BIGINTs: anything larger is malformed, not a server error.
    lease_id: int = Field(strict=True, ge=1, le=queue.BIGINT_MAX)


class LabelBody(LeaseBody):
    choice: Choice
    rationale: str | None = Field(default=None, max_length=2000)


PairId = Annotated[int, Path(ge=1, le=queue.BIGINT_MAX)]

# After each transaction the app leaves the file alone this long, so that a flow in
# another process, retrying its lock, finds it free even while many people label.
PAUSE_BETWEEN_TRANSACTIONS_S = 0.01
# A token found unknown (or revoked) is refused without asking the database again for
# this long, so a stream of bad tokens cannot keep it busy; someone added a moment ago
# gets in after at most this long. A valid token is checked on every request.
TOKEN_RELOAD_S = 2.0
# The largest request body read; every API body is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024
PAGE_OF_LABELS = 50


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, from its Content-Length before
    anything is read, or, for a body sent without one, as soon as the bytes read pass it."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        received, too_large, answered = 0, False, False

        async def counted():
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                too_large = True
                raise _BodyTooLarge
            return message

        async def send_unless_refused(message) -> None:
            # FastAPI turns any error while reading a body into its own 400 (which this
            # app answers as 422): past the limit, that answer gives way to the 413.
            nonlocal answered
            if not too_large:
                answered = True
                await send(message)

        try:
            await self.app(scope, counted, send_unless_refused)
        except _BodyTooLarge:
            pass
        if too_large and not answered:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send) -> None:
        response = JSONResponse({"detail": f"the request body is over {self.limit} bytes"}, status_code=413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


def create_app(database: str | PathLike, *, lock_timeout_s: float = 30.0, seed: int | None = None) -> FastAPI:
    """The app for one flywheel database. `seed` fixes the left/right draws (tests)."""
    store = Store.open(database, lock_timeout_s=lock_timeout_s)
    one_at_a_time = threading.Lock()
    sides = random.Random(seed)
    refused_at: dict[str, float] = {}  # token hash -> when it was last found unknown or revoked
    page = resources.files("judges").joinpath("static/label.html").read_text()
    app = FastAPI(title="flywheel labelling", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    def in_transaction(work: Callable[[Transaction], T]) -> T:
        with one_at_a_time:
            try:
                with store.transaction() as tx:
                    return work(tx)
            finally:
                time.sleep(PAUSE_BETWEEN_TRANSACTIONS_S)

    def annotator_for(authorization: str | None) -> str | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = token_sha256(token.strip())
        if time.monotonic() - refused_at.get(digest, float("-inf")) < TOKEN_RELOAD_S:
            return None
        name = in_transaction(lambda tx: queue.active_annotator(tx, digest))
        if name is None:
            if len(refused_at) > 10_000:  # a flood of made-up tokens must not grow it for ever
                refused_at.clear()
            refused_at[digest] = time.monotonic()
        return name

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        # Before routing, so a request without a valid token gets 401 whatever its body.
        if request.url.path.startswith("/api/"):
            try:
                name = await run_in_threadpool(annotator_for, request.headers.get("authorization"))
            except StoreError as error:
                return busy(request, error)
            if name is None:
                return JSONResponse({"detail": "give a valid token: Authorization: Bearer TOKEN"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            request.state.annotator = name
        return await call_next(request)

    def annotator(request: Request) -> str:
        return request.state.annotator

    Annotator = Annotated[str, Depends(annotator)]

    @app.exception_handler(queue.QueueError)
    def refused(request: Request, error: queue.QueueError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(StoreError)
    def busy(request: Request, error: StoreError) -> JSONResponse:
        # The database stayed locked (or unreadable) past the retries: try again later.
        return JSONResponse({"detail": f"the database is busy: {error}"}, status_code=503)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 for a body it cannot parse for a reason other than bad JSON
        # syntax (JSON nested deeper than Python's recursion limit): it is malformed too.
        if error.status_code == 400:
            return JSONResponse({"detail": "malformed request: the body could not be read as JSON "
                                 f"({error.detail})"}, status_code=422)
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    def malformed(request: Request, error: RequestValidationError) -> JSONResponse:
        # Only the messages: the raw input may be bytes or NaN, which JSON cannot carry.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return JSONResponse({"detail": f"malformed request: {problems}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def labelling_page() -> str:
        return page

    @app.get("/api/me")
    def me(name: Annotator) -> dict[str, Any]:
        def read(tx: Transaction) -> dict[str, Any]:
            return {"annotator": name, "labels": queue.count_labels_of(tx, name), **queue.own_quality(tx, name)}

        return in_transaction(read)

    @app.post("/api/next")
    def next_pair(name: Annotator) -> dict[str, Any]:
        left_slot = sides.choice("ab")

        def claim(tx: Transaction) -> dict[str, Any]:
            lease = queue.claim_next_pair(tx, name, queue.utc_now(), left_slot)
            if lease is None:
                return {"lease": None}
            guidelines, first = queue.guidelines_for(tx, name, lease)
            return {"lease": {**lease.__dict__, "expires_at": lease.expires_at.isoformat() + "Z"},
                    "guidelines": guidelines, "first_of_request": first}

        return in_transaction(claim)

    @app.post("/api/pairs/{pair_id}/label")
    def label(pair_id: PairId, body: LabelBody, name: Annotator) -> dict[str, Any]:
        label_id = in_transaction(lambda tx: queue.submit_label(
            tx, name, pair_id, body.lease_id, body.choice, queue.utc_now(), body.rationale,
            judge_name=HUMAN_JUDGE_NAME))
        return {"label_id": label_id}

    @app.post("/api/pairs/{pair_id}/skip")
    def skip(pair_id: PairId, body: LeaseBody, name: Annotator) -> dict[str, Any]:
        in_transaction(lambda tx: queue.skip_pair(tx, name, pair_id, body.lease_id, queue.utc_now()))
        return {"skipped": pair_id}

    @app.get("/api/progress")
    def progress(name: Annotator) -> dict[str, Any]:
        def read(tx: Transaction) -> dict[str, Any]:
            done = queue.progress(tx)
            return {"pairs": done.pairs, "pairs_done": done.pairs_done, "labels": done.labels,
                    "labels_needed": done.labels_needed, "remaining": done.labels_remaining,
                    "mine": queue.count_labels_of(tx, name)}

        return in_transaction(read)

    @app.get("/api/labels")
    def my_labels(name: Annotator,
                  before: Annotated[int | None, Query(ge=1, le=queue.BIGINT_MAX)] = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = PAGE_OF_LABELS) -> dict[str, Any]:
        labels = in_transaction(lambda tx: queue.labels_of(tx, name, limit, before))
        # The cursor of the next page: the oldest id on this one (none after a short page).
        return {"labels": labels, "next_before": labels[-1]["label_id"] if len(labels) == limit else None}

    return app
