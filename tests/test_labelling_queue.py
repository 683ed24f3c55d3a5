"""The human labelling queue: leases, k labels per pair, the JSON API, export and import.

The store is a real DuckDB file; the API is `flywheel label serve` in its own process;
the page test drives Debian's Chromium through Playwright.
"""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta

import duckdb
import httpx
import pytest

from label_server import labelling_server
from cli.main import main
from flywheel.labelling import label_pairs
from judges import HumanJudge, JudgeSpecError, load_judge
from judges.human import ready_to_train
from queue_data import new_store, round_with_pairs
from judges.human import HUMAN_JUDGE_NAME as HUMAN, HumanLabel
from storage import queue
from storage import tables
from storage.migrations import MIGRATIONS_TABLE
from storage.records import Label
from storage.store import Store


def add_annotator(db, name, capsys) -> str:
    capsys.readouterr()
    assert main(["annotators", "add", name, "--db", str(db)]) == 0
    return capsys.readouterr().out.strip()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def store(tmp_path):
    return new_store(tmp_path)


def queued_round(store, num_pairs, labels_per_pair=1, lease_seconds=600.0):
    round_id = round_with_pairs(store, num_pairs)
    with store.transaction() as tx:
        queue.request_labels(tx, round_id, judge_version="1", labels_per_pair=labels_per_pair,
                             lease_seconds=lease_seconds, now=queue.utc_now())
    return round_id


# -- the queue in the store ------------------------------------------------------------------


def test_a_pair_needing_k_labels_goes_to_k_different_people(store):
    queued_round(store, 1, labels_per_pair=2)
    now = queue.utc_now()
    with store.transaction() as tx:
        alice = queue.claim_next_pair(tx, "alice", now, "a")
        # A reloaded page gets the same lease back, not a second pair.
        assert queue.claim_next_pair(tx, "alice", now, "b").lease_id == alice.lease_id
        bob = queue.claim_next_pair(tx, "bob", now, "b")
        assert bob.pair_id == alice.pair_id and bob.lease_id != alice.lease_id
        # Two live leases cover both labels the pair needs: nobody else gets it.
        assert queue.claim_next_pair(tx, "carol", now, "a") is None
        queue.submit_label(tx, "alice", alice.pair_id, alice.lease_id, "left", now, judge_name=HUMAN)
        # Alice has labelled it; she is never offered it again.
        assert queue.claim_next_pair(tx, "alice", now, "a") is None
        queue.submit_label(tx, "bob", bob.pair_id, bob.lease_id, "tie", now, judge_name=HUMAN)
        assert queue.claim_next_pair(tx, "carol", now, "a") is None
        done = queue.progress(tx)
    assert (done.pairs, done.pairs_done, done.labels, done.labels_remaining) == (1, 1, 2, 0)
    _, rows = store.query("SELECT annotator, winner FROM labels ORDER BY label_id")
    assert rows == [("alice", "a"), ("bob", "tie")]


def test_the_next_pair_comes_from_an_open_request_then_the_newest_round_then_the_lowest_id(store):
    older = queued_round(store, 3)
    newer = queued_round(store, 2, labels_per_pair=2)
    now = queue.utc_now()

    def next_of(annotator):
        with store.transaction() as tx:
            lease = queue.claim_next_pair(tx, annotator, now, "a")
            queue.submit_label(tx, annotator, lease.pair_id, lease.lease_id, "left", now, judge_name=HUMAN)
            return lease.round_id, lease.pair_id

    with store.transaction() as tx:
        newer_pairs = sorted(p.pair_id for p in tables.pairs_to_judge(tx, newer, "nobody", "0"))
        older_pairs = sorted(p.pair_id for p in tables.pairs_to_judge(tx, older, "nobody", "0"))
    # The newest round first, lowest pair first; a pair that needs a second person's label
    # goes to bob before any pair nobody has labelled.
    assert next_of("alice") == (newer, newer_pairs[0])
    assert next_of("bob") == (newer, newer_pairs[0])
    assert next_of("alice") == (newer, newer_pairs[1])
    with store.transaction() as tx:
        queue.close_request(tx, newer, "quota", now)
    # A closed request's pairs stay queued, after every open request's.
    assert next_of("carol") == (older, older_pairs[0])
    assert next_of("bob") == (older, older_pairs[1])
    assert [next_of("dave") for _ in range(2)] == [(older, older_pairs[2]), (newer, newer_pairs[1])]
    with store.transaction() as tx:
        assert queue.claim_next_pair(tx, "erin", now, "a") is None


