"""People who label well, and control over who may label: guidelines, gold pairs, per-person
statistics, chance-corrected agreement, revocation, strict imports, no deadlock, body limits.

Real parts as in test_labelling_queue: a DuckDB file, `flywheel label serve` in its own
process over HTTP, and the page in Debian's Chromium.
"""

from __future__ import annotations

import json
import ssl
import subprocess

import httpx
import pytest

from cli.main import main
from label_server import labelling_server
from judges import HumanJudge
from judges.human import HUMAN_JUDGE_NAME, people_warnings, ready_to_train
from queue_data import new_store, round_with_pairs
from storage import queue, tables
from storage.records import Label
from test_labelling_queue import CHROMIUM, CHROMIUM_ARGS, add_annotator, bearer

ADDITION = "rule:flywheel.examples.addition:addition_score"


@pytest.fixture
def store(tmp_path):
    return new_store(tmp_path)


def queue_round(store, judge: HumanJudge, num_pairs: int) -> int:
    """A round of `num_pairs` pairs (completion a the right sum, b one off) queued for people
    as a `judge: human` round queues itself."""
    round_id = round_with_pairs(store, num_pairs)
    with store.transaction() as tx:
        tables.claim_round_judge(tx, round_id, judge.name, judge.version)
        judge.queue_round(tx, round_id, queue.utc_now())
    return round_id


def right_side(lease: dict) -> str:
    a, b = lease["prompt"].rstrip("=").split("+")
    return "left" if lease["left"] == str(int(a) + int(b)) else "right"


def label_everything(url: str, token: str, choose) -> int:
    """Label every pair the queue hands this person, `choose(lease) -> choice`; how many."""
    done = 0
    while (lease := httpx.post(url + "/api/next", headers=bearer(token)).json()["lease"]) is not None:
        response = httpx.post(f"{url}/api/pairs/{lease['pair_id']}/label", headers=bearer(token),
                              json={"lease_id": lease["lease_id"], "choice": choose(lease)})
        assert response.status_code == 200, response.text
        done += 1
    return done


# -- control -----------------------------------------------------------------------------------


def test_a_person_revoked_while_the_server_runs_gets_401_at_once_and_keeps_their_labels(store, capsys):
    queue_round(store, HumanJudge(), 3)
    token = add_annotator(store.path, "alice", capsys)
    with labelling_server(store.path) as url:
        lease = httpx.post(url + "/api/next", headers=bearer(token)).json()["lease"]
        assert httpx.post(f"{url}/api/pairs/{lease['pair_id']}/label", headers=bearer(token),
                          json={"lease_id": lease["lease_id"], "choice": "left"}).status_code == 200
        held = httpx.post(url + "/api/next", headers=bearer(token)).json()["lease"]
        assert main(["annotators", "revoke", "alice", "--db", str(store.path)]) == 0
        # The very next request, to the server that accepted the token a moment ago.
        for method, path in [("GET", "/api/me"), ("POST", "/api/next"), ("GET", "/api/labels")]:
            assert httpx.request(method, url + path, headers=bearer(token)).status_code == 401
    capsys.readouterr()
    assert main(["annotators", "list", "--db", str(store.path)]) == 0
    assert "revoked" in capsys.readouterr().out
    assert store.read(tables.count, "labels", "annotator = 'alice'") == 1  # her label stays
    # Her live lease ended with her token: the pair is free for someone else at once.
    with store.transaction() as tx:
        assert queue.claim_next_pair(tx, "bob", queue.utc_now(), "a").pair_id == held["pair_id"]
    assert main(["annotators", "revoke", "alice", "--db", str(store.path)]) == 2
    assert "revoked already" in capsys.readouterr().err


