"""Numbered schema migrations, applied in order on open and recorded in a table.

Modelled on simonw/llm's ``migrations.py``: each migration is a function named
``mNNN_what_it_does``; the table ``_flywheel_migrations`` records which ones ran.
A database that has run a migration this code does not know was written by a newer
flywheel and is refused rather than silently misread.
"""

from __future__ import annotations

from typing import Callable

import duckdb

Migration = Callable[[duckdb.DuckDBPyConnection], None]
MIGRATIONS: list[Migration] = []

MIGRATIONS_TABLE = "_flywheel_migrations"


# Each labeller's latest label of each pair, as the CTEs `labelled` and `latest` (a
# labeller is a judge name@version, or one person): m003's judge_agreement and m011's.
_LATEST_LABEL_BY_LABELLER = (
    """
        WITH labelled AS (
            SELECT pair_id, winner,
                   judge_name || '@' || judge_version || coalesce(' (' || annotator || ')', '') AS labeller,
                   label_id
            FROM labels
        ),
        latest AS (
            SELECT pair_id, labeller, arg_max(winner, label_id) AS winner
            FROM labelled GROUP BY pair_id, labeller
        )"""
)


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_core_tables(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        CREATE SEQUENCE prompt_ids START 1;
        CREATE TABLE prompts (
            prompt_id   BIGINT PRIMARY KEY DEFAULT nextval('prompt_ids'),
            text        VARCHAR NOT NULL,
            split       VARCHAR NOT NULL CHECK (split IN ('train', 'heldout')),
            source      VARCHAR,
            created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
            UNIQUE (text, split)
        );

        CREATE SEQUENCE checkpoint_ids START 1;
        CREATE TABLE checkpoints (
            checkpoint_id        BIGINT PRIMARY KEY DEFAULT nextval('checkpoint_ids'),
            path                 VARCHAR NOT NULL,
            role                 VARCHAR NOT NULL CHECK (role IN ('reference', 'candidate')),
            parent_checkpoint_id BIGINT,
            round_id             BIGINT,
            status               VARCHAR NOT NULL
                                 CHECK (status IN ('candidate', 'promoted', 'rejected')),
            created_at           TIMESTAMP NOT NULL DEFAULT current_timestamp,
            promoted_at          TIMESTAMP
        );

        CREATE SEQUENCE round_ids START 1;
        CREATE TABLE rounds (
            round_id                BIGINT PRIMARY KEY DEFAULT nextval('round_ids'),
            state                   VARCHAR NOT NULL,
            policy_checkpoint_id    BIGINT NOT NULL,
            reference_checkpoint_id BIGINT NOT NULL,
            candidate_checkpoint_id BIGINT,
            seed                    BIGINT NOT NULL,
            config                  JSON,
            started_at              TIMESTAMP NOT NULL DEFAULT current_timestamp,
            updated_at              TIMESTAMP NOT NULL DEFAULT current_timestamp,
            finished_at             TIMESTAMP
        );

        CREATE SEQUENCE completion_ids START 1;
        CREATE TABLE completions (
            completion_id      BIGINT PRIMARY KEY DEFAULT nextval('completion_ids'),
            round_id           BIGINT,
            prompt_id          BIGINT NOT NULL,
            checkpoint_id      BIGINT NOT NULL,
            purpose            VARCHAR NOT NULL CHECK (purpose IN ('train', 'eval')),
            sample_index       INTEGER NOT NULL,
            text               VARCHAR NOT NULL,
            prompt_token_ids   INTEGER[] NOT NULL,
            token_ids          INTEGER[] NOT NULL,
            num_tokens         INTEGER NOT NULL,
            cumulative_logprob DOUBLE,
            finish_reason      VARCHAR,
            sampling_params    JSON NOT NULL,
            created_at         TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        CREATE SEQUENCE pair_ids START 1;
        CREATE TABLE pairs (
            pair_id         BIGINT PRIMARY KEY DEFAULT nextval('pair_ids'),
            round_id        BIGINT NOT NULL,
            prompt_id       BIGINT NOT NULL,
            completion_a_id BIGINT NOT NULL,
            completion_b_id BIGINT NOT NULL,
            strategy        VARCHAR NOT NULL,
            created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        CREATE SEQUENCE label_ids START 1;
        CREATE TABLE labels (
            label_id      BIGINT PRIMARY KEY DEFAULT nextval('label_ids'),
            pair_id       BIGINT NOT NULL,
            winner        VARCHAR NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),
            judge_name    VARCHAR NOT NULL,
            judge_version VARCHAR NOT NULL,
            annotator     VARCHAR,
            confidence    DOUBLE,
            rationale     VARCHAR,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        CREATE TABLE train_steps (
            round_id        BIGINT NOT NULL,
            checkpoint_id   BIGINT NOT NULL,
            step            INTEGER NOT NULL,
            loss            DOUBLE NOT NULL,
            chosen_reward   DOUBLE NOT NULL,
            rejected_reward DOUBLE NOT NULL,
            reward_margin   DOUBLE NOT NULL,
            accuracy        DOUBLE NOT NULL,
            grad_norm       DOUBLE NOT NULL,
            learning_rate   DOUBLE NOT NULL,
            num_pairs       INTEGER NOT NULL,
            created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (checkpoint_id, step)
        );

        CREATE SEQUENCE eval_ids START 1;
        CREATE TABLE evals (
            eval_id                  BIGINT PRIMARY KEY DEFAULT nextval('eval_ids'),
            round_id                 BIGINT NOT NULL,
            checkpoint_id            BIGINT NOT NULL,
            incumbent_checkpoint_id  BIGINT NOT NULL,
            num_prompts              INTEGER NOT NULL,
            num_samples              INTEGER NOT NULL,
            accuracy                 DOUBLE,
            incumbent_accuracy       DOUBLE,
            win_rate                 DOUBLE NOT NULL,
            mean_length              DOUBLE NOT NULL,
            created_at               TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        """
    )


@migration
def m002_views(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        -- One row per labelled pair with a winner: the triples other DPO tools eat.
        CREATE VIEW preferences AS
        SELECT
            l.label_id,
            p.pair_id,
            p.round_id,
            pr.prompt_id,
            pr.text AS prompt,
            CASE WHEN l.winner = 'a' THEN ca.text ELSE cb.text END AS chosen,
            CASE WHEN l.winner = 'a' THEN cb.text ELSE ca.text END AS rejected,
            CASE WHEN l.winner = 'a' THEN ca.completion_id ELSE cb.completion_id END
                AS chosen_completion_id,
            CASE WHEN l.winner = 'a' THEN cb.completion_id ELSE ca.completion_id END
                AS rejected_completion_id,
            l.judge_name AS judge,
            l.judge_version,
            l.annotator,
            l.confidence
        FROM labels l
        JOIN pairs p ON p.pair_id = l.pair_id
        JOIN completions ca ON ca.completion_id = p.completion_a_id
        JOIN completions cb ON cb.completion_id = p.completion_b_id
        JOIN prompts pr ON pr.prompt_id = p.prompt_id
        WHERE l.winner IN ('a', 'b');

        -- One row per round: what went in, what came out, and whether it was promoted.
        CREATE VIEW round_summary AS
        SELECT
            r.round_id,
            r.state,
            r.policy_checkpoint_id,
            r.candidate_checkpoint_id,
            (SELECT count(*) FROM completions c
              WHERE c.round_id = r.round_id AND c.purpose = 'train') AS completions,
            (SELECT count(*) FROM pairs p WHERE p.round_id = r.round_id) AS pairs,
            (SELECT count(*) FROM labels l JOIN pairs p USING (pair_id)
              WHERE p.round_id = r.round_id) AS labels,
            (SELECT count(*) FROM labels l JOIN pairs p USING (pair_id)
              WHERE p.round_id = r.round_id AND l.winner IN ('a', 'b')) AS preferences,
            (SELECT count(*) FROM train_steps t WHERE t.round_id = r.round_id) AS train_steps,
            (SELECT avg(t.loss) FROM train_steps t WHERE t.round_id = r.round_id)
                AS mean_train_loss,
            (SELECT arg_max(t.loss, t.step) FROM train_steps t WHERE t.round_id = r.round_id)
                AS final_train_loss,
            e.incumbent_accuracy,
            e.accuracy AS candidate_accuracy,
            e.win_rate,
            e.mean_length,
            coalesce(ck.status = 'promoted', false) AS promoted,
            r.started_at,
            r.finished_at
        FROM rounds r
        LEFT JOIN evals e
               ON e.round_id = r.round_id AND e.checkpoint_id = r.candidate_checkpoint_id
        LEFT JOIN checkpoints ck ON ck.checkpoint_id = r.candidate_checkpoint_id
        ORDER BY r.round_id;
        """
    )


@migration
def m003_judges(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        -- Which judge labels a round's pairs for training (set when labelling starts), so
        -- labels added later by other judges, for comparison, never leak into training.
        ALTER TABLE rounds ADD COLUMN judge_name VARCHAR;
        ALTER TABLE rounds ADD COLUMN judge_version VARCHAR;

        -- A judge that could not decide a pair (an unparseable reply): kept, never a label.
        CREATE SEQUENCE judge_failure_ids START 1;
        CREATE TABLE judge_failures (
            failure_id    BIGINT PRIMARY KEY DEFAULT nextval('judge_failure_ids'),
            pair_id       BIGINT NOT NULL,
            judge_name    VARCHAR NOT NULL,
            judge_version VARCHAR NOT NULL,
            reason        VARCHAR NOT NULL,
            raw_output    VARCHAR,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        -- Scalar judges' scores of single completions (best-vs-worst pairing uses them).
        CREATE TABLE completion_scores (
            completion_id BIGINT NOT NULL,
            judge_name    VARCHAR NOT NULL,
            judge_version VARCHAR NOT NULL,
            score         DOUBLE NOT NULL,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (completion_id, judge_name, judge_version)
        );

        -- For every two labellers (a judge name@version, or one person) that labelled the
        -- same pairs: how many pairs, and how often they agree. A labeller's latest label
        -- of a pair counts. "Decisive" pairs are those where both picked a winner.
        CREATE VIEW judge_agreement AS
"""
        + _LATEST_LABEL_BY_LABELLER
        + """
        SELECT
            x.labeller AS judge_a,
            y.labeller AS judge_b,
            count(*) AS pairs,
            count(*) FILTER (WHERE x.winner = y.winner) AS agreements,
            avg(CASE WHEN x.winner = y.winner THEN 1.0 ELSE 0.0 END) AS agreement_rate,
            count(*) FILTER (WHERE x.winner IN ('a', 'b') AND y.winner IN ('a', 'b')) AS decisive_pairs,
            avg(CASE WHEN x.winner = y.winner THEN 1.0 ELSE 0.0 END)
                FILTER (WHERE x.winner IN ('a', 'b') AND y.winner IN ('a', 'b')) AS decisive_agreement_rate
        FROM latest x
        JOIN latest y ON x.pair_id = y.pair_id AND x.labeller < y.labeller
        GROUP BY x.labeller, y.labeller
        ORDER BY pairs DESC, judge_a, judge_b;

        -- Labels and preferences now count only the round's own judge.
        CREATE OR REPLACE VIEW round_summary AS
        SELECT
            r.round_id,
            r.state,
            r.policy_checkpoint_id,
            r.candidate_checkpoint_id,
            r.judge_name || '@' || r.judge_version AS judge,
            (SELECT count(*) FROM completions c
              WHERE c.round_id = r.round_id AND c.purpose = 'train') AS completions,
            (SELECT count(*) FROM pairs p WHERE p.round_id = r.round_id) AS pairs,
            (SELECT count(*) FROM labels l JOIN pairs p USING (pair_id)
              WHERE p.round_id = r.round_id AND l.judge_name = r.judge_name
                AND l.judge_version = r.judge_version) AS labels,
            (SELECT count(*) FROM labels l JOIN pairs p USING (pair_id)
              WHERE p.round_id = r.round_id AND l.judge_name = r.judge_name
                AND l.judge_version = r.judge_version AND l.winner IN ('a', 'b')) AS preferences,
            (SELECT count(*) FROM judge_failures f JOIN pairs p USING (pair_id)
              WHERE p.round_id = r.round_id AND f.judge_name = r.judge_name
                AND f.judge_version = r.judge_version) AS judge_failures,
            (SELECT count(*) FROM train_steps t WHERE t.round_id = r.round_id) AS train_steps,
            (SELECT avg(t.loss) FROM train_steps t WHERE t.round_id = r.round_id)
                AS mean_train_loss,
            (SELECT arg_max(t.loss, t.step) FROM train_steps t WHERE t.round_id = r.round_id)
                AS final_train_loss,
            e.incumbent_accuracy,
            e.accuracy AS candidate_accuracy,
            e.win_rate,
            e.mean_length,
            coalesce(ck.status = 'promoted', false) AS promoted,
            r.started_at,
            r.finished_at
        FROM rounds r
        LEFT JOIN evals e
               ON e.round_id = r.round_id AND e.checkpoint_id = r.candidate_checkpoint_id
        LEFT JOIN checkpoints ck ON ck.checkpoint_id = r.candidate_checkpoint_id
        ORDER BY r.round_id;
        """
    )


@migration
def m004_people_labelling(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        -- People who label through `flywheel label serve`. Only a hash of the token is kept.
        CREATE SEQUENCE annotator_ids START 1;
        CREATE TABLE annotators (
            annotator_id  BIGINT PRIMARY KEY DEFAULT nextval('annotator_ids'),
            name          VARCHAR NOT NULL UNIQUE,
            token_sha256  VARCHAR NOT NULL UNIQUE,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        -- A round's pairs put before people: how many labels each pair needs from
        -- different people, how long a lease lasts, and (for a round that trains on
        -- them) the quota of fully labelled pairs or the deadline that lets it go on.
        CREATE TABLE label_requests (
            round_id         BIGINT PRIMARY KEY,
            judge_version    VARCHAR NOT NULL,
            labels_per_pair  INTEGER NOT NULL CHECK (labels_per_pair >= 1),
            lease_seconds    DOUBLE NOT NULL CHECK (lease_seconds > 0),
            quota_pairs      INTEGER,
            deadline         TIMESTAMP,
            created_at       TIMESTAMP NOT NULL,
            closed_at        TIMESTAMP,
            closed_because   VARCHAR CHECK (closed_because IN ('quota', 'deadline')),
            -- The newest label when the request closed: a round trains on people's labels
            -- up to it, so labels of leftover pairs given later never change its data.
            last_label_id    BIGINT
        );

        -- Queued pairs stay queued: closing a request lets its round train, and people
        -- can still label what is left.
        CREATE TABLE label_queue (
            pair_id   BIGINT PRIMARY KEY,
            round_id  BIGINT NOT NULL
        );

        -- One annotator's hold on one pair. `left_slot` records which completion the page
        -- showed on the left. Open while `outcome` is NULL and `expires_at` is ahead.
        CREATE SEQUENCE lease_ids START 1;
        CREATE TABLE label_leases (
            lease_id     BIGINT PRIMARY KEY DEFAULT nextval('lease_ids'),
            pair_id      BIGINT NOT NULL,
            annotator    VARCHAR NOT NULL,
            left_slot    VARCHAR NOT NULL CHECK (left_slot IN ('a', 'b')),
            leased_at    TIMESTAMP NOT NULL,
            expires_at   TIMESTAMP NOT NULL,
            outcome      VARCHAR CHECK (outcome IN ('labelled', 'skipped')),
            label_id     BIGINT,
            finished_at  TIMESTAMP
        );

        -- A pair with its texts: what a person or a judge reads.
        CREATE VIEW pair_texts AS
        SELECT p.pair_id, p.round_id, pr.text AS prompt, ca.text AS completion_a, cb.text AS completion_b
        FROM pairs p
        JOIN prompts pr ON pr.prompt_id = p.prompt_id
        JOIN completions ca ON ca.completion_id = p.completion_a_id
        JOIN completions cb ON cb.completion_id = p.completion_b_id;

        -- Per queued round: pairs, how many have all their labels, labels given and needed.
        CREATE VIEW labelling_progress AS
        WITH people AS (
            SELECT pair_id, count(DISTINCT annotator) AS labels FROM labels
            WHERE annotator IS NOT NULL GROUP BY pair_id
        )
        SELECT
            r.round_id,
            r.labels_per_pair,
            count(*) AS pairs,
            count(*) FILTER (WHERE coalesce(h.labels, 0) >= r.labels_per_pair) AS pairs_done,
            coalesce(sum(least(coalesce(h.labels, 0), r.labels_per_pair)), 0)::BIGINT AS labels,
            count(*) * r.labels_per_pair AS labels_needed,
            r.quota_pairs,
            r.deadline,
            r.closed_at,
            r.closed_because
        FROM label_requests r
        JOIN label_queue q ON q.round_id = r.round_id
        LEFT JOIN people h ON h.pair_id = q.pair_id
        GROUP BY r.round_id, r.labels_per_pair, r.quota_pairs, r.deadline, r.closed_at, r.closed_because
        ORDER BY r.round_id;
        """
    )


@migration
def m005_training(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        -- Tokens per second of each DPO step (forward and backward over chosen and rejected).
        ALTER TABLE train_steps ADD COLUMN tokens_per_second DOUBLE;

        -- The frozen reference's log-prob of each completion, computed once per reference:
        -- training then holds only the policy. The sum over completion tokens; the
        -- length-normalised value is logp / completions.num_tokens.
        CREATE TABLE reference_logps (
            completion_id  BIGINT NOT NULL,
            checkpoint_id  BIGINT NOT NULL,
            logp           DOUBLE NOT NULL,
            created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (completion_id, checkpoint_id)
        );

        -- Lineage: the pairs each training step of a checkpoint trained on.
        CREATE TABLE train_pairs (
            checkpoint_id  BIGINT NOT NULL,
            step           INTEGER NOT NULL,
            pair_id        BIGINT NOT NULL
        );

        -- Per trained round: the pairs it trained on, how many were its own fresh
        -- (on-policy) pairs and how many were replayed from earlier rounds.
        CREATE VIEW round_training_data AS
        SELECT
            ck.round_id,
            count(DISTINCT tp.pair_id) AS pairs_trained,
            count(DISTINCT tp.pair_id) FILTER (WHERE p.round_id = ck.round_id) AS on_policy_pairs,
            count(DISTINCT tp.pair_id) FILTER (WHERE p.round_id <> ck.round_id) AS replayed_pairs,
            on_policy_pairs / pairs_trained AS on_policy_share
        FROM train_pairs tp
        JOIN checkpoints ck ON ck.checkpoint_id = tp.checkpoint_id
        JOIN pairs p ON p.pair_id = tp.pair_id
        GROUP BY ck.round_id
        ORDER BY ck.round_id;
        """
    )


@migration
def m006_operations(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        -- Who runs rounds on this database: one row while a flywheel process holds it.
        -- The holder refreshes heartbeat_at; a row whose process is gone (same host) or
        -- whose heartbeat is older than its ttl may be taken over.
        CREATE TABLE run_lease (
            lease_key     VARCHAR PRIMARY KEY CHECK (lease_key = 'rounds'),
            holder        VARCHAR NOT NULL,
            host          VARCHAR NOT NULL,
            pid           INTEGER NOT NULL,
            ttl_seconds   DOUBLE NOT NULL,
            acquired_at   TIMESTAMP NOT NULL,
            heartbeat_at  TIMESTAMP NOT NULL
        );

        -- Every promotion decision: the gate's, and a person's override or rollback,
        -- with who and why, and the policy before and after it.
        CREATE SEQUENCE promotion_ids START 1;
        CREATE TABLE promotions (
            promotion_id   BIGINT PRIMARY KEY DEFAULT nextval('promotion_ids'),
            checkpoint_id  BIGINT NOT NULL,
            action         VARCHAR NOT NULL CHECK (action IN ('promote', 'reject', 'rollback')),
            decided_by     VARCHAR NOT NULL,
            reason         VARCHAR,
            round_id       BIGINT,
            policy_before  BIGINT,
            policy_after   BIGINT,
            decided_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        INSERT INTO promotions (checkpoint_id, action, decided_by, reason, round_id, decided_at)
        SELECT checkpoint_id, CASE status WHEN 'promoted' THEN 'promote' ELSE 'reject' END, 'gate',
               'recorded before promotions were logged', round_id, coalesce(promoted_at, created_at)
        FROM checkpoints WHERE role = 'candidate' AND status IN ('promoted', 'rejected');

        -- Prompts that were read but not used: empty, or too long for the model's context.
        CREATE TABLE skipped_prompts (
            source       VARCHAR NOT NULL,
            split        VARCHAR NOT NULL,
            row_number   INTEGER NOT NULL,
            reason       VARCHAR NOT NULL,
            token_count  INTEGER,
            recorded_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (source, split, row_number)
        );

        -- KL(candidate || reference) on held-out prompts, estimated from the candidate's own
        -- samples: the mean of log pi(y|x) - log ref(y|x) over y ~ pi (Schulman's k1).
        ALTER TABLE evals ADD COLUMN kl_to_reference DOUBLE;

        -- Each DPO step's wall time (forward, backward, optimiser step), in seconds.
        ALTER TABLE train_steps ADD COLUMN seconds DOUBLE;

        -- The same columns plus KL, computed with one aggregate per table instead of a
        -- subquery per round, so it stays fast at millions of pairs.
        CREATE OR REPLACE VIEW round_summary AS
        WITH
        round_completions AS (
            SELECT round_id, count(*) AS completions FROM completions
            WHERE purpose = 'train' GROUP BY round_id),
        round_pairs AS (SELECT round_id, count(*) AS pairs FROM pairs GROUP BY round_id),
        round_labels AS (
            SELECT p.round_id, count(*) AS labels,
                   count(*) FILTER (WHERE l.winner IN ('a', 'b')) AS preferences
            FROM labels l JOIN pairs p USING (pair_id) JOIN rounds r ON r.round_id = p.round_id
            WHERE l.judge_name = r.judge_name AND l.judge_version = r.judge_version
            GROUP BY p.round_id),
        round_failures AS (
            SELECT p.round_id, count(*) AS judge_failures
            FROM judge_failures f JOIN pairs p USING (pair_id) JOIN rounds r ON r.round_id = p.round_id
            WHERE f.judge_name = r.judge_name AND f.judge_version = r.judge_version
            GROUP BY p.round_id),
        round_steps AS (
            SELECT round_id, count(*) AS train_steps, avg(loss) AS mean_train_loss,
                   arg_max(loss, step) AS final_train_loss
            FROM train_steps GROUP BY round_id)
        SELECT
            r.round_id,
            r.state,
            r.policy_checkpoint_id,
            r.candidate_checkpoint_id,
            r.judge_name || '@' || r.judge_version AS judge,
            coalesce(c.completions, 0) AS completions,
            coalesce(p.pairs, 0) AS pairs,
            coalesce(l.labels, 0) AS labels,
            coalesce(l.preferences, 0) AS preferences,
            coalesce(f.judge_failures, 0) AS judge_failures,
            coalesce(s.train_steps, 0) AS train_steps,
            s.mean_train_loss,
            s.final_train_loss,
            e.incumbent_accuracy,
            e.accuracy AS candidate_accuracy,
            e.win_rate,
            e.kl_to_reference,
            e.mean_length,
            coalesce(ck.status = 'promoted', false) AS promoted,
            r.started_at,
            r.finished_at
        FROM rounds r
        LEFT JOIN round_completions c ON c.round_id = r.round_id
        LEFT JOIN round_pairs p ON p.round_id = r.round_id
        LEFT JOIN round_labels l ON l.round_id = r.round_id
        LEFT JOIN round_failures f ON f.round_id = r.round_id
        LEFT JOIN round_steps s ON s.round_id = r.round_id
        LEFT JOIN evals e
               ON e.round_id = r.round_id AND e.checkpoint_id = r.candidate_checkpoint_id
        LEFT JOIN checkpoints ck ON ck.checkpoint_id = r.candidate_checkpoint_id
        ORDER BY r.round_id;
        """
    )


@migration
def m007_round_summary_by_blocks(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(_round_summary_by_blocks())


def _round_summary_by_blocks(extra_columns: str = "") -> str:
    """m007's round_summary view; later migrations that add a column pass its SQL."""
    return (
        """
        -- The same columns and counts as m006's round_summary, without joining every label to
        -- its pair: at 10M pairs that hash join took most of the 1-3 s the view cost.
        -- Pair ids are cut into blocks of 256 (pair_id >> 8). A block holding 256 pairs of
        -- one round is full: pair ids are unique, so every id in it is a pair of that round,
        -- and its labels are counted per block (a few rows per block). Labels and judge
        -- failures in other blocks (where rounds meet, gaps) are joined pair by pair as before.
        CREATE OR REPLACE VIEW round_summary AS
        WITH
        round_completions AS (
            SELECT round_id, count(*) AS completions FROM completions
            WHERE purpose = 'train' GROUP BY round_id),
        pair_blocks AS (
            SELECT pair_id >> 8 AS block, round_id, count(*) AS pairs FROM pairs GROUP BY ALL),
        round_pairs AS (
            SELECT round_id, sum(pairs)::BIGINT AS pairs FROM pair_blocks GROUP BY round_id),
        -- round_id of a full block, NULL for a block with pairs of several rounds or gaps
        block_rounds AS (
            SELECT block, CASE WHEN count(*) = 1 AND sum(pairs) = 256 THEN min(round_id) END AS round_id
            FROM pair_blocks GROUP BY block),
        partial_pairs AS (
            SELECT p.pair_id, p.round_id FROM pairs p
            JOIN block_rounds b ON b.block = p.pair_id >> 8 AND b.round_id IS NULL),
        label_blocks AS (
            SELECT pair_id >> 8 AS block, judge_name, judge_version, winner, count(*) AS n
            FROM labels GROUP BY ALL),
        round_labelled AS (
            SELECT b.round_id, lb.judge_name, lb.judge_version, lb.winner, lb.n
            FROM label_blocks lb JOIN block_rounds b ON b.block = lb.block AND b.round_id IS NOT NULL
            UNION ALL
            SELECT pp.round_id, l.judge_name, l.judge_version, l.winner, 1
            FROM labels l JOIN partial_pairs pp ON pp.pair_id = l.pair_id),
        round_labels AS (
            SELECT l.round_id, sum(l.n)::BIGINT AS labels,
                   coalesce(sum(l.n) FILTER (WHERE l.winner IN ('a', 'b')), 0)::BIGINT AS preferences
            FROM round_labelled l JOIN rounds r ON r.round_id = l.round_id
            WHERE l.judge_name = r.judge_name AND l.judge_version = r.judge_version
            GROUP BY l.round_id),
        round_failed AS (
            SELECT b.round_id, f.judge_name, f.judge_version
            FROM judge_failures f JOIN block_rounds b ON b.block = f.pair_id >> 8 AND b.round_id IS NOT NULL
            UNION ALL
            SELECT pp.round_id, f.judge_name, f.judge_version
            FROM judge_failures f JOIN partial_pairs pp ON pp.pair_id = f.pair_id),
        round_failures AS (
            SELECT f.round_id, count(*) AS judge_failures
            FROM round_failed f JOIN rounds r ON r.round_id = f.round_id
            WHERE f.judge_name = r.judge_name AND f.judge_version = r.judge_version
            GROUP BY f.round_id),
        round_steps AS (
            SELECT round_id, count(*) AS train_steps, avg(loss) AS mean_train_loss,
                   arg_max(loss, step) AS final_train_loss
            FROM train_steps GROUP BY round_id)
        SELECT
            r.round_id,
            r.state,
            r.policy_checkpoint_id,
            r.candidate_checkpoint_id,
            r.judge_name || '@' || r.judge_version AS judge,
            coalesce(c.completions, 0) AS completions,
            coalesce(p.pairs, 0) AS pairs,
            coalesce(l.labels, 0) AS labels,
            coalesce(l.preferences, 0) AS preferences,
            coalesce(f.judge_failures, 0) AS judge_failures,
            coalesce(s.train_steps, 0) AS train_steps,
            s.mean_train_loss,
            s.final_train_loss,
            e.incumbent_accuracy,
            e.accuracy AS candidate_accuracy,
            e.win_rate,
            e.kl_to_reference,
            e.mean_length,
            coalesce(ck.status = 'promoted', false) AS promoted,
            r.started_at,
            r.finished_at"""
        + extra_columns
        + """
        FROM rounds r
        LEFT JOIN round_completions c ON c.round_id = r.round_id
        LEFT JOIN round_pairs p ON p.round_id = r.round_id
        LEFT JOIN round_labels l ON l.round_id = r.round_id
        LEFT JOIN round_failures f ON f.round_id = r.round_id
        LEFT JOIN round_steps s ON s.round_id = r.round_id
        LEFT JOIN evals e
               ON e.round_id = r.round_id AND e.checkpoint_id = r.candidate_checkpoint_id
        LEFT JOIN checkpoints ck ON ck.checkpoint_id = r.candidate_checkpoint_id
        ORDER BY r.round_id;
        """
    )


@migration
def m008_lease_processes(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        -- The processes the lease holder started (its vLLM engine and workers), as JSON
        -- [[pid, start time in clock ticks after boot], ...]: whoever takes over a dead
        -- holder's lease on the same host stops those still running. The start time tells
        -- a leftover from a new process that reuses its pid.
        ALTER TABLE run_lease ADD COLUMN processes VARCHAR DEFAULT '[]';
        """
    )


@migration
def m009_conversations_and_logprob_check(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        -- A prompt given as a conversation: its messages as JSON text
        -- ([{"role": "user", "content": "..."}]); NULL for a plain-text prompt, whose
        -- `text` is the prompt. A conversation's `text` is its turns as plain text.
        ALTER TABLE prompts ADD COLUMN messages VARCHAR;

        -- How far the sampler's weights are from the checkpoint the round says it sampled:
        -- the mean, over a sample of the round's completions, of
        -- |log p_vLLM(y|x) - log p_trainer(y|x)| / len(y), in nats per token. Near 0 when
        -- vLLM holds the checkpoint's weights; large when a reload was missed.
        ALTER TABLE rounds ADD COLUMN sampler_logprob_gap DOUBLE;
        """
    )
    conn.execute(_round_summary_by_blocks(",\n            r.sampler_logprob_gap"))


@migration
def m010_round_phases(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        -- How each round ran, in order: its phases (kind 'phase': sample, logprob_check,
        -- reference_logps, train, evaluate) with their seconds and peak GPU memory (NULL
        -- without CUDA), and what the sampler's engine did inside them (kind 'sampler':
        -- start, reload, sleep, wake; `detail` says which checkpoint, or why it could not
        -- sleep). A phase is recorded when it ends; one that failed runs again on resume
        -- and is recorded then.
        CREATE SEQUENCE round_phase_ids START 1;
        CREATE TABLE round_phases (
            phase_id       BIGINT PRIMARY KEY DEFAULT nextval('round_phase_ids'),
            round_id       BIGINT NOT NULL,
            kind           VARCHAR NOT NULL CHECK (kind IN ('phase', 'sampler')),
            name           VARCHAR NOT NULL,
            detail         VARCHAR,
            started_at     TIMESTAMP NOT NULL,
            seconds        DOUBLE NOT NULL,
            peak_gpu_bytes BIGINT
        );
        """
    )


@migration
def m011_people_quality(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        -- A revoked annotator's token stops working; their labels stay.
        ALTER TABLE annotators ADD COLUMN revoked_at TIMESTAMP;

        -- What a request shows people (markdown), how often a person is handed a gold pair,
        -- and the gold accuracy below which a person's labels are kept but not trained on.
        -- `left_out` freezes, when the request closes, whose labels its round leaves out.
        ALTER TABLE label_requests ADD COLUMN guidelines VARCHAR;
        ALTER TABLE label_requests ADD COLUMN gold_rate DOUBLE DEFAULT 0;
        ALTER TABLE label_requests ADD COLUMN min_gold_accuracy DOUBLE;
        ALTER TABLE label_requests ADD COLUMN left_out VARCHAR[];

        -- Pairs with a known answer (a rule judge settled them when the round was queued),
        -- mixed into people's queue unmarked: each person's answers on them measure them.
        CREATE TABLE gold_answers (
            pair_id     BIGINT PRIMARY KEY,
            winner      VARCHAR NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),
            source      VARCHAR NOT NULL,
            created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        -- Each person's answers on gold pairs.
        CREATE VIEW annotator_gold AS
        SELECT l.annotator, count(*) AS gold_labels,
               count(*) FILTER (WHERE l.winner = g.winner) AS gold_correct,
               avg(CASE WHEN l.winner = g.winner THEN 1.0 ELSE 0.0 END) AS gold_accuracy
        FROM labels l JOIN gold_answers g ON g.pair_id = l.pair_id
        WHERE l.annotator IS NOT NULL
        GROUP BY l.annotator;

        -- Per queued round, as m004's view, and: a pair is also done when every active
        -- annotator has labelled or skipped it (`pairs_exhausted`: it can get no more
        -- labels), so a pair skipped by everyone, or labels_per_pair above the number of
        -- active annotators, no longer holds the quota for ever; with no active annotator
        -- at all nothing is exhausted (the round waits for people to be added).
        -- `left_out_annotators`: people below the request's min_gold_accuracy, whose
        -- labels stay but are not trained on (frozen when the request closes).
        CREATE OR REPLACE VIEW labelling_progress AS
        WITH people AS (
            SELECT pair_id, count(DISTINCT annotator) AS labels FROM labels
            WHERE annotator IS NOT NULL GROUP BY pair_id
        ),
        active AS (SELECT count(*) AS n FROM annotators WHERE revoked_at IS NULL),
        touched AS (
            SELECT t.pair_id, count(DISTINCT t.annotator) AS n
            FROM (SELECT pair_id, annotator FROM labels WHERE annotator IS NOT NULL
                  UNION ALL
                  SELECT pair_id, annotator FROM label_leases WHERE outcome = 'skipped') t
            JOIN annotators a ON a.name = t.annotator AND a.revoked_at IS NULL
            GROUP BY t.pair_id
        ),
        queued AS (
            SELECT q.round_id, coalesce(h.labels, 0) AS labels,
                   coalesce(h.labels, 0) < r.labels_per_pair AND active.n > 0
                       AND coalesce(t.n, 0) >= active.n AS exhausted
            FROM label_queue q
            JOIN label_requests r ON r.round_id = q.round_id
            CROSS JOIN active
            LEFT JOIN people h ON h.pair_id = q.pair_id
            LEFT JOIN touched t ON t.pair_id = q.pair_id
        )
        SELECT
            r.round_id,
            r.labels_per_pair,
            count(*) AS pairs,
            count(*) FILTER (WHERE g.labels >= r.labels_per_pair OR g.exhausted) AS pairs_done,
            count(*) FILTER (WHERE g.exhausted) AS pairs_exhausted,
            coalesce(sum(least(g.labels, r.labels_per_pair)), 0)::BIGINT AS labels,
            count(*) * r.labels_per_pair AS labels_needed,
            r.quota_pairs,
            r.deadline,
            r.closed_at,
            r.closed_because,
            (SELECT n FROM active) AS active_annotators,
            coalesce(r.left_out, (SELECT list(ag.annotator ORDER BY ag.annotator) FROM annotator_gold ag
                                  WHERE ag.gold_accuracy < r.min_gold_accuracy)) AS left_out_annotators
        FROM label_requests r
        JOIN queued g ON g.round_id = r.round_id
        GROUP BY r.round_id, r.labels_per_pair, r.quota_pairs, r.deadline, r.closed_at, r.closed_because,
                 r.left_out, r.min_gold_accuracy
        ORDER BY r.round_id;

        -- m003's judge_agreement, plus Cohen's kappa: (p_o - p_e) / (1 - p_e) over the four
        -- labels a, b, tie, both_bad, p_e from each labeller's own label shares on the
        -- pairs both labelled (NULL when p_e = 1: both always gave one same label).
        CREATE OR REPLACE VIEW judge_agreement AS
"""
        + _LATEST_LABEL_BY_LABELLER
        + """,
        joined AS (
            SELECT x.labeller AS judge_a, y.labeller AS judge_b, x.winner AS winner_a, y.winner AS winner_b
            FROM latest x JOIN latest y ON x.pair_id = y.pair_id AND x.labeller < y.labeller
        ),
        shares AS (
            SELECT judge_a, judge_b, label, sum(from_a) AS n_a, sum(from_b) AS n_b
            FROM (SELECT judge_a, judge_b, winner_a AS label, 1 AS from_a, 0 AS from_b FROM joined
                  UNION ALL
                  SELECT judge_a, judge_b, winner_b, 0, 1 FROM joined)
            GROUP BY judge_a, judge_b, label
        ),
        chance AS (
            SELECT judge_a, judge_b, sum(n_a * n_b) / (sum(n_a) * sum(n_b)) AS p_e
            FROM shares GROUP BY judge_a, judge_b
        )
        SELECT
            j.judge_a,
            j.judge_b,
            count(*) AS pairs,
            count(*) FILTER (WHERE j.winner_a = j.winner_b) AS agreements,
            avg(CASE WHEN j.winner_a = j.winner_b THEN 1.0 ELSE 0.0 END) AS agreement_rate,
            count(*) FILTER (WHERE j.winner_a IN ('a', 'b') AND j.winner_b IN ('a', 'b')) AS decisive_pairs,
            avg(CASE WHEN j.winner_a = j.winner_b THEN 1.0 ELSE 0.0 END)
                FILTER (WHERE j.winner_a IN ('a', 'b') AND j.winner_b IN ('a', 'b')) AS decisive_agreement_rate,
            CASE WHEN any_value(c.p_e) < 1 THEN
                (avg(CASE WHEN j.winner_a = j.winner_b THEN 1.0 ELSE 0.0 END) - any_value(c.p_e))
                / (1 - any_value(c.p_e)) END AS cohen_kappa
        FROM joined j JOIN chance c ON c.judge_a = j.judge_a AND c.judge_b = j.judge_b
        GROUP BY j.judge_a, j.judge_b
        ORDER BY pairs DESC, judge_a, judge_b;

        -- Krippendorff's alpha (nominal: a, b, tie, both_bad) of people's labels per round,
        -- over the pairs two or more people labelled: 1 - (n - 1) * sum_{c != k} o_ck /
        -- sum_{c != k} n_c n_k, where o_ck counts ordered (c, k) label pairs from different
        -- people on one pair, each weighted 1 / (m_u - 1) for a pair with m_u labels, and
        -- n_c = sum_k o_ck (Krippendorff 2011, "Computing Krippendorff's alpha-reliability").
        -- NULL when every label is the same (no expected disagreement).
        CREATE VIEW people_alpha AS
        WITH person_labels AS (
            SELECT p.round_id, l.pair_id, l.annotator, arg_max(l.winner, l.label_id) AS winner
            FROM labels l JOIN pairs p ON p.pair_id = l.pair_id
            WHERE l.annotator IS NOT NULL
            GROUP BY p.round_id, l.pair_id, l.annotator
        ),
        units AS (
            SELECT round_id, pair_id, count(*) AS m FROM person_labels
            GROUP BY round_id, pair_id HAVING count(*) >= 2
        ),
        coincidences AS (
            SELECT u.round_id, x.winner AS c, y.winner AS k, sum(1.0 / (u.m - 1)) AS o
            FROM units u
            JOIN person_labels x ON x.pair_id = u.pair_id
            JOIN person_labels y ON y.pair_id = u.pair_id AND y.annotator <> x.annotator
            GROUP BY u.round_id, x.winner, y.winner
        ),
        marginals AS (SELECT round_id, c, sum(o) AS n_c FROM coincidences GROUP BY round_id, c),
        totals AS (SELECT round_id, sum(n_c) AS n FROM marginals GROUP BY round_id),
        observed AS (
            SELECT round_id, coalesce(sum(o) FILTER (WHERE c <> k), 0) AS d FROM coincidences GROUP BY round_id
        ),
        expected AS (
            SELECT x.round_id, coalesce(sum(x.n_c * y.n_c) FILTER (WHERE x.c <> y.c), 0) AS e
            FROM marginals x JOIN marginals y ON y.round_id = x.round_id GROUP BY x.round_id
        )
        SELECT
            t.round_id,
            (SELECT count(DISTINCT annotator) FROM person_labels pl WHERE pl.round_id = t.round_id) AS people,
            (SELECT count(*) FROM units un WHERE un.round_id = t.round_id) AS pairs,
            CASE WHEN e.e > 0 THEN 1 - (t.n - 1) * o.d / e.e END AS krippendorff_alpha
        FROM totals t JOIN observed o ON o.round_id = t.round_id JOIN expected e ON e.round_id = t.round_id
        ORDER BY t.round_id;

        -- One row per person: labels and skips, the median seconds from lease to label,
        -- labels per hour of labelling, gold accuracy, agreement with the majority of the
        -- other people on the pairs they labelled (pairs whose other labels have one most
        -- common answer), and agreement with each AI judge that labelled the same pairs.
        CREATE VIEW annotator_stats AS
        WITH person_labels AS (
            SELECT pair_id, annotator, arg_max(winner, label_id) AS winner FROM labels
            WHERE annotator IS NOT NULL GROUP BY pair_id, annotator
        ),
        timed AS (
            SELECT annotator, count(*) AS n, median(epoch(finished_at - leased_at)) AS median_seconds,
                   sum(epoch(finished_at - leased_at)) AS seconds
            FROM label_leases WHERE outcome = 'labelled' GROUP BY annotator
        ),
        skips AS (SELECT annotator, count(*) AS skips FROM label_leases WHERE outcome = 'skipped' GROUP BY annotator),
        votes AS (
            SELECT x.annotator, x.pair_id, any_value(x.winner) AS own, y.winner AS other, count(*) AS n
            FROM person_labels x JOIN person_labels y ON y.pair_id = x.pair_id AND y.annotator <> x.annotator
            GROUP BY x.annotator, x.pair_id, y.winner
        ),
        ranked AS (
            SELECT annotator, pair_id, own, other, n,
                   max(n) OVER (PARTITION BY annotator, pair_id) AS top,
                   count(*) OVER (PARTITION BY annotator, pair_id, n) AS at_n
            FROM votes
        ),
        majority AS (
            SELECT annotator, count(*) AS pairs, avg(CASE WHEN own = other THEN 1.0 ELSE 0.0 END) AS rate
            FROM ranked WHERE n = top AND at_n = 1 GROUP BY annotator
        ),
        ai AS (
            SELECT p.annotator, j.judge_name || '@' || j.judge_version AS judge, count(*) AS pairs,
                   avg(CASE WHEN p.winner = j.winner THEN 1.0 ELSE 0.0 END) AS agreement_rate
            FROM person_labels p
            JOIN (SELECT pair_id, judge_name, judge_version, arg_max(winner, label_id) AS winner FROM labels
                  WHERE annotator IS NULL GROUP BY pair_id, judge_name, judge_version) j ON j.pair_id = p.pair_id
            GROUP BY p.annotator, j.judge_name, j.judge_version
        )
        SELECT
            a.name AS annotator,
            a.revoked_at IS NULL AS active,
            (SELECT count(*) FROM labels l WHERE l.annotator = a.name) AS labels,
            coalesce(s.skips, 0) AS skips,
            t.median_seconds AS median_seconds_per_label,
            CASE WHEN t.seconds > 0 THEN 3600 * t.n / t.seconds END AS labels_per_hour,
            g.gold_labels,
            g.gold_accuracy,
            m.pairs AS majority_pairs,
            m.rate AS majority_agreement,
            (SELECT list({'judge': ai.judge, 'pairs': ai.pairs, 'agreement_rate': ai.agreement_rate}
                         ORDER BY ai.judge) FROM ai WHERE ai.annotator = a.name) AS ai_judge_agreement
        FROM annotators a
        LEFT JOIN timed t ON t.annotator = a.name
        LEFT JOIN skips s ON s.annotator = a.name
        LEFT JOIN annotator_gold g ON g.annotator = a.name
        LEFT JOIN majority m ON m.annotator = a.name
        ORDER BY a.annotator_id;
        """
    )


@migration
def m012_queue_counts_and_lease_rounds(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        -- How many different people have labelled each queued pair, kept by every writer of
        -- a person's label: the labelling page's choice of the next pair reads this one
        -- column instead of counting every label (at 100k pairs queued, 99k labelled: 8 ms
        -- against 48 ms).
        ALTER TABLE label_queue ADD COLUMN people INTEGER DEFAULT 0;
        UPDATE label_queue SET people = h.n
        FROM (SELECT pair_id, count(DISTINCT annotator) AS n FROM labels WHERE annotator IS NOT NULL
              GROUP BY pair_id) h
        WHERE label_queue.pair_id = h.pair_id;

        -- The round of the leased pair, so a person's leases of one request are found
        -- without joining the queue.
        ALTER TABLE label_leases ADD COLUMN round_id BIGINT;
        UPDATE label_leases SET round_id = q.round_id FROM label_queue q WHERE q.pair_id = label_leases.pair_id;
        """
    )
