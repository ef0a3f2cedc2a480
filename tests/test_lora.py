"""LoRA (nanoforge/lora.py): equal to Hugging Face PEFT's LoRA on the same GPT-2 base and adapter weights, for
each target set; merged equals unmerged; a fresh adapter changes nothing; training moves only the adapters (no
optimizer state for the frozen base, its weights bitwise unchanged); the configs run end to end from the command
line, resume exactly, and every command loads the small adapter checkpoint; a missing or changed base is one
line and a non-zero exit."""

import dataclasses
import json
import math
import os
import shutil
import subprocess

import peft
import pytest
import torch

from nanoforge import checkpoint, gpt2, loading, lora
from nanoforge import preparation as prepare
from nanoforge.config import ConfigError, build_config
from nanoforge.data import Dataset
from nanoforge.runs import start_model
from nanoforge.tokenizer import CHAT_TOKENS
from nanoforge.distributed import Distributed
from nanoforge.training import TrainingStopped, apply_update, train_step
from conftest import REPO, TINY_TEXT, run_cli, tiny_config, train_chat_base
from test_gpt2 import random_gpt2, tiny_bpe
from test_robustness import interrupt_at, losses, read_log
from train import train

TARGET_SETS = [("attn.c_attn",), ("attn.c_proj", "mlp.c_fc"), ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@dataclasses.dataclass
class LoraKeys:  # the config keys add_adapters reads
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"


class PlainTokenizer:  # no chat tokens: no new embedding rows
    pass


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random GPT-2 saved as a Hugging Face directory, with its byte-level BPE."""
    directory = tmp_path_factory.mktemp("hf_gpt2")
    tiny_bpe(directory)
    vocab = json.loads((directory / "vocab.json").read_text())
    random_gpt2(vocab_size=len(vocab)).save_pretrained(directory)
    return directory


def random_adapters(model, seed):
    """Give every adapter random A and B (B nonzero, so the adapters change the logits)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("targets", TARGET_SETS, ids=["qkv", "out+up", "all"])
def test_logits_equal_peft_lora_on_the_same_gpt2_base_and_adapters(hf_dir, targets):
    import transformers

    keys = LoraKeys(lora_rank=4, lora_alpha=12.0, lora_targets=",".join(targets))
    ours = lora.add_adapters(gpt2.from_pretrained(str(hf_dir)).eval(), keys, PlainTokenizer())
    random_adapters(ours, seed=len(targets))
    reference = peft.get_peft_model(
        transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval(),
        peft.LoraConfig(r=4, lora_alpha=12.0, lora_dropout=0.0, target_modules=list(targets), fan_in_fan_out=True))
    # PEFT's names: ...h.0.attn.c_attn.lora_A.default.weight (r, in), lora_B.default.weight (out, r), as ours
    theirs = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p
              for n, p in reference.named_parameters() if "lora_" in n}
    own = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(theirs) == set(own) and len(own) == 2 * 2 * len(targets)  # 2 layers, A and B each
    with torch.no_grad():
        for name, p in own.items():
            theirs[name].copy_(p)
    tokens = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits
        got, _ = ours(tokens)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()(tokens).logits
        assert (got - base).abs().max() > 1e-2  # the adapters do change the logits
        # merged: one matrix per layer, a plain GPT again, the same logits
        merged = lora.merge(ours)
        assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(tokens)[0], expected, rtol=1e-4, atol=1e-4)  # summed in another order


