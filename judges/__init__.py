"""Pluggable judges. A judge labels pairs; every label records the judge's name and version."""

from judges.base import Judge, JudgeError, PairToJudge, Verdict, judge_batch
from judges.rule import RuleJudge

__all__ = ["Judge", "JudgeError", "PairToJudge", "RuleJudge", "Verdict", "judge_batch"]
