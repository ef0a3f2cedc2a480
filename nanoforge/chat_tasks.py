"""
The built-in chat tasks (`python prepare.py chat_tasks`): small, exactly checkable skills that a small
model can learn in minutes on a CPU, so SFT can be seen working offline.
"""

import random

CHAT_TASKS_TRAIN, CHAT_TASKS_VAL = 20000, 500  # conversations of the built-in task set
CHAT_TASKS_SEED = 1337  # the tasks' one seed (prepare.py's --seed does not move them): eval.py's val questions
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def random_word(rng):
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def task_reverse(rng):
    word = random_word(rng)
    return f"reverse {word}", word[::-1]


def task_add(rng):
    # A digit added to a three-digit number. A sum of two multi-digit numbers, written most significant
    # digit first, needs its carries worked out ahead: fine-tuning a partly trained quickstart model on two
    # two-digit numbers got 6 % of them right after 1000 steps (at lr 2e-3), the other tasks 54-100 %.
    a, b = rng.randint(100, 999), rng.randint(1, 9)
    return f"add {a} {b}", str(a + b)


def task_count(rng):
    word = random_word(rng) + random_word(rng)
    letter = rng.choice(word)
    return f"count {letter} in {word}", str(word.count(letter))


def task_spell(rng):
    word = random_word(rng)
    return f"spell {word}", " ".join(word)


TASKS = (task_reverse, task_add, task_count, task_spell)


def chat_tasks(n_train, n_val, seed):
    """(train, val): lists of conversations, one question and its answer each, the kinds taken in turn.
    No question is in both splits: val takes the first n_val distinct questions drawn, train the next."""
    rng = random.Random(seed)
    seen, splits = set(), ([], [])
    for split, n in ((1, n_val), (0, n_train)):
        while len(splits[split]) < n:
            question, answer = TASKS[(len(splits[split])) % len(TASKS)](rng)
            if question in seen:
                continue
            seen.add(question)
            splits[split].append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return splits
