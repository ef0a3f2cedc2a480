"""Multiple-choice scoring and HellaSwag: log-likelihoods equal to lm-evaluation-harness's HFLM on a small random
GPT-2 exported with export.py's code path, and to a direct model.forward computation on our own architectures;
the HellaSwag file's format checked line by line; the download resumable, verified and offline-explained;
eval.py --task hellaswag end to end."""

import dataclasses
import hashlib
import json
import random

import pytest
import torch

from conftest import TINY_TEXT, run_cli
from model import GPT, GPTConfig
from nanoforge import checkpoint, datasets, gpt2, hellaswag, multiple_choice
from nanoforge.multiple_choice import Example, TaskError
from nanoforge.tokenizer import ByteTokenizer, CharTokenizer
from test_architecture import OPTIONS
from test_gpt2 import random_gpt2, tiny_bpe

WORDS = TINY_TEXT.split()


def hellaswag_records(n, seed=0, long_every=0, ending_words=9):
    """n records in HellaSwag's format made of the tiny corpus's words (every long_every-th one with a
    context of a few hundred words, longer than the test models' block_size), endings of 1 to ending_words."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        length = 300 if long_every and i % long_every == 0 else rng.randint(3, 25)
        ctx = " ".join(rng.choice(WORDS) for _ in range(length))
        endings = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, ending_words))) for _ in range(4)]
        records.append({"ind": i, "activity_label": "Speaking", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                        "split": "val", "split_type": "indomain", "label": rng.randrange(4), "endings": endings,
                        "source_id": f"tiny~{i}"})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """(our model, its tokenizer, the directory export wrote): a random GPT-2 with a tiny byte-level BPE."""
    source, exported = tmp_path_factory.mktemp("hf_source"), tmp_path_factory.mktemp("exported") / "hf"
    random_gpt2().save_pretrained(source)
    tiny_bpe(source)
    model, tokenizer = gpt2.model_and_tokenizer(str(source))
    gpt2.export(model, str(exported), tokenizer)
    return model, tokenizer, exported


def test_log_likelihoods_and_accuracies_equal_lm_evals_hflm(twin, monkeypatch):
    """Every ending's summed log-likelihood equals HFLM's on the exported twin (contexts longer than
    block_size included: both keep the row's end), so acc and acc_norm are the same counts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, exported = twin
    examples = [hellaswag.parse_line(json.dumps(r), "test") for r in hellaswag_records(24, long_every=5)]
    assert max(len(tokenizer.encode(e.context)) for e in examples) > model.config.block_size
    scores = multiple_choice.score_examples(model, tokenizer, examples, batch_size=7)

    hf = HFLM(pretrained=str(exported), device="cpu", batch_size=5)
    theirs = [lp for lp, _ in hf.loglikelihood([Instance("loglikelihood", {}, (e.context, ending), 0)
                                                for e in examples for ending in e.endings], disable_tqdm=True)]
    ours = [lp for sums, _ in scores for lp in sums]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=1e-4)
    # acc_norm divides by the ending's token count; HFLM's tokenizer counts the same tokens
    their_counts = [len(hf.tok_encode(e.context + ending)) - len(hf.tok_encode(e.context))
                    for e in examples for ending in e.endings]
    assert [n for _, counts in scores for n in counts] == their_counts
    their_scores, i = [], 0
    for e in examples:
        their_scores.append((theirs[i : i + 4], their_counts[i : i + 4]))
        i += 4
    assert multiple_choice.count_correct(examples, scores) == multiple_choice.count_correct(examples, their_scores)


def direct_logprob(model, context_ids, continuation_ids):
    """The reference: one unbatched forward pass over the row's last block_size + 1 tokens."""
    row = (context_ids + continuation_ids)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([row[:-1]]))
    logprobs = logits[0].float().log_softmax(-1)[-len(continuation_ids):]
    return logprobs.gather(1, torch.tensor(row[-len(continuation_ids):])[:, None]).sum().item()


@pytest.mark.parametrize("name", ["rope", "rmsnorm", "qk_norm", "untied", "all"])
def test_batched_scores_equal_model_forward_on_our_architectures(name):
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    model = GPT(GPTConfig(block_size=24, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_embd=32,
                          **OPTIONS[name])).eval()
    rng = random.Random(1)
    pairs = [(tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) or "\n"),
              tokenizer.encode(" " + rng.choice(WORDS))) for _ in range(11)]
    got = multiple_choice.continuation_logprobs(model, pairs, batch_size=4)
    want = [direct_logprob(model, c, x) for c, x in pairs]
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got]), torch.tensor(want), rtol=1e-5, atol=1e-4)


