"""The DPO loss and log-prob plumbing, checked against hand-worked numbers."""

import math

import pytest
import torch

from flywheel.dpo import collate_concatenated, concatenated_logps, dpo_loss, sequence_logps
from storage.records import PreferenceTriple


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.5, -0.2])
    other = torch.tensor([-4.0, -1.0, -9.0])
    losses, chosen, rejected = dpo_loss(logps, other, logps, other, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_dpo_loss_matches_hand_computed_values():
    # Example 1: policy chosen -1, rejected -3; reference chosen -2, rejected -2.
    #   chosen reward   = 0.5 * (-1 - -2) =  0.5
    #   rejected reward = 0.5 * (-3 - -2) = -0.5
    #   loss = -log sigmoid(0.5 - -0.5) = -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    # Example 2: the preference reversed: loss = -log sigmoid(-1) = log(1 + e) = 1.3132617
    losses, chosen, rejected = dpo_loss(
        torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0]),
        torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.5,
    )
    assert losses.tolist() == pytest.approx([0.3132617, 1.3132617], abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, -0.5])
    assert rejected.tolist() == pytest.approx([-0.5, 0.5])


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    losses.sum().backward()
    # d loss / d chosen = -beta * sigmoid(0) = -0.05: gradient descent raises log pi(yw|x).
    assert chosen.grad.item() == pytest.approx(-0.05)
    assert rejected.grad.item() == pytest.approx(0.05)


# Two examples with beta = 0.5 and reference log-probs -2, -2:
#   example 1: policy chosen -1, rejected -3, so h = (-1 - -3) - 0 =  2 and beta*h =  1
#   example 2: policy chosen -3, rejected -1, so h = -2             and beta*h = -1
# With -log s(1) = log(1 + e^-1) = 0.3132617 and -log s(-1) = log(1 + e) = 1.3132617:
#   sigmoid, eps 0.1: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617, and 1.2132617
#   robust,  eps 0.1: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1882617,
#                     (0.9 * 1.3132617 - 0.1 * 0.3132617) / 0.8 = 1.4382617
#   hinge: max(0, 1 - 1) = 0, max(0, 1 + 1) = 2
#   ipo: (2 - 1/(2 * 0.5))^2 = 1, (-2 - 1)^2 = 9
@pytest.mark.parametrize("loss_type, label_smoothing, expected", [
    ("sigmoid", 0.0, [0.3132617, 1.3132617]),
    ("sigmoid", 0.1, [0.4132617, 1.2132617]),
    ("robust", 0.1, [0.1882617, 1.4382617]),
    ("hinge", 0.0, [0.0, 2.0]),
    ("ipo", 0.0, [1.0, 9.0]),
])
def test_each_loss_type_matches_its_formula_on_hand_computed_values(loss_type, label_smoothing, expected):
    losses, chosen, rejected = dpo_loss(
        torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0]),
        torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.5,
        loss_type=loss_type, label_smoothing=label_smoothing,
    )
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    # The implicit rewards do not depend on the loss.
    assert chosen.tolist() == pytest.approx([0.5, -0.5]) and rejected.tolist() == pytest.approx([-0.5, 0.5])


def test_ipo_divides_each_log_ratio_by_its_length_when_given_lengths():
    # Chosen log-ratio (-1 - -2) = 1 over 2 tokens, rejected (-3 - -2) = -1 over 4 tokens:
    # h = 1/2 - (-1/4) = 0.75, and with beta 0.5 the loss is (0.75 - 1)^2 = 0.0625. The
    # rewards stay on the summed log-ratios: 0.5 * 1 and 0.5 * -1.
    losses, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5,
        loss_type="ipo", chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]),
    )
    assert losses.item() == pytest.approx(0.0625) and (chosen.item(), rejected.item()) == (0.5, -0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
def test_every_loss_at_policy_equals_reference_raises_chosen_and_lowers_rejected(loss_type):
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-5.0]), beta=0.1,
                            loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    assert chosen.grad.item() == pytest.approx(-rejected.grad.item())


def test_loss_settings_are_checked():
    from flywheel.config import TrainConfig
    from flywheel.errors import UserError

    with pytest.raises(UserError, match="loss_type must be one of"):
        TrainConfig(loss_type="kto")
    with pytest.raises(UserError, match="applies to the sigmoid and robust losses"):
        TrainConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(UserError, match=r"label_smoothing must be in \[0, 0.5\)"):
        TrainConfig(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1, loss_type="kto")