def test_a_fresh_adapter_leaves_the_logits_unchanged_and_starts_a_as_peft_does(hf_dir):
    base = gpt2.from_pretrained(str(hf_dir)).eval()
    tokens = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, _ = base(tokens)
        adapted = lora.add_adapters(base, LoraKeys(lora_rank=8), PlainTokenizer())
        after, _ = adapted(tokens)
    assert torch.equal(before, after)
    # kaiming_uniform with a = sqrt(5) is uniform on +-sqrt(6 / ((1 + 5) * fan_in)) = +-1 / sqrt(fan_in)
    layer = adapted.transformer.h[0].mlp.c_fc
    bound = 1 / math.sqrt(layer.in_features)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.95 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chat_tokens_rows_train_from_zero_and_merge_into_the_embedding(tied):
    from model import GPT, GPTConfig
    from nanoforge.tokenizer import CharTokenizer, with_chat_tokens

    tokenizer = with_chat_tokens(CharTokenizer.train("abcdefgh"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=8,
                          tie_embeddings=tied)).eval()
    tokens = torch.arange(tokenizer.vocab_size - 8, tokenizer.vocab_size).view(1, 8)  # chat tokens among them
    with torch.no_grad():
        before, _ = model(tokens)
        lora.add_adapters(model, LoraKeys(lora_rank=2), tokenizer)
        assert torch.equal(model(tokens)[0], before)  # the new rows start at zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = ["transformer.wte.new_rows.delta"] + ([] if tied else ["lm_head.new_rows.delta"])
    assert set(trainable) - {n for n in trainable if "lora_" in n} == set(rows)
    random_adapters(model, seed=5)
    with torch.no_grad():
        adapted, _ = model(tokens)
        merged = lora.merge(model)
        torch.testing.assert_close(merged(tokens)[0], adapted, rtol=1e-5, atol=1e-5)
    assert (merged.lm_head.weight is merged.transformer.wte.weight) == tied


def test_a_bfloat16_frozen_base_computes_what_autocast_does_and_keeps_float32_adapters(hf_dir):
    """What a CUDA bfloat16 run does (runs.start_model calls freeze_base there), here under the CPU's autocast:
    autocast rounds each float32 weight to bfloat16 for its matmul anyway, so storing the frozen ones rounded
    changes no logit, and halves their memory."""
    model = lora.add_adapters(gpt2.from_pretrained(str(hf_dir)), LoraKeys(lora_rank=4), PlainTokenizer())
    random_adapters(model, seed=3)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference, _ = model(tokens)
    lora.freeze_base(model, torch.bfloat16)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert model.transformer.wte.weight.dtype == torch.float32  # the residual stream starts in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(tokens, tokens)
    loss.backward()
    assert torch.equal(logits, reference)
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    assert layer.weight.grad is None


# ------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny char model trained a few steps, and the built-in chat tasks prepared with its tokenizer."""
    root = tmp_path_factory.mktemp("base")
    train_chat_base(root)
    prepare.prepare("chat_tasks", out_dir=str(root / "tasks"), tokenizer_from=str(root / "run"))
    return root


def test_training_moves_only_the_adapters_and_keeps_no_optimizer_state_for_the_base(base_run, tmp_path):
    cfg = tiny_config(base_run / "tasks", tmp_path / "run", init_from=str(base_run / "run"), block_size=24,
                      lora_rank=4, learning_rate=1e-2, warmup_iters=0, weight_decay=0.1)
    data = Dataset(cfg.data_dir, cfg.block_size)
    ddp, device = Distributed(), torch.device("cpu")
    model, cfg, optimizer, scaler, state = start_model(cfg, False, ddp, device, torch.float32, data)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # adapters on the 4 linear layers of 2 blocks, and the chat tokens' rows (the lm_head is tied: one set)
    assert len(trainable) == 2 * 4 * 2 + 1
    assert trainable["transformer.wte.new_rows.delta"].shape == (len(CHAT_TOKENS), 32)

    def batch():
        x, y = data.get_batch("train", cfg.batch_size, state.batches)
        return x, y

    for _ in range(3):
        loss = train_step(model, optimizer, scaler, batch, 1, torch.autocast("cpu", enabled=False), ddp)
        assert apply_update(model, optimizer, scaler, loss, cfg, state)
        optimizer.zero_grad(set_to_none=True)
    named = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(named[name], before), name  # bitwise, weight decay and all
    assert all(not torch.equal(named[n], before) for n, before in trainable.items())
    moments = [s for s in optimizer.state.values()]
    assert len(moments) == len(trainable)
    assert sum(s["exp_avg"].numel() for s in moments) == sum(p.numel() for p in trainable.values())


