"""The lm-evaluation-harness bridge: the same task results as the harness's own HFLM on an exported GPT-2 twin
(tasks defined offline in local YAML over a local JSON file), log-likelihoods equal to model.forward on our own
architectures, and eval.py --harness end to end."""

import json
import random

import pytest
import torch

from conftest import run_cli
from model import GPT, GPTConfig
from nanoforge import harness
from nanoforge.tokenizer import ByteTokenizer
from test_architecture import OPTIONS
from test_multiple_choice import direct_logprob, hellaswag_records, save_checkpoint, twin, write_jsonl  # noqa: F401

TASKS = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
---
task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{ctx}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
---
task: tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: generate_until
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{endings[label]}}}}"
generation_kwargs:
  until: [".", "\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture
def tasks_dir(tmp_path, monkeypatch):
    """A directory of three harness tasks (one per output type) over a local HellaSwag-format JSON file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    data = write_jsonl(tmp_path / "tiny.jsonl", hellaswag_records(9, seed=3, long_every=4))
    directory = tmp_path / "tasks"
    directory.mkdir()
    for text in TASKS.format(data=data).split("---\n"):
        name = text.split("\n", 1)[0].removeprefix("task: ")
        (directory / f"{name}.yaml").write_text(text, encoding="utf-8")
    return directory


def metrics(results, task):
    """{metric: value} of a task (its name, and a standard error the harness cannot compute, are strings)."""
    return {k: v for k, v in results["results"][task].items() if isinstance(v, (int, float))}


def test_bridge_gives_hflms_task_results_on_the_exported_twin(twin, tasks_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer, exported = twin
    names = ["tiny_choice", "tiny_rolling", "tiny_generate"]
    ours, _ = harness.run_tasks(model, tokenizer, names, include_path=str(tasks_dir), batch_size=4)
    theirs = simple_evaluate(model=HFLM(pretrained=str(exported), device="cpu", batch_size=4), tasks=names,
                             task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=False)
    for task in names:
        assert metrics(ours, task).keys() == metrics(theirs, task).keys()
        assert metrics(ours, task) == pytest.approx(metrics(theirs, task), rel=1e-5), task


def test_greedy_generations_equal_hflms(twin, tasks_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, exported = twin
    settings = {"until": ["."], "max_gen_toks": 7, "do_sample": False}
    requests = [Instance("generate_until", {}, (r["ctx"], settings), 0) for r in hellaswag_records(6, seed=5)]
    ours = harness.NanoforgeLM(model, tokenizer, batch_size=4).generate_until(requests)
    theirs = HFLM(pretrained=str(exported), device="cpu", batch_size=4).generate_until(requests, disable_tqdm=True)
    assert ours == theirs and any(ours)


@pytest.mark.parametrize("name", ["rope", "rmsnorm", "qk_norm", "untied", "all"])
def test_bridge_log_likelihoods_equal_model_forward_on_our_architectures(name):
    from lm_eval.api.instance import Instance

    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    model = GPT(GPTConfig(block_size=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_embd=32,
                          **OPTIONS[name])).eval()
    lm = harness.NanoforgeLM(model, tokenizer, batch_size=3)
    rng = random.Random(0)
    records = hellaswag_records(5, seed=7)
    requests = [Instance("loglikelihood", {}, (r["ctx"] + rng.choice(["", " "]), r["endings"][0]), 0) for r in records]
    got = [lp for lp, _ in lm.loglikelihood(requests)]
    want = []
    for r, request in zip(records, requests):  # trailing space moves to the ending, as the harness does
        context, ending = request.args
        want.append(direct_logprob(model, tokenizer.encode(context.rstrip()),
                                   tokenizer.encode(context[len(context.rstrip()):] + ending)))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4)

    # rolling: a text longer than block_size in the harness's windows, every token predicted once, the first
    # from the start token; the reference scores each window alone, unbatched
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = " ".join(r["ctx"] for r in records)[:300]
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = tokenizer.encode(text)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tokenizer.eot_id, 64, 1)]
    assert len(windows) == 5 and [t for _, pred in windows for t in pred] == ids
    assert rolled == pytest.approx(sum(direct_logprob(model, c, x) for c, x in windows), rel=1e-5)


def test_eval_harness_prints_the_table_and_refuses_unknown_tasks(twin, tasks_dir, tmp_path):
    model, tokenizer, _ = twin
    ckpt = save_checkpoint(tmp_path / "model.safetensors", model, tokenizer)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    result = run_cli("eval.py", "--ckpt", ckpt, "--harness", "tiny_choice", "--harness-include", tasks_dir,
                     "--max", 4, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "Tasks" in lines[0] and "Metric" in lines[0] and "Stderr" in lines[0]
    cells = [[c.strip() for c in line.split("|")] for line in lines[2:] if line.startswith("|")]
    assert [row[1] for row in cells] == ["tiny_choice", ""] and [row[5] for row in cells] == ["acc", "acc_norm"]
    assert lines[-1] == ("acc_norm above: per-character (lm-evaluation-harness; its hellaswag prefixes the activity "
                         "label); eval.py --task's is per-token (build-nanogpt, llm.c)")
    result = run_cli("eval.py", "--ckpt", ckpt, "--harness", "no_such_task", "--harness-include", tasks_dir, env=env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "lm-evaluation-harness has no task 'no_such_task'" in result.stderr


def test_without_lm_eval_the_flag_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(harness, "LM", object)
    with pytest.raises(harness.HarnessError, match=r"pip install -e '.\[harness\]'"):
        harness.run_tasks(None, None, ["hellaswag"])
