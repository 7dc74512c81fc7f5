"""Rewards for the tests, passed to ple.py and eval.py as --reward ple_tests.rewards:FUNCTION."""

SEEN_QUERIES = []  # every query word_reward was called with


def word_reward(queries, answers):
    """Counts a few 'positive' letters: cheap, deterministic, varies between answers."""
    SEEN_QUERIES.extend(queries)
    return [sum(a.count(c) for c in "aeiou") / 5.0 - 0.5 for a in answers]


def length_reward(queries, answers):
    return [float(len(a)) for a in answers]


def nan_reward(queries, answers):
    return [float("nan")] * len(queries)


def inf_reward(queries, answers):
    return [0.0] * (len(queries) - 1) + [float("inf")]


def short_reward(queries, answers):
    return [0.0] * (len(queries) - 1)


def raising_reward(queries, answers):
    raise ValueError("the reward server is down")


def scalar_reward(queries, answers):
    return 3.0


def none_reward(queries, answers):
    return None


def huge_reward(queries, answers):
    return [1e39] * len(answers)  # finite in float64, inf in float32


def late_reward(queries, answers):
    """Fine on the empty answers of the start-up check, fails on real ones (in iteration 0)."""
    if any(answers):
        raise RuntimeError("fails only on real answers")
    return [0.0] * len(answers)


def exiting_reward(queries, answers):
    import sys

    sys.exit(0)  # a reward that ends the process: the run must not end as if it succeeded


SCORED = []  # every batch of values logged_length_reward returned


def logged_length_reward(queries, answers):
    values = [float(len(a)) for a in answers]
    SCORED.append(values)
    return values


CALLS = [0]  # calls of second_iteration_reward


def second_iteration_reward(queries, answers):
    """Scores the start-up check and iteration 0 (x, then x_p), then fails: a run that has a checkpoint."""
    CALLS[0] += 1
    if CALLS[0] > 3:
        raise RuntimeError("the reward server went down")
    return [float(len(a)) for a in answers]


def dict_reward(queries, answers):
    return {i: 0.5 for i in range(len(answers))}
