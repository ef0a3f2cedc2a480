"""
Tasks with verifiers, for reinforcement learning (rl.py) and for scoring (eval.py --task): each gives problems
(a user message and its reference answer) and a reward for a completion. A task is a small object:

    class Subtraction(Task):
        name = "subtraction"

        def generate(self, rng):                      # one problem from a random.Random
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            return Problem(f"what is {a} - {b}?", str(a - b))

    TASKS["subtraction"] = Subtraction               # then `rl.py --task=subtraction`, `eval.py --task subtraction`

Task.reward(problem, completion) is 1.0 when the completion's final text (what is left once its tool calls and
their outputs are taken out: tools.final_text) is the reference answer, whitespace normalised, and 0.0 otherwise;
override it for partial credit or another check. Splits: "test" is held out (a fixed tenth of all problems, chosen
by a hash of the prompt, so no seed can draw one into training), "train" is everything else; problems(split, n,
seed) draws n distinct ones. The arithmetic tasks' SFT data (`prepare.py arithmetic`) draws from "train" alone.
"""

import hashlib
import json
import random
import re
from dataclasses import dataclass

from nanoforge import chat_tasks
from nanoforge.errors import UserError

TEST_SEED = 2024  # the held-out problems every command scores: eval.py and rl.py's evaluations see the same ones
HELD_OUT = 10  # one problem in HELD_OUT is in the test split


class TaskError(UserError):
    """An unknown task, a task file that cannot be read, or a reward function that misbehaves."""


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message
    answer: str  # the reference answer, as the reward compares it


def normalize(text):
    return " ".join(text.split())


class Task:
    """Problems from generate(rng) and an exact-match reward. Subclasses set name and write generate()."""

    name = "task"

    def generate(self, rng):
        raise NotImplementedError

    def reward(self, problem, completion):
        return float(normalize(completion) == normalize(problem.answer))

    def held_out(self, problem):
        digest = hashlib.sha256(problem.prompt.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "little") % HELD_OUT == 0

    def problems(self, split, n, seed):
        """n distinct problems of the split ("train" or "test"), drawn from seed."""
        rng, seen, drawn = random.Random(seed), set(), []
        for _ in range(100 * n + 1000):  # a task with few problems says so instead of looping forever
            if len(drawn) == n:
                return drawn
            problem = self.generate(rng)
            if problem.prompt not in seen and self.held_out(problem) == (split == "test"):
                seen.add(problem.prompt)
                drawn.append(problem)
        raise TaskError(f"task {self.name} has fewer than {n} distinct {split} problems: ask for fewer")


class Addition(Task):
    """Two three-digit numbers: their carries are what a small model gets wrong without a calculator."""

    name = "addition"

    def generate(self, rng):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return Problem(f"what is {a} + {b}?", str(a + b))

    def expression(self, problem):
        a, b = re.findall(r"\d+", problem.prompt)
        return f"{a}+{b}"


class Multiplication(Task):
    """A two-digit number times a two-digit number."""

    name = "multiplication"

    def generate(self, rng):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Problem(f"what is {a} * {b}?", str(a * b))

    def expression(self, problem):
        a, b = re.findall(r"\d+", problem.prompt)
        return f"{a}*{b}"


class ChatTasks(Task):
    """The built-in chat tasks (chat_tasks.py: reverse, add, count, spell), all exactly checkable; the held-out
    split is their val split, the one `prepare.py chat_tasks` keeps out of training."""

    name = "chat_tasks"

    def problems(self, split, n, seed):
        train, val = chat_tasks.chat_tasks(0 if split == "test" else chat_tasks.CHAT_TASKS_TRAIN,
                                           chat_tasks.CHAT_TASKS_VAL, chat_tasks.CHAT_TASKS_SEED)
        pool = [Problem(m[0]["content"], m[1]["content"]) for m in (val if split == "test" else train)]
        return sample_of(pool, split, n, seed, "task chat_tasks")


def sample_of(pool, split, n, seed, what):
    """n problems of a fixed list: the first n held-out ones (every command scores the same), or a random n of the
    training ones (all of them when there are fewer: training draws from them again and again)."""
    if split == "train":
        return random.Random(seed).sample(pool, min(n, len(pool)))
    if n > len(pool):
        raise TaskError(f"{what} has {len(pool)} held-out problems, fewer than the {n} asked for: ask for fewer")
    return pool[:n]


GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