def test_sequence_logps_sums_completion_tokens_only():
    # Vocabulary of 2; uniform logits except where set. Sequence: [p, p, c, c] with two
    # prompt tokens; only the predictions of positions 2 and 3 count.
    logits = torch.zeros(1, 4, 2)
    logits[0, 1] = torch.tensor([math.log(3.0), 0.0])  # predicts token 2 (=0) with p=3/4
    logits[0, 2] = torch.tensor([0.0, math.log(4.0)])  # predicts token 3 (=1) with p=4/5
    logits[0, 0] = torch.tensor([100.0, 0.0])  # predicts a prompt token: must be ignored
    input_ids = torch.tensor([[1, 1, 0, 1]])
    mask = torch.tensor([[0, 0, 1, 1]])
    expected = math.log(3 / 4) + math.log(4 / 5)
    assert sequence_logps(logits, input_ids, mask).item() == pytest.approx(expected, abs=1e-6)


def test_collate_puts_chosen_first_and_masks_from_token_ids():
    triples = [
        PreferenceTriple(1, [1, 5], [7, 2], [8, 8, 2]),
        PreferenceTriple(2, [1, 5, 6], [9, 2], [2]),
    ]
    batch = collate_concatenated(triples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 5, 7, 2, 0],
        [1, 5, 6, 9, 2],
        [1, 5, 8, 8, 2],
        [1, 5, 6, 2, 0],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 0, 0, 1, 0],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [4, 5, 5, 4]


def test_concatenated_forward_equals_separate_forwards(tiny_policy):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_policy).eval()
    triples = [PreferenceTriple(1, [1, 4, 14, 5, 15], [7, 2], [8, 3, 2]),
               PreferenceTriple(2, [1, 6, 14, 6, 15], [10, 2], [11, 2])]
    with torch.no_grad():
        chosen, rejected = concatenated_logps(model, collate_concatenated(triples, 0))
        for i, triple in enumerate(triples):
            for side, got in (("chosen_token_ids", chosen[i]), ("rejected_token_ids", rejected[i])):
                ids = torch.tensor([triple.prompt_token_ids + getattr(triple, side)])
                mask = torch.tensor([[0] * len(triple.prompt_token_ids) + [1] * len(getattr(triple, side))])
                alone = sequence_logps(model(input_ids=ids).logits, ids, mask)
                assert got.item() == pytest.approx(alone.item(), abs=1e-4)


def test_chosen_nll_is_per_token_over_chosen_rows_only():
    from flywheel.dpo import chosen_nll

    # Two triples: chosen completions of 2 and 4 tokens; rejected rows must not count.
    triples = [PreferenceTriple(1, [1, 5], [7, 2], [8, 2]), PreferenceTriple(2, [1], [7, 7, 7, 2], [2])]
    batch = collate_concatenated(triples, pad_token_id=0)
    chosen_logps = torch.tensor([-3.0, -2.0])
    # -(-3)/2 = 1.5 and -(-2)/4 = 0.5
    assert chosen_nll(chosen_logps, batch).tolist() == pytest.approx([1.5, 0.5])


def test_training_pairs_each_triple_with_its_own_reference_logps(tiny_policy, tmp_path):
    # Policy = reference, so every step-1 example has loss log 2 and zero rewards, but only
    # if each shuffled triple meets the reference log-probs computed for that same triple.
    from flywheel.config import TrainConfig
    from flywheel.training import train_dpo

    triples = [PreferenceTriple(i, [1, 4 + i % 10, 14, 5, 15], [6 + i % 5, 2], [7 + i % 3, 4, 2]) for i in range(7)]
    metrics = train_dpo(tiny_policy, tiny_policy, triples, TrainConfig(batch_size=3, epochs=2, learning_rate=1e-4),
                        tmp_path / "candidate", seed=0)
    assert len(metrics) == 6  # ceil(7 / 3) steps per epoch, two epochs
    assert metrics[0].loss == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[0].chosen_reward == pytest.approx(0.0, abs=1e-6)
    assert metrics[0].rejected_reward == pytest.approx(0.0, abs=1e-6)
    # Later steps move the policy towards the preferences. Measured over seeds 0-4, default
    # threads and OMP_NUM_THREADS=1: the last step's margin was 0.04-0.35, never below 0.
    assert metrics[-1].reward_margin > 0
    assert (tmp_path / "candidate" / "model.safetensors").is_file()
    fixed = train_dpo(tiny_policy, tiny_policy, triples, TrainConfig(batch_size=3, steps_per_round=4, learning_rate=1e-4),
                      tmp_path / "fixed", seed=0)
    assert [m.num_pairs for m in fixed] == [3, 3, 3, 3]  # 4 steps of whole batches over 3 passes


