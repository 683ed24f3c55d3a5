"""Build a judge from a spec string, as written in a config or on the command line.

    human                           people, through the labelling queue (judges.human)
    rule:package.module:function    a scoring function score(prompt, completion) -> float
    reward-model:PATH               a sequence-classification checkpoint with one output
    llm:PATH                        a causal checkpoint asked pairwise through vLLM
    package.module:Name             your own judge: a class (built with the options as
                                    keyword arguments), a factory function, or an instance
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any, Mapping

from judges.base import Judge, JudgeSpecError

if TYPE_CHECKING:
    from judges.human import HumanJudge

BUILT_IN = ("rule", "reward-model", "llm")
HUMAN = "human"


def import_object(spec: str, what: str) -> Any:
    """`package.module:attribute` -> the attribute, or a one-line JudgeSpecError."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise JudgeSpecError(f"{what} {spec!r} must look like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an ImportError, or whatever the module raised on import
        raise JudgeSpecError(f"{what} {spec!r} does not import: {type(error).__name__}: {error}") from error
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as error:
            raise JudgeSpecError(f"{what} {spec!r}: module {module_name} has no {attribute!r}") from error
    return target


def load_judge(spec: str, options: Mapping[str, Any] | None = None) -> "Judge | HumanJudge":
    """The judge a spec names, built with `options`, checked against the Judge interface.
    `human` gives the settings of the labelling queue, which people answer asynchronously."""
    options = dict(options or {})
    kind, _, rest = spec.partition(":")
    try:
        if spec == HUMAN:
            from judges.human import HumanJudge

            return HumanJudge(**_typed(HumanJudge, options))
        if kind == "rule":
            from judges.rule import RuleJudge

            score = import_object(rest, "score function")
            if not callable(score):
                raise JudgeSpecError(f"score function {rest!r} is not callable")
            judge = RuleJudge(score, **{"name": f"rule:{rest}", **_typed(RuleJudge, options)})
        elif kind == "reward-model":
            from judges.reward_model import RewardModelJudge

            judge = RewardModelJudge(rest, **_typed(RewardModelJudge, options))
        elif kind == "llm":
            from judges.llm import PairwiseLLMJudge

            judge = PairwiseLLMJudge(rest, **_typed(PairwiseLLMJudge, options))
        else:
            judge = _build_custom(spec, options)
    except TypeError as error:
        # Unknown or missing keyword arguments from the options.
        raise JudgeSpecError(f"judge {spec!r} cannot be built with options {sorted(options)}: {error}") from error
    check_judge(judge, spec)
    return judge


def _typed(builder: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Options from a command line arrive as strings; give each the type of the builder's
    default for it (`batch_size=32` -> 32), and leave strings for string parameters."""
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return options
    typed = {}
    for key, value in options.items():
        default = parameters[key].default if key in parameters else None
        if isinstance(value, str) and isinstance(default, (bool, int, float)):
            try:
                value = _parse_scalar(value, type(default))
            except ValueError as error:
                raise JudgeSpecError(f"judge option {key}={value!r} must be a {type(default).__name__}") from error
        typed[key] = value
    return typed


def _parse_scalar(text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("true", "1", "yes")
    return kind(text)


def _build_custom(spec: str, options: dict[str, Any]) -> Any:
    target = import_object(spec, "judge")
    if inspect.isclass(target) or (callable(target) and not hasattr(target, "judge")):
        try:
            return target(**_typed(target, options))
        except (JudgeSpecError, TypeError):  # TypeError: bad options, reported by load_judge
            raise
        except Exception as error:
            raise JudgeSpecError(f"judge {spec!r} failed to build: {type(error).__name__}: {error}") from error
    if options:
        raise JudgeSpecError(f"judge {spec!r} is an instance; it takes no options (got {sorted(options)})")
    return target


def check_judge(judge: Any, spec: str) -> None:
    """A one-line error naming what the object lacks to be a Judge."""
    problems = [f"a string '{attr}'" for attr in ("name", "version")
                if not isinstance(getattr(judge, attr, None), str) or not getattr(judge, attr)]
    if not callable(getattr(judge, "judge", None)):
        problems.append("a method judge(pairs)")
    if problems:
        raise JudgeSpecError(
            f"judge {spec!r} ({type(judge).__name__}) does not fit the Judge interface: it needs "
            + ", ".join(problems)
        )
