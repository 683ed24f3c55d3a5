"""One flywheel round as plain functions: sample, pair, label, train, evaluate, promote.

Each step checks the round's recorded state first and returns at once if it already
finished, and writes its rows and the new state in one transaction. A round killed at
any point therefore resumes from the step after the last one that finished, with
nothing lost and nothing duplicated. Nothing here imports Prefect.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from flywheel.checkpoints import require_checkpoint
from flywheel.config import FlywheelConfig, SampleConfig
from flywheel.errors import UserError
from flywheel.evaluation import gate_reason, heldout_accuracy, promote_if_better, win_rate
from flywheel.labelling import label_pairs, score_completions
from flywheel.lease import RoundLease
from flywheel.pairing import NEEDS_SCORES, form_pairs, within_budget
from flywheel.phases import PhaseLog
from flywheel.prompts import load_renderer, read_prompts, usable_prompts
from flywheel.sampling import VLLMSampler
from flywheel.train_job import launch, write_job
from flywheel.training import (
    KeptModel,
    completion_logps,
    reference_logps_for,
    sampler_logprob_gap,
    logps_precision,
    train_dpo,
)
from judges import HumanJudge, Judge, ScalarJudge, close_judge, import_object, load_judge
from judges.human import people_warnings, ready_to_train, waiting_message
from storage.queue import close_request, utc_now
from storage.queue import progress as queue_progress
from storage.records import Checkpoint, Evaluation, Round, TrainStep
from storage.store import Store, Transaction
from storage import tables

Log = Callable[[str], None]

# Completions of each round whose sampler log-probs are checked against the trainer's.
LOGPROB_CHECK_COMPLETIONS = 32
# Nats per token above which that gap is reported as stale weights (see docs/operations.md).
STALE_WEIGHTS_GAP = 0.02


def sampling_policy(tx: Transaction, round_: Round, sample: SampleConfig) -> Checkpoint:
    """The checkpoint a round samples its training pairs from: the initial model (offline),
    or the policy that the latest refresh round began with (online with refresh_every 1,
    semi-online above). Rounds 1, 1 + k, 1 + 2k, ... refresh, and so does a round begun
    after a person promoted or rolled back a checkpoint: their choice is sampled at once."""
    if sample.source == "initial":
        return tables.reference_checkpoint(tx)
    starts = tables.round_starts(tx, up_to=round_.round_id)
    latest_refresh = max(i for i, (_, after_a_person) in enumerate(starts)
                         if i % sample.refresh_every == 0 or after_a_person)
    return tables.checkpoint(tx, starts[latest_refresh][0])


class Flywheel:
    """A flywheel on disk (its config and database) plus the live sampler engine.

    The judges are built from `config.judge` and `config.eval` unless given; a sampler can
    be shared between flywheels in one process (its engine is slow to start). Judges and a
    sampler that were given are closed by whoever made them.
    """

    def __init__(
        self,
        config: FlywheelConfig,
        log: Log = lambda message: None,
        judge: Judge | HumanJudge | None = None,
        sampler: VLLMSampler | None = None,
        eval_judge: Judge | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.judge = judge if judge is not None else load_judge(config.judge.spec, config.judge.options)
        self._built_judges = [] if judge is not None else [self.judge]
        if config.pair.truncated == "lose" and isinstance(self.judge, HumanJudge):
            raise UserError("pair.truncated 'lose' decides pairs with a cut completion without asking the judge, "
                            "and people label every pair they are given: use 'drop' or 'keep' with judge human")
        if config.pair.strategy in NEEDS_SCORES and not isinstance(self.judge, ScalarJudge):
            raise UserError(
                f"pair.strategy {config.pair.strategy!r} ranks completions by score, and judge "
                f"{self.judge.name!r} scores only pairs: use a rule or reward-model judge"
            )
        # A verifier (a rule task's checker) gives held-out accuracy besides win rate.
        self.accuracy_score: Callable[[str, str], float] | None = None
        if config.eval.accuracy_score is not None:
            self.accuracy_score = import_object(config.eval.accuracy_score, "eval.accuracy_score")
        self.eval_judge = eval_judge if eval_judge is not None else self._build_eval_judge()
        if eval_judge is None and self.eval_judge is not self.judge:
            self._built_judges.append(self.eval_judge)
        self.store = Store.create(config.database)
        self.lease = RoundLease(self.store, log)
        self._owns_sampler = sampler is None
        self.sampler = sampler if sampler is not None else VLLMSampler(config.sample, seed=config.seed)
        # The flywheel's own log-prob passes (reference, KL, sampler check) run in the
        # trainer's precision, on its device.
        self.logps_precision = logps_precision(config.train)
        # None: the reference is loaded for each log-prob pass and freed after it.
        self.kept_reference = KeptModel(self.logps_precision) if config.train.keep_reference_loaded else None
        self.phases = PhaseLog(self.store, self.sampler)

    def _build_eval_judge(self) -> Judge:
        """Who judges candidate against incumbent: `eval.judge`, else the round's judge;
        people cannot answer mid-round, so a human round falls back to the verifier."""
        if self.config.eval.judge is not None:
            return load_judge(self.config.eval.judge.spec, self.config.eval.judge.options)
        if not isinstance(self.judge, HumanJudge):
            return self.judge
        if self.config.eval.accuracy_score is None:
            raise UserError("a round labelled by people needs eval.judge (or eval.accuracy_score) "
                            "to judge the candidate against the incumbent")
        return load_judge(f"rule:{self.config.eval.accuracy_score}")

    def close(self) -> None:
        """Release the run lease, and close what this flywheel built (not what it was given)."""
        self.lease.release()
        if self.kept_reference is not None:
            self.kept_reference.release()
        if self._owns_sampler:
            self.sampler.close()
        for judge in self._built_judges:
            close_judge(judge)

    # -- set-up --------------------------------------------------------------------------

    def initialise(self) -> None:
        """Register the reference checkpoint and load prompts; safe to call every run.

        Empty prompts, and prompts too long for the sampler's context, are skipped and
        recorded in `skipped_prompts` rather than failing a round later.
        """
        require_checkpoint(self.config.reference_model)
        self.lease.acquire()
        renderer = load_renderer(self.config.reference_model)
        # vLLM refuses a prompt that leaves no room for one new token in max_model_len.
        max_prompt_tokens = self.config.sample.max_model_len - 1
        sources = {"train": self.config.prompts, "heldout": self.config.heldout_prompts}
        usable = {}
        for split, source in sources.items():
            rows = read_prompts(source)
            renderer.check_can_render(source, rows.rows)
            usable[split] = usable_prompts(rows, lambda row: len(renderer.ids(row.text, row.messages)),
                                           max_prompt_tokens)
        for split, (rows, skipped) in usable.items():
            if not rows:
                raise UserError(f"every prompt in {sources[split]} is longer than the context "
                                f"(sample.max_model_len {self.config.sample.max_model_len} tokens)")
            if skipped:
                self.log(f"{sources[split]}: skipped {len(skipped)} of {len(rows) + len(skipped)} prompts "
                         f"(empty or longer than {max_prompt_tokens} tokens; see the skipped_prompts table)")
        with self.store.transaction() as tx:
            for split, (rows, skipped) in usable.items():
                tables.add_prompts(tx, [row.text for row in rows], split, source=str(sources[split]),
                                   messages=[row.messages for row in rows])
                tables.add_skipped_prompts(tx, str(sources[split]), split, skipped)
            if tables.reference_checkpoint(tx) is None:
                tables.add_checkpoint(tx, str(self.config.reference_model), role="reference", status="promoted")

    def begin_round(self) -> int:
        """The unfinished round if a previous run stopped inside one, else a new round.
        Takes this database's run lease first: one process runs rounds at a time."""
        self.lease.acquire()
        with self.store.transaction() as tx:
            unfinished = tables.unfinished_round(tx)
            if unfinished is not None:
                self.log(f"resuming round {unfinished.round_id} after step '{unfinished.state}'")
                return unfinished.round_id
            policy = tables.current_policy(tx)
            reference = tables.reference_checkpoint(tx)
            if policy is None or reference is None:
                raise UserError(f"{self.config.database} has no reference checkpoint: call initialise() first")
            if self.config.train.reference == "previous":
                # DPO against the incumbent: each round stays close to the last promoted policy.
                reference = policy
            done = tables.count(tx, "rounds")
            return tables.start_round(tx, policy.checkpoint_id, reference.checkpoint_id,
                                      seed=self.config.seed * 1_000_003 + done + 1, config=self.config.to_dict())

    # -- the steps -----------------------------------------------------------------------

    def sample(self, round_id: int) -> int:
        """Fresh completions of this round's prompts from the current policy.

        Prompts go to the engine `sample.batch_prompts` at a time and each batch is stored
        in its own transaction (the last one also ends the step), so a crash loses at most
        the batch in flight; a rerun samples only the prompts without completions (each
        prompt has its own seed, so they are the completions the first run would have drawn).
        """
        with self.store.transaction() as tx:
            round_ = tables.get_round(tx, round_id)
            if round_.has_finished("sampled"):
                return tables.count(tx, "completions", "round_id = ? AND purpose = 'train'", [round_id])
            policy = sampling_policy(tx, round_, self.config.sample)
            prompts = tables.prompts(tx, "train")
            done = tables.sampled_prompt_ids(tx, round_id)
        count = min(self.config.sample.prompts_per_round, len(prompts))
        chosen = random.Random(round_.seed).sample(prompts, count)
        todo = [p for p in chosen if p.prompt_id not in done]
        batch_size = self.config.sample.batch_prompts
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        with self.phases.phase(round_id, "sample"), \
                tqdm(total=count, initial=count - len(todo), desc=f"round {round_id}: sampling", unit="prompt",
                     disable=None) as bar:
            for batch in batches:
                completions = self.sampler.sample(
                    Path(policy.path), policy.checkpoint_id, batch,
                    n=self.config.sample.n, temperature=self.config.sample.temperature,
                    seed=round_.seed, purpose="train", round_id=round_id, progress=False,
                )
                with self.store.transaction() as tx:
                    tables.add_completions(tx, completions)
                bar.update(len(batch))
            # The GPU is the trainer's until the next sampling (the check's pass is first).
            self.sampler.sleep()
        sampled = self.store.read(tables.completions, round_id=round_id, purpose="train")
        with self.phases.phase(round_id, "logprob_check"):
            gap = self._check_sampler_weights(round_id, policy, sampled, round_.seed)
        with self.store.transaction() as tx:
            tables.set_sampler_logprob_gap(tx, round_id, gap)
            tables.finish_step(tx, round_id, "sampled")
        resumed = f" ({count - len(todo)} sampled before a restart)" if len(todo) < count else ""
        self.log(f"round {round_id}: sampled {len(sampled)} completions of {count} prompts{resumed}")
        return len(sampled)

    def _check_sampler_weights(self, round_id: int, policy, sampled, seed: int) -> float | None:
        """The sampler's log-probs of some of the round's completions against the trainer's
        under the checkpoint the round sampled (`sampler_logprob_gap`); a gap beyond what
        numerics explain is logged as a warning."""
        checked = random.Random(seed).sample(sampled, min(LOGPROB_CHECK_COMPLETIONS, len(sampled)))
        reference = self.store.read(tables.reference_checkpoint)
        # Until a candidate is promoted the policy is the reference, which may be kept loaded.
        kept = self.kept_reference if policy.checkpoint_id == reference.checkpoint_id else None
        gap = sampler_logprob_gap(Path(policy.path), checked, self.config.train.batch_size, kept, self.logps_precision)
        if gap is not None and gap > STALE_WEIGHTS_GAP:
            self.log(f"round {round_id}: WARNING the sampler's log-probs differ from the trainer's by {gap:.3g} "
                     f"nats per token (> {STALE_WEIGHTS_GAP}) under checkpoint {policy.checkpoint_id}: "
                     "vLLM may hold stale weights, or sample.dtype differs from training's")
        return gap

    def pair(self, round_id: int) -> int:
        strategy = self.config.pair.strategy
        with self.store.transaction() as tx:
            round_ = tables.get_round(tx, round_id)
            if round_.has_finished("paired"):
                return tables.count(tx, "pairs", "round_id = ?", [round_id])
            completions = tables.completions(tx, round_id=round_id, purpose="train")
            prompts = {p.prompt_id: p for p in tables.prompts(tx, "train")} if strategy in NEEDS_SCORES else {}
        if self.config.pair.truncated == "drop":
            completions = [c for c in completions if c.finish_reason != "length"]
        scores = []
        if strategy in NEEDS_SCORES:
            scores = score_completions(self.judge, completions, prompts, self.config.judge.batch_size)
        formed = form_pairs(completions, round_id, strategy, seed=round_.seed,
                            scores={s.completion_id: s.score for s in scores})
        pairs = within_budget(formed, self.config.pair.max_pairs_per_round, seed=round_.seed)
        with self.store.transaction() as tx:
            tables.add_completion_scores(tx, scores)
            tables.add_pairs(tx, pairs)
            tables.finish_step(tx, round_id, "paired")
        kept = f", kept {len(pairs)} (pair.max_pairs_per_round)" if len(pairs) < len(formed) else ""
        self.log(f"round {round_id}: formed {len(formed)} pairs ({strategy}){kept}")
        return len(pairs)

    def label(self, round_id: int) -> int | None:
        """Label the round's pairs; returns the preferences, or None while the round waits
        for people (a `human` judge), in which case the run should stop here.

        A batch whose judge call breaks the contract stores nothing and stops the round;
        earlier batches stay, and a rerun judges only what is left. The first judge to
        label a round owns it: resuming with another judge would mix two labellers.
        """
        with self.store.transaction() as tx:
            if tables.get_round(tx, round_id).has_finished("labelled"):
                return tables.count_preferences(tx, round_id)
            owner = tables.claim_round_judge(tx, round_id, self.judge.name, self.judge.version)
        if owner != (self.judge.name, self.judge.version):
            raise UserError(
                f"round {round_id} is being labelled by {owner[0]}@{owner[1]}, not "
                f"{self.judge.name}@{self.judge.version}; resume it with that judge"
            )
        if isinstance(self.judge, HumanJudge):
            return self._wait_for_people(round_id, self.judge)
        result = label_pairs(self.store, self.judge, round_id, self.config.judge.batch_size,
                             truncated=self.config.pair.truncated)
        with self.store.transaction() as tx:
            tables.finish_step(tx, round_id, "labelled")
            count = tables.count_preferences(tx, round_id)
        failed = f", {result.failed} undecided (see judge_failures)" if result.failed else ""
        self.log(f"round {round_id}: {self.judge.name} labelled {result.labelled} pairs, {count} with a winner{failed}")
        return count

    def _wait_for_people(self, round_id: int, judge: HumanJudge) -> int | None:
        """Queue the round's pairs (once), then go on only if the quota or deadline is met."""
        now = utc_now()
        with self.store.transaction() as tx:
            request = judge.queue_round(tx, round_id, now)
            if not tables.get_round(tx, round_id).has_finished("labelling"):
                tables.finish_step(tx, round_id, "labelling")
            progress = queue_progress(tx, round_id)
        if request.labels_per_pair != judge.labels_per_pair:
            self.log(f"round {round_id} keeps the settings it was queued with "
                     f"({request.labels_per_pair} label(s) per pair, quota {request.quota_pairs} pairs); "
                     "new judge options apply from the next round")
        for warning in people_warnings(request, progress):
            self.log(f"round {round_id}: WARNING {warning}")
        because = ready_to_train(request, progress, now)
        if because is None:
            self.log(f"round {round_id} waits for people: {waiting_message(request, progress)}. Label with "
                     f"`flywheel label serve --db {self.config.database}`, then run again to go on.")
            return None
        with self.store.transaction() as tx:
            close_request(tx, round_id, because, now)
            tables.finish_step(tx, round_id, "labelled")
        count = self.store.read(tables.count_preferences, round_id)
        self.log(f"round {round_id}: people labelled {progress.labels} times ({because} met), {count} preferences; "
                 f"{progress.pairs - progress.pairs_done} pairs stay queued")
        return count

    def train(self, round_id: int) -> int | None:
        """DPO on the round's preferences; returns the candidate checkpoint id (None: no data)."""
        with self.store.transaction() as tx:
            round_ = tables.get_round(tx, round_id)
            if round_.has_finished("trained"):
                return round_.candidate_checkpoint_id
            triples = tables.preference_triples(tx, round_id)
            if not triples:
                self.log(f"round {round_id}: no preferences to train on; the incumbent stays")
                tables.finish_step(tx, round_id, "trained")
                return None
            triples += self._replayed(tx, round_id, round_.seed, len(triples))
            policy = tables.checkpoint(tx, round_.policy_checkpoint_id)
            reference = tables.checkpoint(tx, round_.reference_checkpoint_id)
        output_dir = self.config.checkpoints_dir / f"round-{round_id:04d}"
        with self.phases.phase(round_id, "reference_logps"):
            self.sampler.sleep()  # asleep already, unless this run resumed after sampling
            reference_logps = reference_logps_for(self.store, triples, reference, self.config.train.batch_size,
                                                  self.kept_reference, self.logps_precision)
        with self.phases.phase(round_id, "train"):
            if self.config.train.num_processes > 1:
                job = write_job(self.config.workdir / "jobs" / f"round-{round_id:04d}", Path(policy.path),
                                reference_logps, triples, self.config.train, output_dir, round_.seed)
                metrics = launch(job, self.config.train.num_processes)
            else:
                metrics = train_dpo(Path(policy.path), reference_logps, triples, self.config.train, output_dir,
                                    seed=round_.seed)
        with self.store.transaction() as tx:
            candidate_id = tables.add_checkpoint(tx,
                str(output_dir), role="candidate", status="candidate",
                parent_checkpoint_id=policy.checkpoint_id, round_id=round_id,
            )
            tables.add_train_steps(tx, [TrainStep(round_id, candidate_id, m) for m in metrics])
            tables.finish_step(tx, round_id, "trained", candidate_checkpoint_id=candidate_id)
        self.log(f"round {round_id}: trained {len(metrics)} DPO steps, final loss {metrics[-1].loss:.4f}")
        return candidate_id

    def _replayed(self, tx: Transaction, round_id: int, seed: int, fresh: int) -> list:
        """Earlier rounds' preferences to mix in, so that they make `replay_fraction` of the
        training set: r / (fresh + r) = f, so r = fresh * f / (1 - f), as far as there are."""
        fraction = self.config.train.replay_fraction
        if fraction == 0:
            return []
        earlier = tables.preference_triples(tx, round_id, earlier_rounds=True)
        wanted = min(round(fresh * fraction / (1 - fraction)), len(earlier))
        return random.Random(seed).sample(earlier, wanted)

    def evaluate(self, round_id: int) -> None:
        """Sample held-out prompts from the candidate (and the incumbent, once) and compare."""
        with self.store.transaction() as tx:
            round_ = tables.get_round(tx, round_id)
            if round_.has_finished("evaluated"):
                return
            if round_.candidate_checkpoint_id is None:
                tables.finish_step(tx, round_id, "evaluated")
                return
            heldout = tables.prompts(tx, "heldout")
            incumbent = tables.checkpoint(tx, round_.policy_checkpoint_id)
            candidate = tables.checkpoint(tx, round_.candidate_checkpoint_id)
            reference = tables.checkpoint(tx, round_.reference_checkpoint_id)
            # Every checkpoint is evaluated with the same seed (common random numbers), and an
            # incumbent's held-out samples are reused from when it was itself evaluated.
            incumbent_samples = tables.completions(tx, checkpoint_id=incumbent.checkpoint_id, purpose="eval")
        with self.phases.phase(round_id, "evaluate"):
            evaluation, new_samples = self._evaluate_candidate(round_id, heldout, incumbent, candidate, reference,
                                                               incumbent_samples)
        with self.store.transaction() as tx:
            tables.add_completions(tx, new_samples)
            tables.add_evaluation(tx, evaluation)
            tables.finish_step(tx, round_id, "evaluated")
        if evaluation.accuracy is not None:
            self.log(f"round {round_id}: held-out accuracy {evaluation.accuracy:.3f} "
                     f"vs incumbent {evaluation.incumbent_accuracy:.3f}")
        self.log(f"round {round_id}: win rate against the incumbent {evaluation.win_rate:.3f}")

    def _evaluate_candidate(self, round_id, heldout, incumbent, candidate, reference, incumbent_samples):
        """The candidate's `Evaluation`, and the held-out samples it drew to make it."""
        by_id = {p.prompt_id: p for p in heldout}
        new_incumbent_samples = []
        if not incumbent_samples:
            new_incumbent_samples = incumbent_samples = self._sample_heldout(incumbent, heldout, round_id)
        candidate_samples = self._sample_heldout(candidate, heldout, round_id)
        self.sampler.sleep()  # before the KL pass and the next round's training
        accuracy = incumbent_accuracy = None
        if self.accuracy_score is not None:
            accuracy = heldout_accuracy(candidate_samples, by_id, self.accuracy_score)
            incumbent_accuracy = heldout_accuracy(incumbent_samples, by_id, self.accuracy_score)
        evaluation = Evaluation(
            round_id=round_id,
            checkpoint_id=candidate.checkpoint_id,
            incumbent_checkpoint_id=incumbent.checkpoint_id,
            num_prompts=len(heldout),
            num_samples=len(candidate_samples),
            accuracy=accuracy,
            incumbent_accuracy=incumbent_accuracy,
            win_rate=win_rate(candidate_samples, incumbent_samples, by_id, self.eval_judge),
            mean_length=sum(len(c.token_ids) for c in candidate_samples) / len(candidate_samples),
            kl_to_reference=self._kl_to_reference(candidate, reference, candidate_samples),
        )
        return evaluation, new_incumbent_samples + candidate_samples

    def _kl_to_reference(self, candidate, reference, samples) -> float:
        """KL(candidate || reference) ~ mean over y ~ candidate of log pi(y|x) - log ref(y|x)
        (the unbiased k1 estimator), both log-probs from the same transformers forward."""
        sequences = [(c.prompt_token_ids, c.token_ids) for c in samples]
        batch_size = self.config.train.batch_size
        policy_logps = completion_logps(Path(candidate.path), sequences, batch_size, precision=self.logps_precision)
        reference_logps = completion_logps(Path(reference.path), sequences, batch_size, self.kept_reference,
                                           self.logps_precision)
        return sum(p - r for p, r in zip(policy_logps, reference_logps)) / len(sequences)

    def _sample_heldout(self, checkpoint, heldout, round_id):
        return self.sampler.sample(
            Path(checkpoint.path), checkpoint.checkpoint_id, heldout,
            n=self.config.eval.samples_per_prompt, temperature=self.config.eval.temperature,
            seed=self.config.seed, purpose="eval", round_id=round_id,
        )

    def promote(self, round_id: int) -> bool:
        """Promote the candidate if it passed the gate; otherwise keep it, marked rejected."""
        with self.store.transaction() as tx:  # the decision and its record land together
            round_ = tables.get_round(tx, round_id)
            if round_.candidate_checkpoint_id is None:
                if not round_.has_finished("done"):
                    tables.finish_step(tx, round_id, "done")
                return False
            if round_.has_finished("done"):
                return tables.checkpoint(tx, round_.candidate_checkpoint_id).status == "promoted"
            evaluation = tables.evaluation(tx, round_id, round_.candidate_checkpoint_id)
            promoted = promote_if_better(
                evaluation.accuracy, evaluation.incumbent_accuracy, evaluation.win_rate,
                self.config.eval.promotion_margin,
            )
            tables.set_checkpoint_status(tx, round_.candidate_checkpoint_id, "promoted" if promoted else "rejected")
            tables.record_promotion(tx,
                round_.candidate_checkpoint_id, "promote" if promoted else "reject", "gate",
                gate_reason(evaluation, self.config.eval.promotion_margin), round_id,
                policy_before=round_.policy_checkpoint_id,
            )
            tables.finish_step(tx, round_id, "done")
        self.log(f"round {round_id}: candidate {'promoted' if promoted else 'kept, not promoted'}")
        return promoted

    def run_round(self) -> int:
        """All steps of one round, without an orchestrator; returns the round id. A round
        that waits for people stops after `label`, in state `labelling`."""
        round_id = self.begin_round()
        self.sample(round_id)
        self.pair(round_id)
        if self.label(round_id) is None:
            return round_id
        for step in (self.train, self.evaluate, self.promote):
            step(round_id)
        return round_id