def test_the_left_right_order_is_recorded_and_maps_back_to_a_and_b(store):
    queued_round(store, 2)
    now = queue.utc_now()
    with store.transaction() as tx:
        shown_b_left = queue.claim_next_pair(tx, "alice", now, "b")
        pair = tables.pairs_to_judge(tx, 1, "nobody", "0")[0]
        assert (shown_b_left.left, shown_b_left.right) == (pair.completion_b, pair.completion_a)
        queue.submit_label(tx, "alice", shown_b_left.pair_id, shown_b_left.lease_id, "left", now, judge_name=HUMAN)
        shown_a_left = queue.claim_next_pair(tx, "alice", now, "a")
        queue.submit_label(tx, "alice", shown_a_left.pair_id, shown_a_left.lease_id, "left", now, judge_name=HUMAN)
    _, rows = store.query("SELECT e.left_slot, l.winner FROM label_leases e JOIN labels l USING (label_id) "
                          "ORDER BY e.lease_id")
    assert rows == [("b", "b"), ("a", "a")]


def test_an_expired_lease_is_refused_and_the_pair_goes_to_someone_else(store):
    queued_round(store, 1, lease_seconds=60)
    now = queue.utc_now()
    later = now + timedelta(seconds=61)
    with store.transaction() as tx:
        alice = queue.claim_next_pair(tx, "alice", now, "a")
        assert queue.claim_next_pair(tx, "bob", now, "a") is None  # leased to alice
        bob = queue.claim_next_pair(tx, "bob", later, "a")
        assert bob.pair_id == alice.pair_id
    with store.transaction() as tx, pytest.raises(queue.QueueError, match="expired") as refused:
        queue.submit_label(tx, "alice", alice.pair_id, alice.lease_id, "left", later, judge_name=HUMAN)
    assert refused.value.status == 409
    with store.transaction() as tx, pytest.raises(queue.QueueError, match="another annotator") as foreign:
        queue.submit_label(tx, "alice", bob.pair_id, bob.lease_id, "left", later, judge_name=HUMAN)
    assert foreign.value.status == 403
    with store.transaction() as tx:
        queue.submit_label(tx, "bob", bob.pair_id, bob.lease_id, "right", later, judge_name=HUMAN)
    assert store.query("SELECT annotator FROM labels")[1] == [("bob",)]


def test_a_skipped_pair_is_not_offered_again_to_whoever_skipped_it(store):
    queued_round(store, 1)
    now = queue.utc_now()
    with store.transaction() as tx:
        lease = queue.claim_next_pair(tx, "alice", now, "a")
        queue.skip_pair(tx, "alice", lease.pair_id, lease.lease_id, now)
        assert queue.claim_next_pair(tx, "alice", now, "a") is None
        assert queue.claim_next_pair(tx, "bob", now, "a").pair_id == lease.pair_id
        with pytest.raises(queue.QueueError, match="already skipped"):
            queue.submit_label(tx, "alice", lease.pair_id, lease.lease_id, "left", now, judge_name=HUMAN)


def test_quota_and_deadline_decide_when_a_human_round_may_train(store):
    round_id = round_with_pairs(store, 4)
    judge = load_judge("human", {"quota_fraction": "0.5", "deadline_hours": "2"})
    assert isinstance(judge, HumanJudge) and judge.quota_fraction == 0.5
    now = queue.utc_now()
    with store.transaction() as tx:
        request = judge.queue_round(tx, round_id, now)
        assert request.quota_pairs == 2 and request.deadline == now + timedelta(hours=2)
        assert judge.queue_round(tx, round_id, now + timedelta(hours=1)) == request  # queued once
        assert ready_to_train(request, queue.progress(tx, round_id), now) is None
        assert ready_to_train(request, queue.progress(tx, round_id), now + timedelta(hours=2)) == "deadline"
        for _ in range(2):
            lease = queue.claim_next_pair(tx, "alice", now, "a")
            queue.submit_label(tx, "alice", lease.pair_id, lease.lease_id, "left", now, judge_name=HUMAN)
        assert ready_to_train(request, queue.progress(tx, round_id), now) == "quota"