def test_training_uses_the_configured_loss_on_length_normalised_logps(tiny_policy, tmp_path):
    # Policy = reference at step 1, so h = 0 and IPO's loss is (0 - 1/(2 * 0.1))^2 = 25.
    from flywheel.config import TrainConfig
    from flywheel.training import train_dpo

    triples = [PreferenceTriple(i, [1, 4 + i % 10, 14, 5, 15], [6 + i % 5, 2], [7 + i % 3, 4, 4, 2]) for i in range(4)]
    config = TrainConfig(batch_size=4, learning_rate=1e-4, loss_type="ipo", length_normalised=True, nll_weight=0.5)
    metrics = train_dpo(tiny_policy, tiny_policy, triples, config, tmp_path / "candidate", seed=0)
    assert metrics[0].loss == pytest.approx(25.0, abs=1e-4)
    assert metrics[0].chosen_reward == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("schedule, expected", [
    # peak 1e-3, 2 warm-up steps, 6 steps: 1e-3 * [1/2, 1], then decay from the peak with
    # progress 0, 1/4, 1/2, 3/4 over the 4 remaining steps.
    ("constant", [5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]),
    ("linear", [5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4]),
    # cosine: 1e-3 * (1 + cos(pi * progress)) / 2 = 1, 0.8535534, 0.5, 0.1464466 (x 1e-3)
    ("cosine", [5e-4, 1e-3, 1e-3, 8.535534e-4, 5e-4, 1.464466e-4]),
])
def test_learning_rate_schedule_matches_hand_computed_values(schedule, expected):
    from flywheel.config import TrainConfig
    from flywheel.training import learning_rate_at

    config = TrainConfig(learning_rate=1e-3, warmup_steps=2, lr_schedule=schedule)
    assert [learning_rate_at(step, 6, config) for step in range(1, 7)] == pytest.approx(expected, abs=1e-9)


def test_gradient_accumulation_gives_the_same_steps_as_one_big_batch(tiny_policy, tmp_path):
    from safetensors.torch import load_file

    from flywheel.config import TrainConfig
    from flywheel.training import train_dpo

    triples = [PreferenceTriple(i, [1, 4 + i % 10, 14, 5, 15], [6 + i % 5, 2], [7 + i % 3, 4, 2]) for i in range(6)]
    runs = {}
    for accumulation in (1, 3):
        config = TrainConfig(batch_size=6, learning_rate=1e-3, epochs=2, nll_weight=0.5,
                             gradient_accumulation_steps=accumulation, warmup_steps=1, lr_schedule="linear")
        metrics = train_dpo(tiny_policy, tiny_policy, triples, config, tmp_path / str(accumulation), seed=0)
        runs[accumulation] = (metrics, load_file(tmp_path / str(accumulation) / "model.safetensors"))
    (one, weights_one), (three, weights_three) = runs[1], runs[3]
    assert [m.learning_rate for m in one] == [m.learning_rate for m in three] == pytest.approx([1e-3, 1e-3])
    for a, b in zip(one, three):
        assert (a.loss, a.grad_norm, a.reward_margin) == pytest.approx((b.loss, b.grad_norm, b.reward_margin), abs=1e-5)
        assert a.tokens_per_second > 0 and b.tokens_per_second > 0
    for name, tensor in weights_one.items():
        assert torch.allclose(tensor, weights_three[name], atol=1e-5), name


