"""Reinforcement learning from verifiable rewards: the loss against hand-computed values, what must not move the
weights, the KL term, masks, tasks and their held-out split, GSM8K's download, rl.py end to end with an exact
resume after SIGTERM, two gloo processes against one, and bad input as one line."""

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

from conftest import REPO, run_cli
from model import GPT, GPTConfig
from nanoforge import checkpoint, datasets, reinforce, tasks, training
from nanoforge.distributed import Distributed
from nanoforge.engine import Sample
from nanoforge.reinforce import (Rollouts, build_rl_config, group_advantages, kl_to_reference, pass_at_k,
                                 policy_loss, rollout_batch)
from nanoforge.runs import RunState
from nanoforge.tokenizer import CharTokenizer, with_chat_tokens
from nanoforge.training import TrainingStopped

TOKENIZER = with_chat_tokens(CharTokenizer(sorted(set("0123456789+-*/().,:? abcdefghijklmnopqrstuvwxyz"))))


def test_group_advantages_are_reward_minus_the_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # two groups of three
    assert group_advantages(rewards, 3).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    std = math.sqrt(1 / 3)  # the unbiased std of (1, 0, 0)
    assert group_advantages(rewards, 3, scale=True).tolist() == pytest.approx(
        [a / (std + 1e-6) for a in (2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3)])
    assert group_advantages(torch.ones(4), 2).tolist() == [0.0] * 4


def test_policy_loss_equals_the_hand_computed_value():
    # two rollouts, three target positions each; rollout 0 sampled 2 tokens, rollout 1 one token
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    advantages = torch.tensor([0.5, -0.5])
    loss = policy_loss(logp, logp.detach(), advantages, mask, 0.2, n_tokens=mask.sum())
    assert loss.item() == pytest.approx(-(0.5 + 0.5 - 0.5) / 3)  # ratio 1: -sum(mask * A) / tokens
    loss.backward()
    # REINFORCE's gradient, per token: -A / number of tokens, 0 off the mask
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5 / 3, -0.5 / 3, 0.0, 0.5 / 3, 0.0, 0.0])
    # a later update: ratios 1.5 are clipped to 1.2 where the advantage is positive, not where it is negative
    old = logp.detach() - math.log(1.5)
    clipped = policy_loss(logp.detach(), old, advantages, mask, 0.2, n_tokens=mask.sum())
    assert clipped.item() == pytest.approx((-1.2 * 0.5 - 1.2 * 0.5 + 1.5 * 0.5) / 3)


def test_kl_is_zero_against_itself_and_the_formula_otherwise():
    logits = torch.randn(2, 3, 5)
    mask = torch.ones(2, 3)
    assert kl_to_reference(logits, logits.clone(), mask, mask.sum()).item() == pytest.approx(0.0, abs=1e-7)
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    kl = kl_to_reference(p.log().view(1, 1, 2), q.log().view(1, 1, 2), torch.ones(1, 1), torch.tensor(1.0))
    assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))


def test_prompts_tool_outputs_and_padding_are_masked():
    chat, e = TOKENIZER.chat_ids, TOKENIZER.encode
    prompt = [chat["<|bos|>"], *e("q"), chat["<|assistant_start|>"]]
    ids = [chat["<|python_start|>"], *e("1+1"), chat["<|python_end|>"], chat["<|output_start|>"], *e("2"),
           chat["<|output_end|>"], *e("2"), chat["<|assistant_end|>"]]
    forced = [False] * 5 + [True] * 3 + [False] * 2
    short = Sample(prompt, e("2") + [chat["<|assistant_end|>"]], "2", "end", [False, False])
    rollouts = Rollouts([prompt, prompt], [Sample(prompt, ids, "", "end", forced), short], torch.zeros(2), [])
    x, y, mask = rollout_batch(rollouts, "cpu")
    assert x.shape == y.shape == mask.shape == (2, len(prompt) + len(ids) - 1)
    assert y[0].tolist() == (prompt + ids)[1:]
    assert mask[0].tolist() == [0, 0] + [0.0 if f else 1.0 for f in forced]  # the prompt's targets, then the reply's
    assert mask[1].tolist() == [0, 0, 1, 1] + [0] * (len(ids) - 2)


