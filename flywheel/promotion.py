"""A person's override of the promotion gate: promote any checkpoint, or roll back.

The policy the next round samples from is the most recently promoted checkpoint
(`current_policy`). Promoting makes a checkpoint that; rolling back marks the current
policy rejected, so the one promoted before it takes over. Both are recorded in
`promotions` with who and why, beside the gate's own decisions.
"""

from __future__ import annotations

from flywheel.errors import UserError
from storage.store import Store
from storage import tables


def promote_checkpoint(store: Store, checkpoint_id: int, decided_by: str, reason: str | None) -> None:
    """Make `checkpoint_id` the policy, whatever the gate said."""
    with store.transaction() as tx:
        if tables.count(tx, "checkpoints", "checkpoint_id = ?", [checkpoint_id]) == 0:
            raise UserError(f"no checkpoint with id {checkpoint_id} (see: flywheel sql \"SELECT * FROM checkpoints\")")
        before = tables.current_policy(tx)
        if before is not None and before.checkpoint_id == checkpoint_id:
            raise UserError(f"checkpoint {checkpoint_id} is already the current policy")
        tables.set_checkpoint_status(tx, checkpoint_id, "promoted")
        tables.record_promotion(tx, checkpoint_id, "promote", decided_by, reason, round_id=None,
                            policy_before=before.checkpoint_id if before else None)


def roll_back(store: Store, decided_by: str, reason: str | None) -> int:
    """Retire the current policy; returns the checkpoint that is the policy again."""
    with store.transaction() as tx:
        current = tables.current_policy(tx)
        if current is None or current.role == "reference":
            raise UserError("nothing to roll back: the current policy is the reference model")
        tables.set_checkpoint_status(tx, current.checkpoint_id, "rejected")
        tables.record_promotion(tx, current.checkpoint_id, "rollback", decided_by, reason, round_id=None,
                            policy_before=current.checkpoint_id)
        return tables.current_policy(tx).checkpoint_id