def test_a_chat_model_reads_the_task_with_its_base_tokenizer(chat_ckpt):
    """A chat fine-tune is scored on plain text: its base tokenizer's ids, the chat tokens in the softmax."""
    from nanoforge import loading

    model, tokenizer = loading.load_model(str(chat_ckpt), "cpu")
    assert hasattr(tokenizer, "chat_ids")
    examples = [Example("hi", [" yo", " ok"], 0), Example("add 2 3", [" 5", " cba"], 0)]
    scores = multiple_choice.score_examples(model, tokenizer, examples)
    want = [direct_logprob(model, tokenizer.base.encode(e.context), tokenizer.base.encode(ending))
            for e in examples for ending in e.endings]
    assert [lp for sums, _ in scores for lp in sums] == pytest.approx(want, rel=1e-5)


def test_accuracy_counts_both_conventions_and_the_interval():
    examples = [Example("c", [" a", " b"], 0), Example("c", [" a", " b"], 1)]
    # example 1: ending 0 wins by sum (-2 > -3) but ending 1 per token (-3/3 > -2/1); example 2 likewise
    scores = [([-2.0, -3.0], [1, 3]), ([-2.0, -3.0], [1, 3])]
    assert multiple_choice.count_correct(examples, scores) == (1, 1)
    report = multiple_choice.results(29, 100, 100)
    assert report["acc"] == 0.29 and report["acc_norm"] == 1.0
    from scipy.stats import binomtest  # scipy comes with lm-eval, a dev dependency

    for k, name in ((29, "acc"), (100, "acc_norm")):
        reference = binomtest(k, 100).proportion_ci(0.95, method="wilson")
        assert report[f"{name}_ci95"] == pytest.approx([reference.low, reference.high], abs=1e-6)


def test_an_ending_longer_than_the_context_window_is_one_clear_error():
    model = GPT(GPTConfig(block_size=8, vocab_size=256, n_layer=1, n_head=2, n_embd=16)).eval()
    with pytest.raises(TaskError, match="an ending of 12 tokens does not fit the model's block_size 8"):
        multiple_choice.score_examples(model, ByteTokenizer(), [Example("ctx", [" x" * 6, " y"], 0)])


