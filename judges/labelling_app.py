"""The labelling web app: one page and a small JSON API over the labelling queue.

`flywheel label serve` runs it with uvicorn. Every request needs an annotator's token
(`Authorization: Bearer TOKEN`; `flywheel annotators add NAME` prints one). The app
never holds the database: each request opens it, runs one short transaction and closes
it, one request at a time in this process, so a flow in another process gets the file
between requests (the store retries a lock conflict with back-off).

    GET  /                          the labelling page
    GET  /api/me                    who the token belongs to, and their label count
    POST /api/next                  lease the next pair (the same one again while the lease lives)
    POST /api/pairs/{pair_id}/label {"lease_id": int, "choice": "left"|"right"|"tie"|"both_bad"}
    POST /api/pairs/{pair_id}/skip  {"lease_id": int}
    GET  /api/progress              done / remaining for the whole queue, and the caller's count
    GET  /api/labels                the caller's own latest labels
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, and
# they name the `Annotator` dependency made inside `create_app`.
import random
import threading
import time
from importlib import resources
from os import PathLike
from typing import Annotated, Any, Callable, TypeVar

from fastapi import Depends, FastAPI, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

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
# An unknown token reloads the annotators at most this often, so a stream of bad tokens
# cannot keep the database busy, and someone added a moment ago gets in without a restart.
TOKEN_RELOAD_S = 2.0


def create_app(database: str | PathLike, *, lock_timeout_s: float = 30.0, seed: int | None = None) -> FastAPI:
    """The app for one flywheel database. `seed` fixes the left/right draws (tests)."""
    store = Store.open(database, lock_timeout_s=lock_timeout_s)
    one_at_a_time = threading.Lock()
    sides = random.Random(seed)
    tokens: dict[str, str] = {}  # token hash -> annotator
    tokens_loaded_at = [float("-inf")]
    page = resources.files("judges").joinpath("static/label.html").read_text()
    app = FastAPI(title="flywheel labelling", docs_url=None, redoc_url=None)

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
        if digest not in tokens and time.monotonic() - tokens_loaded_at[0] > TOKEN_RELOAD_S:
            tokens.update(in_transaction(queue.annotator_tokens))
            tokens_loaded_at[0] = time.monotonic()
        return tokens.get(digest)

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
        return {"annotator": name, "labels": in_transaction(lambda tx: queue.count_labels_of(tx, name))}

    @app.post("/api/next")
    def next_pair(name: Annotator) -> dict[str, Any]:
        left_slot = sides.choice("ab")
        lease = in_transaction(lambda tx: queue.claim_next_pair(tx, name, queue.utc_now(), left_slot))
        if lease is None:
            return {"lease": None}
        return {"lease": {**lease.__dict__, "expires_at": lease.expires_at.isoformat() + "Z"}}

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
    def my_labels(name: Annotator) -> dict[str, Any]:
        return {"labels": in_transaction(lambda tx: queue.labels_of(tx, name))}

    return app
