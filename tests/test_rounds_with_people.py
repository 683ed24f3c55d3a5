"""Rounds labelled by people, and people labelling while a flow round writes the same file.

Real parts throughout: the vLLM engine, the Prefect flow, DuckDB files, and the
labelling app as `flywheel label serve` in its own process, driven over HTTP.
"""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from conftest import E2E_SAMPLE, run_flow
from label_server import labelling_server
from cli.main import main
from flywheel.config import EvalConfig, FlywheelConfig, JudgeConfig, TrainConfig
from flywheel.examples.addition import addition_score
from flywheel.labelling import label_pairs
from flywheel.rounds import Flywheel
from queue_data import round_with_pairs
from storage.queue import CHOICES
from storage import queue
from storage import tables

pytestmark = pytest.mark.slow

ADDITION = "flywheel.examples.addition:addition_score"


def make_flywheel(workdir, tiny_policy, demo_prompts, sampler, judge: JudgeConfig) -> Flywheel:
    prompts, heldout = demo_prompts
    config = FlywheelConfig(
        workdir=workdir, reference_model=tiny_policy, prompts=prompts, heldout_prompts=heldout, seed=7,
        judge=judge, sample=E2E_SAMPLE, train=TrainConfig(learning_rate=1e-4, batch_size=16),
        eval=EvalConfig(samples_per_prompt=2, accuracy_score=ADDITION),
    )
    flywheel = Flywheel(config, sampler=sampler)
    flywheel.initialise()
    return flywheel


def add_annotators(database, names, capsys) -> dict[str, str]:
    tokens = {}
    for name in names:
        capsys.readouterr()
        assert main(["annotators", "add", name, "--db", str(database)]) == 0
        tokens[name] = capsys.readouterr().out.strip()
    return tokens


def right_answer(prompt: str) -> str:
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b))