def test_a_vocabulary_that_cannot_hold_the_text_names_the_example():
    tokenizer = CharTokenizer.train("abc ")
    model = GPT(GPTConfig(block_size=8, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    with pytest.raises(TaskError, match="example 2: text contains 1 character.*'z'.*byte-level tokenizer"):
        multiple_choice.score_examples(model, tokenizer, [Example("ab", [" a", " b"], 0), Example("ab", [" z", " a"], 0)])


# ------------------------------------------------------------------------------------------ the file

@pytest.mark.parametrize("line, message", [
    ("not json", "line 2 is not JSON"),
    ('{"ctx": "a", "endings": ["b", "c"]}', "line 2 has no 'label' field"),
    ('{"endings": ["b", "c"], "label": 0}', "line 2 has no 'ctx' field"),
    ('{"ctx": "a", "endings": "b", "label": 0}', "line 2: 'endings' must be a list"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "line 2: 'label' must be the index of the right ending, 0 to 1"),
    ("[1, 2]", "line 2 is not a JSON object"),
])
def test_a_file_not_in_hellaswags_format_names_the_line_and_field(tmp_path, line, message):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(hellaswag_records(1)[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(TaskError, match=message):
        hellaswag.read_examples(str(path))


def test_records_read_as_completion_style_examples(tmp_path):
    records = hellaswag_records(5)
    examples = hellaswag.read_examples(str(write_jsonl(tmp_path / "h.jsonl", records)), limit=3)
    assert len(examples) == 3
    assert examples[1] == Example(records[1]["ctx"], [" " + e for e in records[1]["endings"]], records[1]["label"])


def test_download_resumes_verifies_and_is_cached(tmp_path, monkeypatch, http_server):
    body = "".join(json.dumps(r) + "\n" for r in hellaswag_records(3)).encode()
    blob = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
    served = []

    def respond(path, start):
        served.append((path, start))
        return (206, body[start:]) if start else (200, body)

    url = http_server(respond) + "/hellaswag_val.jsonl"
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", url)
    monkeypatch.setattr(hellaswag, "HELLASWAG_BLOB", blob)
    cache = tmp_path / "data" / "hellaswag"
    cache.mkdir(parents=True)
    (cache / "hellaswag_val.jsonl.part").write_bytes(body[:100])  # an interrupted download
    assert hellaswag.git_blob_id(hellaswag.download(str(cache))) == blob
    assert served == [("/hellaswag_val.jsonl", 100)]
    hellaswag.download(str(cache))  # the verified copy is reused: no second request
    assert len(served) == 1

    monkeypatch.setattr(hellaswag, "HELLASWAG_BLOB", "0" * 40)  # the server now sends another file
    with pytest.raises(TaskError, match="has git_blob_id .*, expected 0{40}: the file changed"):
        hellaswag.download(str(tmp_path / "other"))
    assert not list((tmp_path / "other").iterdir())  # nothing half-written is kept


def test_offline_download_says_how_to_pass_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")  # nothing listens
    with pytest.raises(TaskError, match=r"no network\?\): pass a local copy with --data FILE.jsonl"):
        hellaswag.download(str(tmp_path))


def test_git_blob_id_is_gits_own(tmp_path):
    """The pin is checked with the id `git hash-object` gives a file."""
    import subprocess

    path = write_jsonl(tmp_path / "h.jsonl", hellaswag_records(3))
    git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
    assert hellaswag.git_blob_id(str(path)) == git.stdout.strip()


# ------------------------------------------------------------------------------------------ eval.py

def save_checkpoint(path, model, tokenizer):
    info = {"model": dataclasses.asdict(model.config), "tokenizer": tokenizer.to_dict()}
    checkpoint.save(str(path), model.state_dict(), info)
    return path


def test_eval_task_hellaswag_on_a_checkpoint_and_a_gpt2_directory(twin, tmp_path):
    model, tokenizer, exported = twin
    data = write_jsonl(tmp_path / "h.jsonl", hellaswag_records(12, long_every=4))
    ckpt = save_checkpoint(tmp_path / "model.safetensors", model, tokenizer)
    expected = multiple_choice.evaluate(model, tokenizer, hellaswag.read_examples(str(data), 10), batch_size=16)
    outputs = []
    for source in (["--ckpt", ckpt], ["--init-from", exported]):
        result = run_cli("eval.py", *source, "--task", "hellaswag", "--data", data, "--max", 10, "--json")
        assert result.returncode == 0, result.stderr
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1] == {"task": "hellaswag", **expected}
    assert expected["n"] == 10

    result = run_cli("eval.py", "--ckpt", ckpt, "--task", "hellaswag", "--data", data)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("hellaswag acc ") and "(95 % CI " in lines[0] and "/12)" in lines[0]
    assert lines[1].startswith("hellaswag acc_norm ") and "GPT-2 124M: acc_norm 29.55 %" in lines[2]
    # which acc_norm: per token, as build-nanogpt and llm.c (lm-eval's is per character), in the table and JSON
    assert lines[1].endswith("/12, per-token (build-nanogpt, llm.c))")
    assert outputs[0]["acc_norm_convention"] == "per-token (build-nanogpt, llm.c)"


def test_eval_task_bad_input_is_one_line(tmp_path):
    tokenizer = CharTokenizer.train(TINY_TEXT)
    model = GPT(GPTConfig(block_size=16, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16))
    ckpt = save_checkpoint(tmp_path / "char.safetensors", model, tokenizer)
    records = hellaswag_records(2)
    records[1]["endings"][2] = "Ω"
    data = write_jsonl(tmp_path / "h.jsonl", records)
    result = run_cli("eval.py", "--ckpt", ckpt, "--task", "hellaswag", "--data", data)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "error: example 2: text contains 1 character" in result.stderr

    (tmp_path / "bad.jsonl").write_text('{"ctx": "a", "label": 0}\n', encoding="utf-8")
    result = run_cli("eval.py", "--ckpt", ckpt, "--task", "hellaswag", "--data", tmp_path / "bad.jsonl")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "bad.jsonl line 1 has no 'endings' field" in result.stderr