def test_lora_trains_only_adapters_and_saves_merged_plain_weights(tiny_policy, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from flywheel.config import TrainConfig
    from flywheel.training import train_dpo

    triples = [PreferenceTriple(i, [1, 4 + i % 10, 14, 5, 15], [6 + i % 5, 2], [7 + i % 3, 4, 2]) for i in range(8)]
    config = TrainConfig(batch_size=4, epochs=3, learning_rate=1e-2, lora_rank=4)
    metrics = train_dpo(tiny_policy, tiny_policy, triples, config, tmp_path / "lora", seed=0)
    assert metrics[0].loss == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy starts as the reference
    # Measured over seeds 0-4, default threads and OMP_NUM_THREADS=1: the last step's
    # margin was 0.98-1.51 (one middle step of one seed dipped to -0.42: lr 1e-2 overshoots).
    assert metrics[-1].reward_margin > 0
    saved = sorted(p.name for p in (tmp_path / "lora").iterdir())
    assert "adapter_config.json" not in saved and "model.safetensors" in saved
    before, after = load_file(tiny_policy / "model.safetensors"), load_file(tmp_path / "lora" / "model.safetensors")
    assert set(after) == set(before)  # the same tensors as a plain checkpoint, adapters merged in
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # LoRA touches linear layers only: the projections changed, embeddings and norms did not.
    assert changed and all(name.endswith(("proj.weight", "lm_head.weight")) for name in changed)
    assert not any("norm" in name or "embed" in name for name in changed)
    AutoModelForCausalLM.from_pretrained(tmp_path / "lora")  # loads with no peft at all


def test_gradient_checkpointing_takes_the_same_steps_and_bf16_nearly(tiny_policy, tmp_path):
    from flywheel.config import TrainConfig
    from flywheel.training import train_dpo

    triples = [PreferenceTriple(i, [1, 4 + i % 10, 14, 5, 15], [6 + i % 5, 2], [7 + i % 3, 4, 2]) for i in range(8)]
    runs = {}
    for name, options in {"plain": {}, "checkpointed": {"gradient_checkpointing": True}, "bf16": {"dtype": "bfloat16"}}.items():
        config = TrainConfig(batch_size=4, epochs=2, learning_rate=1e-3, **options)
        runs[name] = train_dpo(tiny_policy, tiny_policy, triples, config, tmp_path / name, seed=0)
    for plain, checkpointed, bf16 in zip(runs["plain"], runs["checkpointed"], runs["bf16"]):
        assert (plain.loss, plain.grad_norm) == pytest.approx((checkpointed.loss, checkpointed.grad_norm), abs=1e-6)
        # bf16 rounding: the largest gap over seeds 0-4 was 0.0032, so 0.02 leaves 6x room.
        assert bf16.loss == pytest.approx(plain.loss, abs=0.02) and bf16.loss != plain.loss
    assert runs["plain"][0].loss == pytest.approx(math.log(2), abs=1e-6)  # train mode changed nothing


def test_at_policy_equal_to_reference_a_small_step_against_the_dpo_gradient_raises_the_margin(tiny_policy):
    # A gradient check on the real model. At policy = reference every log-ratio is 0, so
    # the loss is log 2, and with s(0) = 1/2 the gradient of the mean loss (eq. 7) is
    #   grad L = -(beta / 2N) * grad M,   M = sum_i (log pi(yw_i) - log pi(yl_i)).
    # A step theta -= lr * grad L changes M by lr * (beta / 2N) * |grad M|^2 > 0 and L by
    # -lr * |grad L|^2 to first order. That is all the maths promises: chosen and
    # rejected log-probs often fall together, so neither is asserted alone.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()
    triples = [PreferenceTriple(i, [1, 4 + i % 10, 14, 5, 15], [6 + i % 5, 2], [9 - i % 3, 4, 2]) for i in range(6)]
    batch = collate_concatenated(triples, pad_token_id=0)
    beta = 0.1
    with torch.no_grad():
        reference_chosen, reference_rejected = concatenated_logps(model, batch)
    chosen, rejected = concatenated_logps(model, batch)
    losses, _, _ = dpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta=beta)
    assert losses.mean().item() == pytest.approx(math.log(2), abs=1e-6)
    losses.mean().backward()
    gradients = [p.grad for p in model.parameters()]
    squared_norm = sum((g.double() ** 2).sum() for g in gradients).item()
    # A step of length 1e-3 in parameter space: small enough that first order holds, large
    # enough that the change of M stands far above float32 rounding of log-probs near -25.
    lr = 1e-3 / math.sqrt(squared_norm)
    with torch.no_grad():
        for parameter, gradient in zip(model.parameters(), gradients):
            parameter -= lr * gradient
        after_chosen, after_rejected = concatenated_logps(model, batch)
        after_losses, _, _ = dpo_loss(after_chosen, after_rejected, reference_chosen, reference_rejected, beta=beta)
    margin_change = ((after_chosen - reference_chosen) - (after_rejected - reference_rejected)).sum().item()
    # |grad M|^2 = (2N / beta)^2 |grad L|^2, so the predicted change is lr * (2N / beta) * |grad L|^2.
    predicted_margin_change = lr * (2 * len(triples) / beta) * squared_norm
    assert margin_change > 0
    assert margin_change == pytest.approx(predicted_margin_change, rel=0.1)
    assert after_losses.mean().item() < math.log(2)