def test_interrupted_and_resumed_lora_run_equals_straight_run_bitwise(base_run, tmp_path, monkeypatch):
    settings = dict(init_from=str(base_run / "run"), block_size=24, max_iters=8, eval_interval=4, log_interval=2,
                    checkpoint_interval=4, lora_rank=4, lora_dropout=0.1, learning_rate=1e-2)
    train(tiny_config(base_run / "tasks", tmp_path / "straight", **settings))
    resumed = tiny_config(base_run / "tasks", tmp_path / "resumed", **settings)
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        with pytest.raises(TrainingStopped):
            train(resumed)
    train(resumed, resume=True)
    a = checkpoint.load(tmp_path / "straight" / "latest.safetensors")
    b = checkpoint.load(tmp_path / "resumed" / "latest.safetensors")
    assert set(a.model_state) == set(b.model_state) and len(a.model_state) == 17  # adapters only
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name
    assert losses(read_log(tmp_path / "straight")) == losses(read_log(tmp_path / "resumed"))
    assert a.info["lora_base"]["path"] == str((base_run / "run" / "best.safetensors").resolve())  # named, with its hash


def test_lora_keys_are_checked_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="init_from is 'scratch'"):
        build_config(overrides=["--lora_rank=4"])
    with pytest.raises(ConfigError, match="lora_targets must name some of attn.c_attn"):
        build_config(overrides=["--lora_rank=4", "--init_from=gpt2", "--lora_targets=attn.c_attn,mlp.fc"])
    with pytest.raises(ConfigError, match="AdamW"):
        build_config(overrides=["--lora_rank=4", "--init_from=gpt2", "--optimizer=muon"])


# ------------------------------------------------------------------------------------ end to end

def error_lines(result):
    """stderr's lines saying an error (notes on the machine and the data may come before)."""
    return [line for line in result.stderr.strip().splitlines() if "error" in line or "Traceback" in line]