@pytest.mark.parametrize("options, problem", [
    ({"labels_per_pair": "0"}, "labels_per_pair must be >= 1"),
    ({"quota_fraction": "1.5"}, "quota_fraction must be in"),
    ({"labels_per_pair": "two"}, "must be a int"),
    ({"lease_minutes": "-1"}, "lease_minutes must be > 0"),
    ({"colour": "red"}, "cannot be built"),
    ({"lease_minutes": "inf"}, "lease_minutes must be a finite number"),
    ({"deadline_hours": "1e9"}, "deadline_hours must be at most"),
])
def test_bad_human_judge_options_are_one_line_errors(options, problem):
    with pytest.raises(JudgeSpecError, match=problem):
        load_judge("human", options)


def test_one_person_gives_a_pair_one_label_even_through_import(store):
    queued_round(store, 1, labels_per_pair=2)
    now = queue.utc_now()
    with store.transaction() as tx:
        lease = queue.claim_next_pair(tx, "alice", now, "a")
        assert queue.import_labels(tx, [HumanLabel(lease.pair_id, "a", "alice")], now, judge_name=HUMAN) == (1, 0)
        with pytest.raises(queue.QueueError, match="already labelled") as refused:
            queue.submit_label(tx, "alice", lease.pair_id, lease.lease_id, "right", now, judge_name=HUMAN)
        assert refused.value.status == 409
        # Her import ended her lease; the pair's second label must come from someone else.
        assert queue.claim_next_pair(tx, "alice", now, "a") is None
        assert queue.claim_next_pair(tx, "bob", now, "a").pair_id == lease.pair_id
        assert queue.progress(tx).labels == 1


def test_every_writer_of_a_persons_label_keeps_the_queues_count_of_people(store):
    """The next pair is chosen by `label_queue.people`: each way of writing a person's label
    keeps it equal to the count from `labels`, and so does the migration that added it."""
    round_id = round_with_pairs(store, 4)
    now = queue.utc_now()
    with store.transaction() as tx:
        first, second, third, fourth = sorted(p.pair_id for p in tables.pairs_to_judge(tx, round_id, "nobody", "0"))
        # Before the round is queued: a person's label and an AI judge's (not a person).
        tables.add_labels(tx, [Label(first, "a", HUMAN, "1", annotator="alice"), Label(first, "b", "rules", "1")])
        queue.request_labels(tx, round_id, judge_version="1", labels_per_pair=2, lease_seconds=600, now=now)
        tables.add_labels(tx, [Label(first, "b", HUMAN, "1", annotator="alice"),  # alice again: still one person
                               Label(fourth, "a", HUMAN, "1", annotator="frank")])
        lease = queue.claim_next_pair(tx, "bob", now, "a")
        queue.submit_label(tx, "bob", lease.pair_id, lease.lease_id, "left", now, judge_name=HUMAN)
        assert queue.import_labels(tx, [HumanLabel(second, "a", "carol"), HumanLabel(second, "b", "dave"),
                                        HumanLabel(second, "b", "dave")], now, judge_name=HUMAN) == (2, 1)

    def counts():
        _, rows = store.query(
            "SELECT q.pair_id, q.people, (SELECT count(DISTINCT annotator) FROM labels l "
            "WHERE l.pair_id = q.pair_id AND l.annotator IS NOT NULL) FROM label_queue q ORDER BY q.pair_id")
        return rows

    assert counts() == [(first, 2, 2), (second, 2, 2), (third, 0, 0), (fourth, 1, 1)]
    # The pairs with two people are done: erin gets the third.
    with store.transaction() as tx:
        assert queue.claim_next_pair(tx, "erin", now, "a").pair_id == third
    # A file from before the count existed gets it from its labels when opened.
    with duckdb.connect(str(store.path)) as conn:
        conn.execute("ALTER TABLE label_queue DROP COLUMN people")
        conn.execute("ALTER TABLE label_leases DROP COLUMN round_id")
        conn.execute(f"DELETE FROM {MIGRATIONS_TABLE} WHERE name = 'm012_queue_counts_and_lease_rounds'")
    store = Store.open(store.path)
    assert counts() == [(first, 2, 2), (second, 2, 2), (third, 0, 0), (fourth, 1, 1)]
    _, leases = store.query("SELECT DISTINCT round_id FROM label_leases")
    assert leases == [(round_id,)]