def tiny_chat_checkpoint(path, with_chat=True):
    tokenizer = TOKENIZER if with_chat else TOKENIZER.base
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=40, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16))
    info = {"model": dataclasses.asdict(model.config), "tokenizer": tokenizer.to_dict()}
    checkpoint.save(str(path), model.state_dict(), info)
    return str(path)


def tiny_rl_config(ckpt, out_dir, **extra):
    settings = dict(init_from=ckpt, out_dir=str(out_dir), max_iters=4, prompts_per_step=2, samples_per_prompt=3,
                    max_new_tokens=10, eval_interval=2, eval_problems=3, pass_k=2, checkpoint_interval=2,
                    learning_rate=1e-2, warmup_iters=0, device="cpu", dtype="float32", **extra)
    return build_rl_config(None, [f"--{k}={v}" for k, v in settings.items()])


def fake_rollouts(seed, groups=4, group_size=3):
    """Rollouts of random replies (some with a fed tool output) and 0/1 rewards, the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    chat = TOKENIZER.chat_ids
    prompts, samples = [], []
    for _ in range(groups * group_size):
        prompt = [chat["<|bos|>"], *torch.randint(0, 20, (4,), generator=g).tolist(), chat["<|assistant_start|>"]]
        n = int(torch.randint(3, 9, (), generator=g))
        ids = torch.randint(0, 20, (n,), generator=g).tolist()
        forced = [bool(i % 4 == 2) for i in range(n)]
        prompts.append(prompt)
        samples.append(Sample(prompt, ids, "", "end", forced))
    rewards = torch.randint(0, 2, (groups * group_size,), generator=g).float()
    return Rollouts(prompts, samples, rewards, [])


def tiny_policy(cfg):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=40, vocab_size=TOKENIZER.vocab_size, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.1)
    return model, optimizer, torch.amp.GradScaler("cuda", enabled=False), RunState.start(cfg, torch.device("cpu"))


def test_learning_rate_zero_or_equal_rewards_leave_the_weights_alone(tmp_path):
    cfg = tiny_rl_config("unused", tmp_path, kl_beta=0.0)
    model, optimizer, scaler, state = tiny_policy(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rollouts = fake_rollouts(0)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    reinforce.update_policy(model, None, optimizer, scaler, rollouts, cfg, Distributed(), state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    rollouts.rewards.fill_(1.0)  # every group all right: no sample is better than its baseline
    x, y, mask = rollout_batch(rollouts, "cpu")
    logits, _ = model(x)
    logp = reinforce.target_logprobs(logits, y)
    policy_loss(logp, logp.detach(), group_advantages(rollouts.rewards, 3), mask, 0.2, mask.sum()).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_an_update_moves_the_weights_towards_rewarded_tokens(tmp_path):
    cfg = tiny_rl_config("unused", tmp_path, updates_per_batch=2, kl_beta=0.1)
    model, optimizer, scaler, state = tiny_policy(cfg)
    reference, *_ = tiny_policy(cfg)
    rollouts = fake_rollouts(1)
    x, y, mask = rollout_batch(rollouts, "cpu")
    advantages = group_advantages(rollouts.rewards, 3)

    def score():  # sum of advantage-weighted log-probabilities: what the update increases
        with torch.no_grad():
            return (reinforce.target_logprobs(model(x)[0], y) * mask * advantages.unsqueeze(1)).sum().item()

    start = score()
    stats, bad = reinforce.update_policy(model, reference, optimizer, scaler, rollouts, cfg, Distributed(), state)
    assert bad == 0 and state.window_steps == 2 and score() > start
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6) and stats["entropy"] > 0  # measured before the updates


def run_two_processes(rank, tmp, port):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ddp = Distributed()
    ddp.start(torch.device("cpu"))
    cfg = tiny_rl_config("unused", tmp)
    model, optimizer, scaler, state = tiny_policy(cfg)
    rollouts = fake_rollouts(2)
    rows = slice(rank * 6, rank * 6 + 6)  # this process's two problems of the four, three samples each
    share = Rollouts(rollouts.prompts[rows], rollouts.samples[rows], rollouts.rewards[rows], [])
    reinforce.update_policy(model, None, optimizer, scaler, share, cfg, ddp, state)
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(tmp, "two.pt"))
    ddp.close()


def test_two_gloo_processes_update_as_one_process_on_the_same_rollouts(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_two_processes, args=(str(tmp_path), port), nprocs=2)
    cfg = tiny_rl_config("unused", tmp_path)
    model, optimizer, scaler, state = tiny_policy(cfg)
    reinforce.update_policy(model, None, optimizer, scaler, fake_rollouts(2), cfg, Distributed(), state)
    two = torch.load(tmp_path / "two.pt")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-6)


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in ((10, 3, 1), (10, 3, 4), (5, 0, 2), (5, 5, 5), (8, 7, 3)):
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_held_out_problems_never_reach_training():
    task = tasks.Addition()
    test = task.problems("test", 50, tasks.TEST_SEED)
    train = task.problems("train", 500, 0)
    assert all(task.held_out(p) for p in test) and not any(task.held_out(p) for p in train)
    assert test == task.problems("test", 50, tasks.TEST_SEED)  # the same held-out problems every time
    held = {p.prompt for p in test}
    sft_train, sft_val = tasks.arithmetic_conversations(2000, 50)
    prompts = [m[0]["content"] for m in sft_train + sft_val]
    assert not held & set(prompts) and not any(task.held_out(tasks.Problem(p, "")) for p in prompts)
    assert sum(isinstance(m[1]["content"], list) for m in sft_train) == pytest.approx(1000, abs=100)  # half call the tool
    assert tasks.Multiplication().reward(tasks.Problem("what is 12 * 12?", "144"), " 144 ") == 1.0


def test_gsm8k_answers_after_the_marks_and_downloads_resumably(tmp_path, monkeypatch, http_server):
    task = tasks.GSM8K(None)  # its reward needs no file
    problem = tasks.Problem("q", "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 1,007")
    assert task.reward(problem, "so #### 1007") == 1.0 and task.reward(problem, "#### 1006") == 0.0
    assert task.reward(problem, "1007") == 0.0  # the answer is what follows ####

    body = (json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n").encode()
    served = []

    def respond(path, start):
        served.append((path, start))
        return (206, body[start:]) if start else (200, body)

    url = http_server(respond) + "/"
    digest = datasets.hashlib.sha256(body).hexdigest()
    monkeypatch.setattr(datasets, "GSM8K_URL", url)
    monkeypatch.setattr(datasets, "GSM8K_SHA256", {"train.jsonl": digest, "test.jsonl": digest})
    (tmp_path / "train.jsonl.part").write_bytes(body[:10])  # an interrupted download
    train, test = datasets.gsm8k_files(str(tmp_path))
    assert served == [("/train.jsonl", 10), ("/test.jsonl", None)]
    gsm8k = tasks.get_task("gsm8k", download_dir=str(tmp_path))
    assert gsm8k.problems("test", 1, 0) == [tasks.Problem("1+1?", "#### 2")] and len(served) == 2  # cached
    monkeypatch.setattr(datasets, "GSM8K_URL", "http://127.0.0.1:9/")  # nothing listens there
    with pytest.raises(datasets.DownloadError, match=r"pass a local copy of a GSM8K JSONL file \(eval.py --data"):
        datasets.gsm8k_files(str(tmp_path / "offline"))
    # one local file: a tenth of it held out, as every task's problems are
    local = tmp_path / "local.jsonl"
    local.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(60)))
    own = tasks.get_task("gsm8k", str(local))
    test, train = own.problems("test", 2, 0), own.problems("train", 100, 0)
    assert all(own.held_out(p) for p in test) and not any(own.held_out(p) for p in train)
    assert len(test) == 2 and 40 < len(train) < 60  # every training problem the file has, none held out


def test_rewards_that_raise_or_are_not_numbers_are_one_line_errors():
    class Broken(tasks.Addition):
        def reward(self, problem, completion):
            return float("nan") if completion == "nan" else 1 / 0

    problem = tasks.Problem("what is 1 + 1?", "2")
    with pytest.raises(tasks.TaskError, match="reward returned nan .*must be a finite number"):
        tasks.checked_reward(Broken(), problem, "nan")
    with pytest.raises(tasks.TaskError, match="reward raised ZeroDivisionError"):
        tasks.checked_reward(Broken(), problem, "2")


def read_log(out_dir):
    drop = ("elapsed_s", "tokens_per_sec")  # timings differ between runs
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in open(out_dir / "log.jsonl")]


def test_rl_resumes_after_sigterm_exactly(tmp_path, monkeypatch):
    from rl import rl

    ckpt = tiny_chat_checkpoint(tmp_path / "chat.safetensors")
    rl(tiny_rl_config(ckpt, tmp_path / "straight"))
    real_get_lr = training.get_lr

    def get_lr(step, cfg):
        if step == 2:  # the third step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_lr(step, cfg)

    with monkeypatch.context() as m:
        m.setattr(training, "get_lr", get_lr)
        with pytest.raises(TrainingStopped, match="SIGTERM at step 3.*--resume"):
            rl(tiny_rl_config(ckpt, tmp_path / "resumed"))
    rl(tiny_rl_config(ckpt, tmp_path / "resumed"), resume=True)
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [0, 1, 2, 3, 4]
    assert {"pass@1", "pass@2", "reward_mean", "completion_len", "entropy", "loss"} <= set(straight[2])
    assert straight == resumed
    a = checkpoint.load(tmp_path / "straight" / "latest.safetensors")
    b = checkpoint.load(tmp_path / "resumed" / "latest.safetensors")
    assert all(torch.equal(t, b.model_state[name]) for name, t in a.model_state.items())

    import plot  # the run's rewards, pass@k, length, entropy drawn from its log

    plot.main(["--ckpt", str(tmp_path / "resumed"), "--png", str(tmp_path / "rl.png"), "--x", "time"])
    assert (tmp_path / "rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="rl.py run, which has no fixed tokens per step|plot RL runs with --x step"):
        plot.main(["--ckpt", str(tmp_path / "resumed"), "--png", str(tmp_path / "no.png"), "--x", "tokens"])


def test_rl_cli_runs_and_bad_input_is_one_line(tmp_path, capsys):
    ckpt = tiny_chat_checkpoint(tmp_path / "chat.safetensors")
    plain = tiny_chat_checkpoint(tmp_path / "plain.safetensors", with_chat=False)
    common = [f"--init_from={ckpt}", "--max_iters=1", "--prompts_per_step=1", "--samples_per_prompt=2",
              "--max_new_tokens=4", "--eval_problems=2", "--pass_k=1", "--device=cpu"]
    done = run_cli("rl.py", *common, f"--out_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    assert "eval.py --ckpt" in done.stdout and len(read_log(tmp_path / "run")) == 2
    result = run_cli("rl.py", *common, f"--out_dir={tmp_path / 'bad'}", "--task=division")
    assert result.returncode == 1 and result.stderr == ("rl.py: error: unknown task 'division': choose one of "
                                                        "addition, multiplication, chat_tasks, gsm8k\n")
    from rl import main  # the same runner, in this process: quicker

    for args, message in (
            (["--samples_per_prompt=1"], "samples_per_prompt must be at least 2"),
            (["--block_size=64"], "config key 'block_size' on the command line is train.py's, not rl.py's"),
            (["--tools=maybe"], "config key 'tools' expects bool, got 'maybe'"),
            (["--kl_beta=lots"], "config key 'kl_beta' expects float, got 'lots'"),
            (["--max_new_tokens=30"], "does not fit the model's block_size 40: use max_new_tokens <= "),
            ([f"--init_from={plain}"], "has no chat tokens, so it cannot chat")):
        with pytest.raises(SystemExit) as exit:
            main([*common, f"--out_dir={tmp_path / 'bad'}", *args])
        assert str(exit.value.code).startswith("rl.py: error: ") and message in str(exit.value.code)
        assert "\n" not in str(exit.value.code)
    assert not (tmp_path / "bad" / "log.jsonl").exists()
    capsys.readouterr()
    main(["--help"])  # every key with its type
    listed = capsys.readouterr().out
    assert "--kl_beta" in listed and " float " in listed and "--tools" in listed


def test_eval_scores_a_task_with_and_without_the_tool(tmp_path, capsys):
    import eval as eval_command

    ckpt = tiny_chat_checkpoint(tmp_path / "chat.safetensors")
    eval_command.main(["--ckpt", ckpt, "--task", "addition", "--max", "3", "--samples", "2", "--max-new-tokens", "4",
                       "--device", "cpu", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert results["task"] == "addition" and results["n"] == 3
    assert set(results["with_tool"]) == set(results["without_tool"]) == {"pass@1", "pass@2"}
    with pytest.raises(SystemExit, match="--samples must be at least 1"):
        eval_command.main(["--ckpt", ckpt, "--task", "addition", "--samples", "0"])