def test_a_human_round_waits_for_people_then_trains_on_their_labels(
        tiny_policy, demo_prompts, policy_sampler, prefect_harness, tmp_path, capsys):
    judge = JudgeConfig("human", {"quota_fraction": 0.5, "lease_minutes": 5})
    flywheel = make_flywheel(tmp_path, tiny_policy, demo_prompts, policy_sampler, judge)
    store = flywheel.store
    # First run: the round samples and pairs, queues its pairs, and the run stops there.
    assert run_flow(flywheel, rounds=3) == [1]
    assert store.read(tables.get_round, 1).state == "labelling"
    pairs = store.read(tables.count, "pairs", "round_id = 1")
    quota = -(-pairs // 2)
    _, request = store.query("SELECT quota_pairs, labels_per_pair, closed_at FROM label_requests")
    assert request == [(quota, 1, None)] and store.read(tables.count, "label_queue") == pairs > 0
    # A run before people have labelled enough still waits, and queues nothing twice.
    assert run_flow(flywheel, rounds=1) == [1]
    assert store.read(tables.get_round, 1).state == "labelling" and store.read(tables.count, "label_queue") == pairs
    assert store.read(tables.count, "train_steps") == 0

    # People label through the served API: the right sum wins; two right or two wrong tie.
    tokens = add_annotators(store.path, ["alice", "bob"], capsys)
    with labelling_server(store.path) as url:
        for done in range(quota):
            headers = {"Authorization": f"Bearer {tokens['alice' if done % 2 else 'bob']}"}
            lease = httpx.post(url + "/api/next", headers=headers).json()["lease"]
            left_ok, right_ok = (lease[side] == right_answer(lease["prompt"]) for side in ("left", "right"))
            choice = "left" if left_ok > right_ok else "right" if right_ok > left_ok else "tie"
            response = httpx.post(f"{url}/api/pairs/{lease['pair_id']}/label", headers=headers,
                                  json={"lease_id": lease["lease_id"], "choice": choice})
            assert response.status_code == 200, response.text

    # The next run picks the round up and trains on what people labelled.
    assert run_flow(flywheel, rounds=1) == [1]
    assert store.read(tables.get_round, 1).state == "done"
    _, summary = store.query("SELECT judge, labels, preferences, train_steps, win_rate FROM round_summary")
    judge_name, labels, preferences, train_steps, win_rate = summary[0]
    assert (judge_name, labels) == ("human@1", quota)
    _, decided = store.query("SELECT count(*) FROM labels WHERE annotator IS NOT NULL AND winner IN ('a', 'b')")
    assert preferences == decided[0][0] > 0 and train_steps > 0 and win_rate is not None
    assert len(store.read(tables.preference_triples, 1)) == preferences
    # Every trained preference picked the right sum (the people were right).
    _, chosen = store.query("SELECT prompt, chosen, rejected FROM preferences WHERE round_id = 1")
    assert all(addition_score(p, c) == 1 and addition_score(p, r) == 0 for p, c, r in chosen)
    _, closed = store.query("SELECT closed_because FROM label_requests")
    assert closed == [("quota",)]
    # The pairs nobody labelled are still queued for people.
    with store.transaction() as tx:
        assert len(queue.pending_pairs(tx, 1)) == pairs - quota
    flywheel.close()


def test_eight_annotators_label_500_pairs_while_a_flow_round_writes(
        tiny_policy, demo_prompts, policy_sampler, prefect_harness, tmp_path, capsys):
    flywheel = make_flywheel(tmp_path, tiny_policy, demo_prompts, policy_sampler,
                             JudgeConfig(f"rule:{ADDITION}", {"name": "adder"}))
    store = flywheel.store
    # An earlier round's 500 pairs, labelled by the rule judge and queued for people (k = 1)
    # to compare with it, while the flow runs a new round.
    old_round = round_with_pairs(store, 500)
    with store.transaction() as tx:
        tables.claim_round_judge(tx, old_round, flywheel.judge.name, flywheel.judge.version)
        tables.finish_step(tx, old_round, "done")
    label_pairs(store, flywheel.judge, old_round, batch_size=256, progress=False)
    assert main(["label", "enqueue", "--db", str(store.path), "--round", str(old_round)]) == 0
    names = [f"annotator-{i}" for i in range(8)]
    tokens = add_annotators(store.path, names, capsys)
    results: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    failures: list[str] = []
    finished_at: list[float] = []

    def label_until_empty(name: str) -> None:
        choices = random.Random(name)
        headers = {"Authorization": f"Bearer {tokens[name]}"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            while True:
                response = client.post("/api/next")
                if response.status_code != 200:
                    failures.append(f"{name} next: {response.status_code} {response.text}")
                    return
                lease = response.json()["lease"]
                if lease is None:
                    finished_at.append(time.monotonic())
                    return
                response = client.post(f"/api/pairs/{lease['pair_id']}/label", json={
                    "lease_id": lease["lease_id"], "choice": choices.choice(CHOICES)})
                if response.status_code != 200:
                    failures.append(f"{name} label {lease['pair_id']}: {response.status_code} {response.text}")
                    return
                results[name].append((lease["pair_id"], response.json()["label_id"]))

    with labelling_server(store.path) as url:
        threads = [threading.Thread(target=label_until_empty, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        flow_started = time.monotonic()
        round_ids = run_flow(flywheel, rounds=1)
        flow_finished = time.monotonic()
        for thread in threads:
            thread.join(timeout=600)
    assert failures == []
    # The two really overlapped: the flow started before the people had finished.
    assert flow_started < min(finished_at)
    labelled = [pair for name in names for pair, _ in results[name]]
    assert len(labelled) == 500 and len(set(labelled)) == 500
    assert sum(1 for name in names if results[name]) >= 2  # the work was shared
    _, per_pair = store.query("SELECT pair_id, count(*) FROM labels WHERE annotator IS NOT NULL GROUP BY pair_id "
                              "HAVING count(*) <> 1")
    assert per_pair == [] and store.read(tables.count, "labels", "annotator IS NOT NULL") == 500
    _, stored = store.query("SELECT label_id FROM labels WHERE annotator IS NOT NULL ORDER BY label_id")
    assert sorted(label for name in names for _, label in results[name]) == [row[0] for row in stored]
    _, agreement = store.query("SELECT judge_b, pairs FROM judge_agreement WHERE judge_a = ? "
                               "AND judge_b LIKE 'human@1 (%' ORDER BY judge_b",
                               [f"{flywheel.judge.name}@{flywheel.judge.version}"])
    assert sum(pairs for _, pairs in agreement) == 500
    # And the flow's round finished with everything it wrote.
    assert round_ids == [old_round + 1] and store.read(tables.get_round, old_round + 1).state == "done"
    _, summary = store.query(f"SELECT completions, labels = pairs FROM round_summary WHERE round_id = {old_round + 1}")
    assert summary == [(E2E_SAMPLE.prompts_per_round * E2E_SAMPLE.n, True)]
    print(f"labelling took {max(finished_at) - flow_started:.1f} s; the flow round {flow_finished - flow_started:.1f} s")
    flywheel.close()