def test_a_round_trains_on_the_labels_given_before_it_stopped_waiting(store):
    round_id = round_with_pairs(store, 4)
    judge = HumanJudge(quota_pairs=2)
    now = queue.utc_now()

    def label_next(tx, who):
        lease = queue.claim_next_pair(tx, who, now, "a")
        queue.submit_label(tx, who, lease.pair_id, lease.lease_id, "left", now, judge_name=HUMAN)

    with store.transaction() as tx:
        tables.claim_round_judge(tx, round_id, judge.name, judge.version)
        judge.queue_round(tx, round_id, now)
        label_next(tx, "alice")
        label_next(tx, "alice")
        queue.close_request(tx, round_id, "quota", now)
        label_next(tx, "alice")  # a leftover pair, labelled after the round went on
    assert store.read(tables.count_preferences, round_id) == 2
    assert [t.pair_id for t in store.read(tables.preference_triples, round_id)] == [1, 2]
    with store.transaction() as tx:
        assert queue.progress(tx, round_id).labels == 3


def test_people_appear_in_judge_agreement_beside_an_ai_judge(store):
    round_id = queued_round(store, 6)
    rule = load_judge("rule:flywheel.examples.addition:addition_score", {"name": "adder"})
    label_pairs(store, rule, round_id, batch_size=4, progress=False)
    now = queue.utc_now()
    with store.transaction() as tx:
        for _ in range(6):  # alice agrees with the rule on every pair but the last
            lease = queue.claim_next_pair(tx, "alice", now, "a")
            right_answer_is_a = lease.left == str(sum(int(x) for x in lease.prompt[:-1].split("+")))
            choice = "left" if right_answer_is_a else "right"
            if lease.pair_id == 6:
                choice = "tie"
            queue.submit_label(tx, "alice", lease.pair_id, lease.lease_id, choice, now, judge_name=HUMAN)
    _, rows = store.query("SELECT judge_a, judge_b, pairs, agreements FROM judge_agreement")
    assert rows == [(f"adder@{rule.version}", "human@1 (alice)", 6, 5)]


def test_an_edited_rule_function_labels_as_a_new_judge_version(store, tmp_path, monkeypatch):
    """A rule judge's version is its function's source fingerprint: after an edit, its
    labels are another labeller in judge_agreement, not the same one silently changed."""
    import importlib
    import sys

    round_id = round_with_pairs(store, 3)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "my_rule.py"
    versions = []
    for body in ("return float(len(completion) % 2)", "return -float(len(completion) % 2)"):
        module.write_text(f"def score(prompt, completion):\n    {body}\n")
        importlib.invalidate_caches()
        sys.modules.pop("my_rule", None)
        rule = load_judge("rule:my_rule:score", {"name": "lengthy"})
        label_pairs(store, rule, round_id, batch_size=4, progress=False)
        versions.append(rule.version)
    assert versions[0] != versions[1]
    _, rows = store.query("SELECT judge_a, judge_b, pairs FROM judge_agreement")
    assert rows == [(*sorted(f"lengthy@{version}" for version in versions), 3)]


# -- the CLI: annotators, export, import ---------------------------------------------------------


