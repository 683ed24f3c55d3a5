"""The labelling web app: one page and a small JSON API over the labelling queue.

`flywheel label serve` runs it with uvicorn. Every request needs an active annotator's
token (`Authorization: Bearer TOKEN`; `flywheel annotators add NAME` prints one), checked
against the database in the request's own transaction, so a revoked token stops at once. A
request without a token is refused before its body is read. The requests take turns on the
database file, which stays open while they follow each other (`FileTurns`); a flow in
another process that finds it locked says so, and gets it within a moment. A body over
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
# they name the body models and `PairId` as objects.
import random
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from os import PathLike
from typing import Annotated, Any, Callable, TypeVar

import duckdb
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from judges.human import HUMAN_JUDGE_NAME, Choice, token_sha256
from storage import queue
from storage.store import Store, StoreError, Transaction, one_transaction

T = TypeVar("T")


class LeaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Ids are DuckDB BIGINTs: anything larger is malformed, not a server error.
    lease_id: int = Field(strict=True, ge=1, le=queue.BIGINT_MAX)


class LabelBody(LeaseBody):
    choice: Choice
    rationale: str | None = Field(default=None, max_length=2000)


PairId = Annotated[int, Path(ge=1, le=queue.BIGINT_MAX)]

# The app keeps the file open between requests (`FileTurns`) until it has been idle this
# long, or another process says it waits for it.
IDLE_BEFORE_CLOSING_S = 2.0
CHECK_EVERY_S = 0.05
# After closing the file the app leaves it alone this long; for a process that said it
# waits (`Store.waiting_marker`), longer than that process's longest wait between two
# tries (0.375 s).
PAUSE_AFTER_CLOSING_S = 0.01
PAUSE_FOR_A_WAITING_PROCESS_S = 0.5
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


class FileTurns:
    """The app's requests take turns on the database file, one transaction each, and the
    file stays open between them while people are labelling.

    Opening the file costs DuckDB about 20 ms, closing it after a write as much again, and
    the first reads of a newly opened file are slower than later ones: with 100k pairs
    queued, a lease took 120 ms on a newly opened file and 15 ms on an open one. A thread
    that lives while the file is open closes it after `IDLE_BEFORE_CLOSING_S` without a
    request, and as soon as another process says it waits for the file
    (`Store.waiting_marker`, touched by every store that finds the file locked: a round,
    `flywheel sql`; anything else can touch it too). A turn never waits on the network:
    it is taken after the request's body has been read, and given back before the reply
    is sent.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._turn = threading.Lock()
        self._connection: Transaction | None = None
        self._opened_at_wall = 0.0  # time.time(), to compare with the marker's mtime
        self._used_at = 0.0
        self._reopen_after = float("-inf")

    def transaction(self, work: Callable[[Transaction], T]) -> T:
        """`work(tx)` in one transaction, all of it or none of it."""
        with self._turn:
            if self._connection is None:
                self._open()
            try:
                with one_transaction(self._connection) as tx:
                    return work(tx)
            except duckdb.Error:
                self._close(PAUSE_AFTER_CLOSING_S)  # the next request starts on a newly opened file
                raise
            finally:
                self._used_at = time.monotonic()

    def close(self) -> None:
        with self._turn:
            self._close(PAUSE_AFTER_CLOSING_S)

    def _open(self) -> None:
        time.sleep(max(0.0, self._reopen_after - time.monotonic()))
        self._connection = self._store.connect()
        # A request's statements are small: DuckDB's second thread cost more CPU than it saved.
        self._connection.execute("SET threads = 1")
        self._opened_at_wall = time.time()
        threading.Thread(target=self._close_when_due, args=(self._connection,), name="flywheel-labelling-file",
                         daemon=True).start()

    def _close_when_due(self, connection: Transaction) -> None:
        while True:
            time.sleep(CHECK_EVERY_S)
            with self._turn:
                if self._connection is not connection:  # closed by close(), maybe opened again since
                    return
                other_process_waits = self._other_process_waits()
                if other_process_waits or time.monotonic() - self._used_at > IDLE_BEFORE_CLOSING_S:
                    self._close(PAUSE_FOR_A_WAITING_PROCESS_S if other_process_waits else PAUSE_AFTER_CLOSING_S)
                    return

    def _close(self, pause: float) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
            self._reopen_after = time.monotonic() + pause

    def _other_process_waits(self) -> bool:
        try:
            return self._store.waiting_marker.stat().st_mtime > self._opened_at_wall
        except FileNotFoundError:
            return False


