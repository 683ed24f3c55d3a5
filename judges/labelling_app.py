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
import hashlib
import random
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from storage import queue
from storage.store import Store, StoreSession

T = TypeVar("T")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LeaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_id: int = Field(strict=True, ge=1)


class LabelBody(LeaseBody):
    choice: Literal["left", "right", "tie", "both_bad"]
    rationale: str | None = Field(default=None, max_length=2000)


# After each transaction the app leaves the file alone this long, so that a flow in
# another process, retrying its lock, finds it free even while many people label.
PAUSE_BETWEEN_TRANSACTIONS_S = 0.01


def create_app(database: str | Path, *, lock_timeout_s: float = 30.0, seed: int | None = None) -> FastAPI:
    """The app for one flywheel database. `seed` fixes the left/right draws (tests)."""
    store = Store.open(database, lock_timeout_s=lock_timeout_s)
    one_at_a_time = threading.Lock()
    sides = random.Random(seed)
    known_tokens: dict[str, str] = {}  # token hash -> annotator; annotators are never removed
    page = resources.files("judges").joinpath("static/label.html").read_text()
    app = FastAPI(title="flywheel labelling", docs_url=None, redoc_url=None)

    def in_transaction(work: Callable[[StoreSession], T]) -> T:
        with one_at_a_time:
            try:
                with store.transaction() as tx:
                    return work(tx)
            finally:
                time.sleep(PAUSE_BETWEEN_TRANSACTIONS_S)

    def annotator(authorization: Annotated[str | None, Header()] = None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "give your token: Authorization: Bearer TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})
        digest = token_sha256(token.strip())
        if digest not in known_tokens:
            name = in_transaction(lambda tx: queue.annotator_for_token(tx, digest))
            if name is None:
                raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
            known_tokens[digest] = name
        return known_tokens[digest]

    Annotator = Annotated[str, Depends(annotator)]

    @app.exception_handler(queue.QueueError)
    def refused(request: Request, error: queue.QueueError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    def malformed(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return JSONResponse({"detail": f"malformed request: {problems}", "errors": error.errors()},
                            status_code=422)

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
    def label(pair_id: int, body: LabelBody, name: Annotator) -> dict[str, Any]:
        label_id = in_transaction(lambda tx: queue.submit_label(
            tx, name, pair_id, body.lease_id, body.choice, queue.utc_now(), body.rationale))
        return {"label_id": label_id}

    @app.post("/api/pairs/{pair_id}/skip")
    def skip(pair_id: int, body: LeaseBody, name: Annotator) -> dict[str, Any]:
        in_transaction(lambda tx: queue.skip_pair(tx, name, pair_id, body.lease_id, queue.utc_now()))
        return {"skipped": pair_id}

    @app.get("/api/progress")
    def progress(name: Annotator) -> dict[str, Any]:
        def read(tx: StoreSession) -> dict[str, Any]:
            done = queue.progress(tx)
            return {"pairs": done.pairs, "pairs_done": done.pairs_done, "labels": done.labels,
                    "labels_needed": done.labels_needed, "remaining": done.labels_remaining,
                    "mine": queue.count_labels_of(tx, name)}

        return in_transaction(read)

    @app.get("/api/labels")
    def my_labels(name: Annotator) -> dict[str, Any]:
        return {"labels": in_transaction(lambda tx: queue.labels_of(tx, name))}

    return app