def test_annotator_names_are_checked_and_unique(store, capsys):
    token = add_annotator(store.path, "alice", capsys)
    assert len(token) >= 32
    assert main(["annotators", "add", "alice", "--db", str(store.path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["annotators", "add", "x'); DROP TABLE labels; --", "--db", str(store.path)]) == 2
    assert "must be 1-64 letters" in capsys.readouterr().err
    _, rows = store.query("SELECT name FROM annotators")
    assert rows == [("alice",)]
    _, hashes = store.query("SELECT token_sha256 FROM annotators")
    assert token not in hashes[0][0]  # only the hash is kept


def test_export_pending_pairs_then_import_their_labels(store, tmp_path, capsys):
    round_id = queued_round(store, 5, labels_per_pair=2)
    pending = tmp_path / "pending.jsonl"
    assert main(["label", "export", "--db", str(store.path), "--out", str(pending)]) == 0
    rows = [json.loads(line) for line in pending.read_text().splitlines()]
    assert [r["pair_id"] for r in rows] == [1, 2, 3, 4, 5]
    assert {r["labels_needed"] for r in rows} == {2} and rows[0]["prompt"] == "0+0="
    # Another tool fills in a winner and who labelled it; the other keys come back unchanged.
    for row in rows:
        row.update(winner="a" if row["completion_a"] == str(eval(row["prompt"][:-1])) else "b")
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    # vendor-1 labels in the other tool, not on our page: added by the import itself.
    assert main(["label", "import", str(labelled), "--db", str(store.path), "--annotator", "vendor-1"]) == 2
    assert "'vendor-1' is not an annotator" in capsys.readouterr().err
    assert main(["label", "import", str(labelled), "--db", str(store.path), "--annotator", "vendor-1",
                 "--add-annotators"]) == 0
    assert "imported 3 labels" in capsys.readouterr().err
    assert main(["label", "import", str(labelled), "--db", str(store.path), "--annotator", "vendor-1"]) == 0
    assert "imported 0 labels" in capsys.readouterr().err  # a re-import adds nothing
    with store.transaction() as tx:
        assert queue.progress(tx, round_id).labels == 3
    # Pairs still short of their labels are what the next export lists.
    assert main(["label", "export", "--db", str(store.path), "--out", str(pending)]) == 0
    assert [json.loads(line)["labels_needed"] for line in pending.read_text().splitlines()] == [1, 1, 1, 2, 2]
    exported = tmp_path / "labels.jsonl"
    assert main(["label", "export", "--labels", "--db", str(store.path), "--out", str(exported)]) == 0
    back = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [(r["pair_id"], r["winner"], r["annotator"]) for r in back] == [
        (r["pair_id"], r["winner"], "vendor-1") for r in rows[:3]]


@pytest.mark.parametrize("lines, message", [
    (['{"pair_id": 1, "winner": "a", "annotator": "bo"}', "{not json"], "labels.jsonl: 1 bad line.*line 2:"),
    (['{"pair_id": 1, "winner": "left", "annotator": "bo"}'], "line 1: winner must be one of"),
    (['{"pair_id": 1, "winner": "a"}'], "line 1: needs a pair_id, a winner and an annotator"),
    (['{"pair_id": true, "winner": "a", "annotator": "bo"}'], "pair_id must be a positive integer"),
    (['{"pair_id": 1000000000000000000000000000000, "winner": "a", "annotator": "bo"}'], "pair_id must be"),
    (['{"pair_id": 1, "winner": "a", "annotator": "x\'); DROP TABLE labels; --"}'], "annotator must be a name"),
    (['[1, 2]'], "must be a JSON object"),
    (['{"pair_id": 1, "winner": "a", "annotator": "bo"}', '{"pair_id": 99, "winner": "a", "annotator": "bo"}'],
     r"line 2: no pair with id 99"),
])
def test_a_bad_import_line_refuses_the_whole_file(store, tmp_path, capsys, lines, message):
    queued_round(store, 2)
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["label", "import", str(path), "--db", str(store.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flywheel: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)
    assert store.read(tables.count, "labels") == 0


# -- the JSON API, served by `flywheel label serve` ----------------------------------------------


@pytest.fixture
def served(store, capsys):
    queued_round(store, 3)
    tokens = {name: add_annotator(store.path, name, capsys) for name in ("alice", "bob")}
    with labelling_server(store.path) as url:
        yield url, tokens


def test_while_people_label_a_round_gets_the_file_at_once_and_an_idle_server_lets_go(store, capsys):
    """The server keeps the file open while people's requests follow each other; a process
    that finds it locked says so and gets it within a moment, and a server with no
    requests closes it after IDLE_BEFORE_CLOSING_S, also for a plain DuckDB."""
    import threading

    import duckdb

    from judges.labelling_app import IDLE_BEFORE_CLOSING_S
    from storage.store import Store

    queued_round(store, 3000)
    tokens = [add_annotator(store.path, f"person{i}", capsys) for i in range(4)]
    stop, labelled, errors = threading.Event(), [], []

    def label_until_stopped(token):
        with httpx.Client(base_url=url, headers=bearer(token), timeout=60) as client:
            while not stop.is_set():
                lease = client.post("/api/next").json()["lease"]
                response = client.post(f"/api/pairs/{lease['pair_id']}/label",
                                       json={"lease_id": lease["lease_id"], "choice": "left"})
                (labelled if response.status_code == 200 else errors).append(response.status_code)

    with labelling_server(store.path) as url:
        people = [threading.Thread(target=label_until_stopped, args=(token,)) for token in tokens]
        for person in people:
            person.start()
        try:
            while len(labelled) < 20:
                time.sleep(0.05)
            waits = []
            for _ in range(3):  # a round's transactions, from this process, while people label
                started = time.monotonic()
                with Store(store.path, lock_timeout_s=10).transaction() as tx:
                    tables.count(tx, "labels")
                waits.append(time.monotonic() - started)
                before = len(labelled)
                while len(labelled) < before + 5:  # the server goes on afterwards
                    time.sleep(0.05)
        finally:
            stop.set()
            for person in people:
                person.join()
        assert errors == [] and max(waits) < 1.5, (errors, waits)
        time.sleep(IDLE_BEFORE_CLOSING_S + 0.5)
        duckdb.connect(str(store.path)).close()  # no retry, no marker: the idle server let go
    assert store.read(tables.count, "labels") == len(labelled)


def test_requests_without_a_valid_token_get_401(served):
    url, tokens = served
    for method, path in [("GET", "/api/me"), ("POST", "/api/next"), ("GET", "/api/progress"),
                         ("GET", "/api/labels"), ("POST", "/api/pairs/1/label"), ("POST", "/api/pairs/1/skip")]:
        for headers in ({}, {"Authorization": "Basic " + tokens["alice"]}, bearer("not-a-token"),
                        bearer("' OR 1=1 --")):
            response = httpx.request(method, url + path, headers=headers, json={"lease_id": 1, "choice": "tie"})
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/api/me", headers=bearer(tokens["alice"])).json() == {
        "annotator": "alice", "labels": 0, "gold_labels": 0, "gold_accuracy": None, "labels_per_hour": None}


def test_malformed_bodies_get_422_with_a_message_and_unknown_pairs_404(served, store):
    url, tokens = served
    alice = bearer(tokens["alice"])
    lease = httpx.post(url + "/api/next", headers=alice).json()["lease"]
    label_url = f"{url}/api/pairs/{lease['pair_id']}/label"
    for body, where in [({"choice": "left"}, "body.lease_id: Field required"),
                        ({"lease_id": "1; DROP TABLE labels", "choice": "left"}, "body.lease_id"),
                        ({"lease_id": lease["lease_id"], "choice": "left'; DROP TABLE labels; --"}, "body.choice"),
                        ({"lease_id": lease["lease_id"], "choice": "left", "admin": True}, "body.admin"),
                        ({"lease_id": lease["lease_id"], "choice": "left", "rationale": "x" * 2001}, "body.rationale")]:
        response = httpx.post(label_url, headers=alice, json=body)
        assert response.status_code == 422 and where in response.json()["detail"], response.text
    for content, kind in [(b"{oops", "application/json"), (b'{"lease_id": NaN, "choice": "tie"}', "application/json"),
                          (b"\xff\xfe not json", "text/plain")]:
        response = httpx.post(label_url, headers={**alice, "Content-Type": kind}, content=content)
        assert response.status_code == 422 and response.json()["detail"].startswith("malformed request"), content
    # No token and a bad body: the token is checked first.
    assert httpx.post(label_url, headers={"Content-Type": "application/json"}, content=b"{oops").status_code == 401
    response = httpx.post(f"{url}/api/pairs/{2**70}/label", headers=alice, json={"lease_id": 2**70, "choice": "tie"})
    assert response.status_code == 422 and "path.pair_id" in response.json()["detail"]
    response = httpx.post(f"{url}/api/pairs/1%20OR%201=1/label", headers=alice, json={"lease_id": 1, "choice": "tie"})
    assert response.status_code == 422 and "path.pair_id" in response.json()["detail"]
    response = httpx.post(f"{url}/api/pairs/424242/label", headers=alice,
                          json={"lease_id": lease["lease_id"], "choice": "tie"})
    assert response.status_code == 404 and response.json()["detail"] == "no pair with id 424242"
    # Bob cannot answer alice's lease; then alice's rationale is stored as text, not run.
    response = httpx.post(label_url, headers=bearer(tokens["bob"]), json={"lease_id": lease["lease_id"], "choice": "tie"})
    assert response.status_code == 403
    rationale = "'); DELETE FROM labels; --"
    response = httpx.post(label_url, headers=alice,
                          json={"lease_id": lease["lease_id"], "choice": "right", "rationale": rationale})
    assert response.status_code == 200
    assert store.query("SELECT annotator, rationale FROM labels")[1] == [("alice", rationale)]
    assert {t for (t,) in store.query("SELECT table_name FROM duckdb_tables()")[1]} >= {"labels", "pairs", "annotators"}
    # Each annotator sees only their own labels.
    assert [l["pair_id"] for l in httpx.get(url + "/api/labels", headers=alice).json()["labels"]] == [lease["pair_id"]]
    assert httpx.get(url + "/api/labels", headers=bearer(tokens["bob"])).json()["labels"] == []
    progress = httpx.get(url + "/api/progress", headers=bearer(tokens["bob"])).json()
    assert (progress["labels"], progress["remaining"], progress["mine"]) == (1, 2, 0)


# -- the page, in headless Chromium -------------------------------------------------------------------


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_labelling_page_in_chromium_labels_pairs_with_the_keyboard(served, store, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, tokens = served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.goto(url + "/")
        page.fill("#token", "wrong-token")
        page.click("button[type=submit]")
        expect(page.locator("#login-error")).to_have_text("That token is not valid.")
        page.fill("#token", tokens["alice"])
        page.keyboard.press("Enter")
        expect(page.locator("#who")).to_have_text("labelling as alice")
        expect(page.locator("#done")).to_have_text("0")
        expect(page.locator("#remaining")).to_have_text("3")
        expect(page.locator("#lease")).to_contain_text("yours until")  # keys count once a pair shows
        first_prompt = page.locator("#prompt").inner_text()
        left_text = page.locator("#left").inner_text()
        page.keyboard.press("ArrowLeft")  # left is better
        expect(page.locator("#done")).to_have_text("1")
        expect(page.locator("#mine")).to_have_text("1")
        expect(page.locator("#remaining")).to_have_text("2")
        expect(page.locator("#prompt")).not_to_have_text(first_prompt)
        second_prompt = page.locator("#prompt").inner_text()
        page.keyboard.press("s")  # skip the second pair
        expect(page.locator("#message")).to_contain_text("Skipped pair")
        expect(page.locator("#prompt")).not_to_have_text(second_prompt)
        page.keyboard.press("t")  # tie on the third
        expect(page.locator("#mine")).to_have_text("2")
        expect(page.locator("#message")).to_contain_text("Nothing left to label")
        page.screenshot(path=str(tmp_path / "labelling-page.png"))
        browser.close()
    _, rows = store.query(
        "SELECT l.winner, e.left_slot, ca.text, cb.text FROM labels l JOIN label_leases e USING (label_id) "
        "JOIN pairs p ON p.pair_id = l.pair_id JOIN completions ca ON ca.completion_id = p.completion_a_id "
        "JOIN completions cb ON cb.completion_id = p.completion_b_id ORDER BY l.label_id")
    (winner, left_slot, a_text, b_text), (second_winner, *_) = rows
    assert winner == left_slot and left_text == (a_text if left_slot == "a" else b_text)
    assert second_winner == "tie"
    _, skipped = store.query("SELECT annotator FROM label_leases WHERE outcome = 'skipped'")
    assert skipped == [("alice",)]


def test_serve_enqueue_and_judge_mistakes_are_one_line_errors(store, tmp_path, capsys):
    import socket

    round_with_pairs(store, 1)
    assert main(["label", "enqueue", "--db", str(store.path), "--round", "1"]) == 2
    assert "has no judge yet" in capsys.readouterr().err
    assert main(["label", "enqueue", "--db", str(store.path), "--round", "1", "--lease-minutes", "1e300"]) == 2
    assert "at most 10080" in capsys.readouterr().err
    assert main(["judge", "--judge", "human", "--db", str(store.path), "--round", "1"]) == 2
    assert "people label through the queue" in capsys.readouterr().err
    assert main(["label", "export", "--db", str(store.path), "--out", str(tmp_path / "no" / "such.jsonl")]) == 2
    assert "cannot write" in capsys.readouterr().err
    binary = tmp_path / "labels.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    assert main(["label", "import", str(binary), "--db", str(store.path)]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["label", "serve", "--db", str(store.path), "--port", "70000"])
    assert "must be in 1-65535" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["label", "enqueue", "--db", str(store.path), "--round", "1", "--lease-minutes", "-1"])
    assert usage.value.code == 2 and "must be a number greater than 0" in capsys.readouterr().err
    assert main(["label", "enqueue", "--db", str(store.path), "--round", "9"]) == 2
    assert "round 9 has no pairs" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["label", "serve", "--db", str(store.path), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["label", "serve", "--db", str(store.path.with_name("missing.duckdb"))]) == 2
    assert "no flywheel database" in capsys.readouterr().err