def create_app(database: str | PathLike, *, lock_timeout_s: float = 30.0, seed: int | None = None) -> FastAPI:
    """The app for one flywheel database. `seed` fixes the left/right draws (tests)."""
    store = Store.open(database, lock_timeout_s=lock_timeout_s)
    turns = FileTurns(store)
    sides = random.Random(seed)
    refused_at: dict[str, float] = {}  # token hash -> when it was last found unknown or revoked
    page = resources.files("judges").joinpath("static/label.html").read_text()

    @asynccontextmanager
    async def closing_the_file(app: FastAPI):
        yield
        turns.close()

    app = FastAPI(title="flywheel labelling", docs_url=None, redoc_url=None, lifespan=closing_the_file)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    class InvalidToken(Exception):
        pass

    def token_digest(authorization: str | None) -> str | None:
        """The token's hash; None for no token, or one found invalid a moment ago."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = token_sha256(token.strip())
        if time.monotonic() - refused_at.get(digest, float("-inf")) < TOKEN_RELOAD_S:
            return None
        return digest

    def as_annotator(request: Request, work: Callable[[Transaction, str], T]) -> T:
        """`work(tx, annotator)` in one transaction, for the active annotator whose token
        the request carries; an unknown or revoked token is refused (401)."""
        digest = request.state.token_digest

        def checked(tx: Transaction) -> T:
            name = queue.active_annotator(tx, digest)
            if name is None:
                raise InvalidToken
            return work(tx, name)

        try:
            return turns.transaction(checked)
        except InvalidToken:
            if len(refused_at) > 10_000:  # a flood of made-up tokens must not grow it for ever
                refused_at.clear()
            refused_at[digest] = time.monotonic()
            raise

    def no_valid_token() -> JSONResponse:
        return JSONResponse({"detail": "give a valid token: Authorization: Bearer TOKEN"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        # Before routing, so a request without a token gets 401 whatever its body; the
        # token itself is checked in the request's transaction.
        if request.url.path.startswith("/api/"):
            request.state.token_digest = token_digest(request.headers.get("authorization"))
            if request.state.token_digest is None:
                return no_valid_token()
        return await call_next(request)

    @app.exception_handler(InvalidToken)
    def invalid_token(request: Request, error: InvalidToken) -> JSONResponse:
        return no_valid_token()

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
    def me(request: Request) -> dict[str, Any]:
        def read(tx: Transaction, name: str) -> dict[str, Any]:
            return {"annotator": name, "labels": queue.count_labels_of(tx, name), **queue.own_quality(tx, name)}

        return as_annotator(request, read)

    @app.post("/api/next")
    def next_pair(request: Request) -> dict[str, Any]:
        left_slot = sides.choice("ab")

        def claim(tx: Transaction, name: str) -> dict[str, Any]:
            lease = queue.claim_next_pair(tx, name, queue.utc_now(), left_slot)
            if lease is None:
                return {"lease": None}
            guidelines, first = queue.guidelines_for(tx, name, lease)
            return {"lease": {**lease.__dict__, "expires_at": lease.expires_at.isoformat() + "Z"},
                    "guidelines": guidelines, "first_of_request": first}

        return as_annotator(request, claim)

    @app.post("/api/pairs/{pair_id}/label")
    def label(pair_id: PairId, body: LabelBody, request: Request) -> dict[str, Any]:
        label_id = as_annotator(request, lambda tx, name: queue.submit_label(
            tx, name, pair_id, body.lease_id, body.choice, queue.utc_now(), body.rationale,
            judge_name=HUMAN_JUDGE_NAME))
        return {"label_id": label_id}

    @app.post("/api/pairs/{pair_id}/skip")
    def skip(pair_id: PairId, body: LeaseBody, request: Request) -> dict[str, Any]:
        as_annotator(request, lambda tx, name: queue.skip_pair(tx, name, pair_id, body.lease_id, queue.utc_now()))
        return {"skipped": pair_id}

    @app.get("/api/progress")
    def progress(request: Request) -> dict[str, Any]:
        def read(tx: Transaction, name: str) -> dict[str, Any]:
            done = queue.progress(tx)
            return {"pairs": done.pairs, "pairs_done": done.pairs_done, "labels": done.labels,
                    "labels_needed": done.labels_needed, "remaining": done.labels_remaining,
                    "mine": queue.count_labels_of(tx, name)}

        return as_annotator(request, read)

    @app.get("/api/labels")
    def my_labels(request: Request,
                  before: Annotated[int | None, Query(ge=1, le=queue.BIGINT_MAX)] = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = PAGE_OF_LABELS) -> dict[str, Any]:
        labels = as_annotator(request, lambda tx, name: queue.labels_of(tx, name, limit, before))
        # The cursor of the next page: the oldest id on this one (none after a short page).
        return {"labels": labels, "next_before": labels[-1]["label_id"] if len(labels) == limit else None}

    return app