def test_an_import_naming_a_ghost_or_an_unknown_pair_is_refused_whole_with_each_line(store, tmp_path, capsys):
    queue_round(store, HumanJudge(), 2)
    add_annotator(store.path, "alice", capsys)
    path = tmp_path / "labels.jsonl"
    lines = [{"pair_id": 1, "winner": "a", "annotator": "alice"},
             {"pair_id": 2, "winner": "b", "annotator": "ghost"},
             {"pair_id": 999, "winner": "tie", "annotator": "alice"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    capsys.readouterr()
    assert main(["label", "import", str(path), "--db", str(store.path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "2 bad lines, nothing imported" in err
    assert "line 2: 'ghost' is not an annotator" in err and "line 3: no pair with id 999" in err
    assert store.read(tables.count, "labels") == 0 and store.read(tables.count, "annotators") == 1
    path.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    assert main(["label", "import", str(path), "--db", str(store.path), "--add-annotators"]) == 0
    assert store.query("SELECT annotator, winner FROM labels ORDER BY label_id")[1] == [("alice", "a"), ("ghost", "b")]
    assert "ghost" in dict((name, status) for name, status, _ in store.read(queue.annotators))


def test_a_round_every_person_skipped_or_asked_for_more_people_than_exist_still_closes(store, capsys):
    judge = HumanJudge(labels_per_pair=1)
    skipped_round = queue_round(store, judge, 3)
    tokens = {name: add_annotator(store.path, name, capsys) for name in ("alice", "bob")}
    with labelling_server(store.path) as url:
        for token in tokens.values():  # both skip pair 1 and label the rest
            while (lease := httpx.post(url + "/api/next", headers=bearer(token)).json()["lease"]) is not None:
                action = "skip" if lease["pair_id"] == 1 else "label"
                httpx.post(f"{url}/api/pairs/{lease['pair_id']}/{action}", headers=bearer(token),
                           json={"lease_id": lease["lease_id"], **({"choice": "left"} if action == "label" else {})})
        assert httpx.post(url + "/api/next", headers=bearer(tokens["bob"])).json()["lease"] is None
    with store.transaction() as tx:
        request, progress = queue.label_request(tx, skipped_round), queue.progress(tx, skipped_round)
    # Before: pair 1 needed a label nobody would give, and the round waited for ever.
    assert (progress.pairs_done, progress.pairs_exhausted) == (3, 1)
    assert ready_to_train(request, progress, queue.utc_now()) == "quota"
    assert any("skipped by every active annotator" in w for w in people_warnings(request, progress))

    wanting = queue_round(store, HumanJudge(labels_per_pair=3), 2)  # 3 labels a pair, 2 people
    with labelling_server(store.path) as url:
        for token in tokens.values():
            label_everything(url, token, lambda lease: "left")
    with store.transaction() as tx:
        request, progress = queue.label_request(tx, wanting), queue.progress(tx, wanting)
    assert progress.pairs_done == 2 and ready_to_train(request, progress, queue.utc_now()) == "quota"
    assert any("3 labels per pair are asked of 2 active" in w for w in people_warnings(request, progress))
    # Nobody to label yet is not "exhausted": a round queued before people are added waits.
    (store.path.parent / "lonely").mkdir()
    lonely = new_store(store.path.parent / "lonely")
    queue_round(lonely, HumanJudge(), 2)
    with lonely.transaction() as tx:
        assert queue.progress(tx).pairs_done == 0


def test_bodies_over_the_limit_get_413_unread_and_malformed_ones_422(store, capsys):
    queue_round(store, HumanJudge(), 2)
    token = add_annotator(store.path, "alice", capsys)
    with labelling_server(store.path) as url:
        lease = httpx.post(url + "/api/next", headers=bearer(token)).json()["lease"]
        label_url = f"{url}/api/pairs/{lease['pair_id']}/label"
        headers = {**bearer(token), "Content-Type": "application/json"}
        megabyte = b'{"lease_id": 1, "choice": "tie", "rationale": "' + b"x" * 2**20 + b'"}'
        response = httpx.post(label_url, headers=headers, content=megabyte)
        assert response.status_code == 413 and "over 65536 bytes" in response.json()["detail"]
        # Sent in chunks with no Content-Length: refused once the bytes read pass the limit.
        response = httpx.post(label_url, headers=headers, content=(megabyte[i:i + 8192]
                                                                  for i in range(0, len(megabyte), 8192)))
        assert response.status_code == 413
        # JSON nested deeper than Python parses (FastAPI's own answer was 400).
        response = httpx.post(label_url, headers=headers, content=b"[" * 10_000 + b"]" * 10_000)
        assert response.status_code == 422 and response.json()["detail"].startswith("malformed request")
        # The server keeps answering, and the lease is still good.
        assert httpx.get(url + "/api/me", headers=bearer(token)).status_code == 200
        assert httpx.post(label_url, headers=bearer(token),
                          json={"lease_id": lease["lease_id"], "choice": "tie"}).status_code == 200


def test_a_persons_labels_come_a_page_at_a_time(store, capsys):
    queue_round(store, HumanJudge(), 5)
    token = add_annotator(store.path, "alice", capsys)
    with labelling_server(store.path) as url:
        label_everything(url, token, lambda lease: "tie")
        seen, before = [], None
        while True:
            page = httpx.get(url + "/api/labels", headers=bearer(token),
                             params={"limit": 2, **({"before": before} if before else {})}).json()
            seen += [label["label_id"] for label in page["labels"]]
            if (before := page["next_before"]) is None:
                break
        assert seen == [5, 4, 3, 2, 1]
        assert httpx.get(url + "/api/labels", headers=bearer(token), params={"limit": 0}).status_code == 422


def test_label_serve_serves_https_with_a_key_and_certificate(store, tmp_path):
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(certificate), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    with labelling_server(store.path, "--ssl-keyfile", str(key), "--ssl-certfile", str(certificate)) as url:
        assert url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(certificate))
        assert httpx.get(url + "/", verify=trusted).status_code == 200
        with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
            httpx.get(url.replace("https://", "http://") + "/", timeout=5).raise_for_status()
    assert main(["label", "serve", "--db", str(store.path), "--ssl-keyfile", str(key)]) == 2


# -- quality --------------------------------------------------------------------------------------


def test_a_person_wrong_on_gold_pairs_keeps_their_labels_out_of_training(store, tmp_path, capsys):
    judge = HumanJudge(labels_per_pair=2, gold_judge=ADDITION, gold_rate=0.5, min_gold_accuracy=0.75)
    round_id = queue_round(store, judge, 8)
    # The rule settles every pair (a is the right sum); half of them became gold, unmarked.
    assert store.read(tables.count, "gold_answers") == 4
    tokens = {name: add_annotator(store.path, name, capsys) for name in ("alice", "mallory")}
    with labelling_server(store.path) as url:
        assert label_everything(url, tokens["alice"], right_side) == 8
        assert label_everything(url, tokens["mallory"], lambda l: "right" if right_side(l) == "left" else "left") == 8
        me = httpx.get(url + "/api/me", headers=bearer(tokens["mallory"])).json()
        assert (me["gold_labels"], me["gold_accuracy"]) == (4, 0.0)
    _, stats = store.query("SELECT annotator, labels, gold_labels, gold_accuracy, majority_agreement "
                           "FROM annotator_stats ORDER BY annotator")
    assert stats == [("alice", 8, 4, 1.0, 0.0), ("mallory", 8, 4, 0.0, 0.0)]
    with store.transaction() as tx:
        request, progress = queue.label_request(tx, round_id), queue.progress(tx, round_id)
        assert progress.left_out == ("mallory",)
        assert ready_to_train(request, progress, queue.utc_now()) == "quota"
        queue.close_request(tx, round_id, "quota", queue.utc_now())
    _, left_out = store.query("SELECT left_out_annotators FROM labelling_progress")
    assert left_out == [(["mallory"],)]
    # The round trains on alice's 8 labels only, every one choosing the right sum (a).
    triples = store.read(tables.preference_triples, round_id)
    _, chosen = store.query("SELECT DISTINCT c.sample_index FROM completions c WHERE completion_id IN "
                            f"({', '.join(str(t.chosen_completion_id) for t in triples)})")
    assert len(triples) == 8 and chosen == [(0,)]
    assert store.read(tables.count, "labels", "annotator = 'mallory'") == 8  # kept
    out = tmp_path / "people.jsonl"
    assert main(["export", "--db", str(store.path), "--out", str(out), "--people-only"]) == 0
    # Every person's labels, with their gold accuracy beside them: mallory's too, to see.
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["annotator"], r["annotator_gold_accuracy"]) for r in rows} == {("alice", 1.0), ("mallory", 0.0)}


def test_cohen_kappa_matches_a_hand_worked_value(store):
    round_id = round_with_pairs(store, 10)
    x = ["a", "a", "a", "a", "b", "b", "b", "tie", "tie", "both_bad"]
    y = ["a", "a", "a", "b", "b", "b", "a", "tie", "both_bad", "both_bad"]
    with store.transaction() as tx:
        tables.add_labels(tx, [Label(i + 1, w, "x", "1") for i, w in enumerate(x)]
                          + [Label(i + 1, w, "y", "1") for i, w in enumerate(y)])
    # p_o = 7/10. Shares: x a 4, b 3, tie 2, both_bad 1; y a 4, b 3, tie 1, both_bad 2;
    # p_e = (4*4 + 3*3 + 2*1 + 1*2) / 100 = 0.29; kappa = (0.7 - 0.29) / (1 - 0.29) = 0.41 / 0.71.
    _, rows = store.query("SELECT judge_a, judge_b, agreement_rate, cohen_kappa FROM judge_agreement")
    assert rows == [("x@1", "y@1", pytest.approx(0.7), pytest.approx(0.41 / 0.71))]
    assert round_id == 1


def test_krippendorff_alpha_matches_a_hand_worked_value(store):
    round_id = round_with_pairs(store, 5)
    people = {"ann": ["a", "a", "b", "tie", "a"], "bea": ["a", "b", "b", "tie", None],
              "cy": ["a", None, "tie", None, None]}
    with store.transaction() as tx:
        tables.add_labels(tx, [Label(pair + 1, winner, HUMAN_JUDGE_NAME, "1", annotator=name)
                               for name, winners in people.items() for pair, winner in enumerate(winners)
                               if winner is not None])
    # Pair 5 has one label: not pairable. Coincidences (ordered pairs of labels from
    # different people on a pair, each weighted 1 / (m - 1)): pair 1 (a,a,a) o_aa = 6/2;
    # pair 2 (a,b) o_ab = o_ba = 1; pair 3 (b,b,tie) o_bb = 2/2, o_bt = o_tb = 2/2;
    # pair 4 (tie,tie) o_tt = 2. n_a = 4, n_b = 3, n_tie = 3, n = 10. Disagreement
    # o_ab + o_ba + o_bt + o_tb = 4; sum_{c != k} n_c n_k = 100 - (16 + 9 + 9) = 66.
    # alpha = 1 - (n - 1) * 4 / 66 = 1 - 36/66 = 5/11 (the `krippendorff` package agrees).
    _, rows = store.query("SELECT round_id, people, pairs, krippendorff_alpha FROM people_alpha")
    assert rows == [(round_id, 3, 4, pytest.approx(5 / 11))]


def test_the_page_shows_guidelines_on_the_first_pair_and_the_persons_own_gold_accuracy(store, tmp_path, capsys):
    from playwright.sync_api import expect, sync_playwright

    guidelines = tmp_path / "guidelines.md"
    guidelines.write_text("# How to judge\n\nPick the answer that is the exact sum.\n")
    queue_round(store, HumanJudge(guidelines_file=str(guidelines), gold_judge=ADDITION, gold_rate=0.5), 4)
    token = add_annotator(store.path, "alice", capsys)
    with labelling_server(store.path) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(url + "/")
        page.fill("#token", token)
        page.keyboard.press("Enter")
        expect(page.locator("#lease")).to_contain_text("yours until")
        # Her first pair of the request: the guidelines open, in full.
        expect(page.locator("#guidelines-text")).to_have_text(guidelines.read_text())
        assert page.locator("#guidelines").get_attribute("open") is not None
        expect(page.locator("#gold")).to_have_text("–")  # no gold answered yet
        page.click("#guidelines summary")  # folded by her, it stays folded
        for index in range(4):
            prompt = page.locator("#prompt").inner_text()
            a, b = prompt.rstrip("=").split("+")
            page.keyboard.press("ArrowLeft" if page.locator("#left").inner_text() == str(int(a) + int(b))
                                else "ArrowRight")
            if index < 3:
                expect(page.locator("#prompt")).not_to_have_text(prompt)
            assert page.locator("#guidelines").get_attribute("open") is None
        expect(page.locator("#message")).to_contain_text("Nothing left to label")
        expect(page.locator("#gold")).to_have_text("100% of 2")
        expect(page.locator("#rate")).not_to_have_text("–")
        browser.close()
