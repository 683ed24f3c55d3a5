"""A verifier that takes its time, like a remote judge: labelling lasts long enough for a
test to kill the process in the middle of it."""

import time

from flywheel.examples.addition import addition_score

SECONDS_PER_CALL = 0.01


def slow_addition_score(prompt: str, completion: str) -> float:
    time.sleep(SECONDS_PER_CALL)
    return addition_score(prompt, completion)
