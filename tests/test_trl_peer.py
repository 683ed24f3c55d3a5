"""Our DPO step against TRL's `DPOTrainer` on the same tiny model, batch, beta and loss.

The policy is a perturbed copy of the reference, so the first step's losses and rewards
are not the trivial log 2 and 0 of policy = reference. Both trainers read the same token
ids: ours get the ones TRL's own tokenisation produced.
"""

from __future__ import annotations

import pytest

from flywheel.config import TrainConfig
from flywheel.training import train_dpo
from storage.records import PreferenceTriple


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                                         ("robust", 0.1)])
def test_first_step_matches_trl_dpo_trainer(tiny_policy, perturbed_policy, tmp_path, loss_type, label_smoothing):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    sums = [(3, 4), (12, 9), (55, 7), (1, 80), (40, 40), (9, 99)]
    data = Dataset.from_list([{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 3 * 10)}
                              for a, b in sums])
    beta = 0.1
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(sums), max_steps=1,
                     learning_rate=1e-4, beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(perturbed_policy),
                         ref_model=AutoModelForCausalLM.from_pretrained(tiny_policy), args=args,
                         train_dataset=data, processing_class=AutoTokenizer.from_pretrained(tiny_policy))
    triples = [PreferenceTriple(i, row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
               for i, row in enumerate(trainer.train_dataset)]
    trainer.train()
    theirs = trainer.state.log_history[0]

    config = TrainConfig(beta=beta, batch_size=len(sums), learning_rate=1e-4, loss_type=loss_type,
                         label_smoothing=label_smoothing)
    ours = train_dpo(perturbed_policy, tiny_policy, triples, config, tmp_path / "ours", seed=0)[0]
    assert ours.loss == pytest.approx(theirs["loss"], abs=1e-5)
    assert ours.chosen_reward == pytest.approx(theirs["rewards/chosen"], abs=1e-5)
    assert ours.rejected_reward == pytest.approx(theirs["rewards/rejected"], abs=1e-5)
    assert ours.loss != pytest.approx(0.6931, abs=1e-3)  # not the trivial policy = reference value