def test_sft_lora_config_trains_samples_exports_and_merges_from_the_command_line(base_run, tmp_path):
    run, base = tmp_path / "sft", shutil.copytree(base_run / "run", tmp_path / "base")
    result = run_cli("train.py", os.path.join(REPO, "configs/sft_quickstart_lora.toml"), f"--init_from={base}",
                     f"--data_dir={base_run / 'tasks'}", f"--out_dir={run}", "--block_size=24", "--batch_size=8",
                     "--max_iters=30", "--eval_interval=30", "--checkpoint_interval=30", "--eval_iters=2",
                     "--warmup_iters=0", "--log_interval=10")
    assert result.returncode == 0, result.stderr
    log = read_log(run)
    assert log[-1]["val_loss"] < log[0]["loss"]
    # small: the adapters and the chat rows, not the model
    assert os.path.getsize(run / "latest.safetensors") < 0.6 * os.path.getsize(base / "latest.safetensors")
    result = run_cli("sample.py", "--ckpt", run, "--chat", "--prompt", "reverse abc", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    result = run_cli("eval.py", "--ckpt", run, "--data", base_run / "tasks", "--max", "4")
    assert result.returncode == 0 and "loss" in result.stdout, result.stderr
    # --merge: one self-contained checkpoint, equal to the adapters on their base
    merged = tmp_path / "merged.safetensors"
    result = run_cli("export.py", "--ckpt", run, "--merge", "--out", merged)
    assert result.returncode == 0, result.stderr
    adapted, tokenizer = loading.load_model(str(run), "cpu")
    plain, _ = loading.load_model(str(merged), "cpu")
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(adapted(tokens)[0], plain(tokens)[0])
    # a changed base, then a missing one: one line naming it and a non-zero exit, for sampling and resuming
    base_file = checkpoint.checkpoint_path(str(base))
    ckpt = checkpoint.load(base_file)
    ckpt.model_state["transformer.ln_f.weight"] += 1
    checkpoint.save(base_file, ckpt.model_state, ckpt.info)
    result = run_cli("sample.py", "--ckpt", run, "--prompt", "a")
    assert result.returncode != 0 and "has changed since the adapters were trained" in result.stderr
    assert len(error_lines(result)) == 1, result.stderr
    saved = json.loads((run / "config.json").read_text())
    resume = build_config(overrides=[f"--out_dir={run}", "--max_iters=40"], base=saved)
    with pytest.raises(checkpoint.CheckpointError, match="has changed since the adapters were trained"):
        train(resume, resume=True)
    shutil.rmtree(base)
    result = run_cli("eval.py", "--ckpt", run, "--data", base_run / "tasks", "--max", "4")
    assert result.returncode != 0 and "is missing or unreadable" in result.stderr
    assert len(error_lines(result)) == 1, result.stderr
    with torch.no_grad():  # the merged checkpoint needs no base
        assert torch.equal(loading.load_model(str(merged), "cpu")[0](tokens)[0], adapted(tokens)[0])


def test_finetune_lora_config_runs_on_a_gpt2_directory_and_exports_to_hugging_face(hf_dir, tmp_path):
    import transformers

    (tmp_path / "corpus.txt").write_text(TINY_TEXT)
    prepare.prepare(str(tmp_path / "corpus.txt"), out_dir=str(tmp_path / "data"), val_fraction=0.1,
                    tokenizer_from=str(hf_dir))
    run = tmp_path / "run"
    train(build_config(os.path.join(REPO, "configs/finetune_shakespeare_lora.toml"), [
        f"--init_from={hf_dir}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={run}", "--block_size=32",
        "--gradient_accumulation_steps=2", "--batch_size=4", "--max_iters=6", "--eval_interval=6", "--eval_iters=2",
        "--device=cpu", "--dtype=float32", "--learning_rate=3e-2"]))
    log = read_log(run)
    assert log[-1]["val_loss"] < log[0]["loss"]
    result = run_cli("export.py", "--ckpt", run, "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    ours, tokenizer = loading.load_model(str(run), "cpu")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, tokenizer.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens)[0], rtol=1e-5, atol=1e-5)
        base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()(tokens).logits
        assert (base - theirs(tokens).logits).abs().max() > 1e-3  # the adapters are in it


def test_lora_under_ddp_and_fsdp_trains_as_one_process_on_the_same_global_batch(base_run, tmp_path):
    from test_fsdp import ENV, assert_close_losses, one_process, torchrun, training_losses

    args = [f"--init_from={base_run / 'run'}", f"--data_dir={base_run / 'data'}", "--block_size=16", "--batch_size=4",
            "--gradient_accumulation_steps=4", "--max_iters=6", "--eval_interval=6", "--eval_iters=2",
            "--log_interval=1", "--dropout=0.0", "--device=cpu", "--lora_rank=4", "--learning_rate=1e-2",
            "--grad_clip=0.1"]
    runs = {"one": one_process(*args, f"--out_dir={tmp_path / 'one'}"),
            "ddp": torchrun(*args, f"--out_dir={tmp_path / 'ddp'}"),
            "fsdp": torchrun(*args, "--parallel=fsdp", f"--out_dir={tmp_path / 'fsdp'}")}
    for name, command in runs.items():
        result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (name, result.stderr[-3000:])
    one = checkpoint.load(tmp_path / "one" / "latest.safetensors")
    assert len(one.model_state) == 2 * 4 * 2  # adapters only: char data adds no tokens
    for name in ("ddp", "fsdp"):
        assert_close_losses(training_losses(tmp_path / name), training_losses(tmp_path / "one"))
        other = checkpoint.load(tmp_path / name / "latest.safetensors")
        assert other.model_state.keys() == one.model_state.keys()
        for key, tensor in one.model_state.items():
            torch.testing.assert_close(other.model_state[key], tensor, rtol=1e-4, atol=1e-6)