class GSM8K(Task):
    """Grade-school maths word problems (Cobbe et al. 2021): the answer is the number after "####". Problems come
    from JSONL files of {"question", "answer"} records (GSM8K's own format): GSM8K's train file for training and its
    test file for "test" (nanoforge.datasets.gsm8k_files downloads them), or one local file split as every task is
    (a tenth held out by the hash of the question)."""

    name = "gsm8k"

    def __init__(self, train_path, test_path=None):
        self.train_path, self.test_path = train_path, test_path

    def problems(self, split, n, seed):
        if self.test_path is None:  # one file: the hash decides the split
            pool = [p for p in read_gsm8k(self.train_path) if self.held_out(p) == (split == "test")]
            return sample_of(pool, split, n, seed, f"'{self.train_path}'")
        path = self.test_path if split == "test" else self.train_path
        return sample_of(read_gsm8k(path), split, n, seed, f"'{path}'")

    def reward(self, problem, completion):
        said, expected = gsm8k_answer(completion), gsm8k_answer(problem.answer)
        return float(said is not None and said == expected)


def gsm8k_answer(text):
    """The number after the last "####", commas dropped (GSM8K writes 1,000), or None."""
    found = GSM8K_ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


def read_gsm8k(path):
    problems = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    problems.append(Problem(record["question"], record["answer"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise TaskError(f"'{path}' line {i} is not a GSM8K record {{\"question\", \"answer\"}}") from None
    except FileNotFoundError:
        raise TaskError(f"GSM8K file '{path}' not found: pass the path of its .jsonl file") from None
    if not problems:
        raise TaskError(f"'{path}' holds no GSM8K problem")
    return problems


TASKS = {"addition": Addition, "multiplication": Multiplication, "chat_tasks": ChatTasks, "gsm8k": GSM8K}


def get_task(name, data=None, download_dir="data/gsm8k"):
    """The task called name. gsm8k reads data (one local JSONL file, a tenth of it held out), or downloads GSM8K's
    train and test files once into download_dir."""
    if name not in TASKS:
        raise TaskError(f"unknown task '{name}': choose one of {', '.join(TASKS)}")
    if name != "gsm8k":
        return TASKS[name]()
    if data:
        return GSM8K(data)
    from nanoforge.datasets import gsm8k_files  # only this task downloads

    train, test = gsm8k_files(download_dir)
    return GSM8K(train, test)


def checked_reward(task, problem, completion):
    """task.reward, refused in one line when it raises or is not a finite number (it would poison the update)."""
    try:
        value = float(task.reward(problem, completion))
    except Exception as e:  # a user's reward function: any error it raises is theirs to fix
        raise TaskError(f"task {task.name}'s reward raised {type(e).__name__}: {e} (prompt {problem.prompt!r}, "
                        f"completion {completion!r}): fix the reward function") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise TaskError(f"task {task.name}'s reward returned {value} for prompt {problem.prompt!r}, completion "
                        f"{completion!r}: a reward must be a finite number")
    return value


def sft_reply(task, problem, use_tool):
    """The assistant's content for an SFT conversation: the answer alone, or a calculator call, its output and
    the answer (chat_format's parts)."""
    if not use_tool:
        return problem.answer
    return [{"type": "python", "text": task.expression(problem)},
            {"type": "python_output", "text": problem.answer},
            {"type": "text", "text": problem.answer}]


ARITHMETIC_TRAIN, ARITHMETIC_VAL = 20000, 500  # SFT conversations of `prepare.py arithmetic` (val: SFT's val loss)
ARITHMETIC_SEED = 7
TOOL_SHARE = 0.5  # of SFT replies that call the calculator; the rest answer directly


def arithmetic_conversations(n_train=ARITHMETIC_TRAIN, n_val=ARITHMETIC_VAL, seed=ARITHMETIC_SEED):
    """(train, val) conversations for SFT on addition and multiplication, both from the tasks' train split (the
    held-out problems stay unseen): half the replies call the calculator, half answer directly, so the SFT model
    knows both ways and RL can learn which one earns the reward."""
    rng = random.Random(seed)
    kinds, conversations = (Addition(), Multiplication()), []
    while len(conversations) < n_train + n_val:  # a problem may come twice (there are 7,290 train multiplications)
        task = kinds[len(conversations) % len(kinds)]
        problem = task.generate(rng)
        if not task.held_out(problem):
            conversations.append([{"role": "user", "content": problem.prompt},
                                  {"role": "assistant", "content": sft_reply(task, problem, rng.random() < TOOL_SHARE)}])
    return conversations[n_val:], conversations[:n_val]
