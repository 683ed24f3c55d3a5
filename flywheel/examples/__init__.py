"""Example tasks: the demo's two-number addition (its policy, prompts and judge)."""
