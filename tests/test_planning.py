"""train.py --plan: its weight, gradient and optimizer-state bytes against a real model and optimizer, its
activation estimate against what autograd saves, FSDP's per-device share, the fit verdict, and the command end to
end (it prints, and writes nothing)."""

import dataclasses
from contextlib import nullcontext

import pytest
import torch
from conftest import run_cli, tiny_config

from model import GPT, GPTConfig, padded_vocab_size
from nanoforge import planning
from nanoforge.config import build_config
from nanoforge.data import read_meta
from nanoforge.optim import Muon, build_optimizer
from nanoforge.sizing import parameter_count

ARCHITECTURES = [
    dict(optimizer="adamw", tie_embeddings=True, pos_emb="learned"),
    dict(optimizer="adamw", tie_embeddings=False, pos_emb="rope"),
    dict(optimizer="muon", tie_embeddings=True, pos_emb="rope"),
    dict(optimizer="muon", tie_embeddings=False, pos_emb="learned", mlp="swiglu", n_kv_head=1, qk_norm=True),
]


def real_bytes(cfg, vocab_size):
    """(weights and buffers, gradients, optimizer state) of a real model and optimizer after one step."""
    torch.manual_seed(0)
    model = GPT(cfg.model_config(vocab_size))
    optimizer = build_optimizer(model, cfg, "cpu")
    x = torch.randint(0, vocab_size, (2, cfg.block_size))
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    weights = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    gradients = sum(p.grad.nbytes for p in model.parameters())
    state = optimizer.state_dict()["state"]
    optimizer_state = sum(t.nbytes for s in state.values() for t in s.values() if torch.is_tensor(t))
    return weights, gradients, optimizer_state


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: "-".join(str(v) for v in a.values()))
def test_weights_gradients_and_optimizer_state_are_those_of_a_real_run(tmp_path, data_dir, arch):
    cfg = tiny_config(data_dir, tmp_path / "run", **arch)
    model, _ = planning.meta_model(cfg)
    assert next(model.parameters()).device.type == "meta"  # nothing allocated
    vocab_size = padded_vocab_size(read_meta(str(data_dir))["vocab_size"], cfg.vocab_multiple)
    single = planning.memory(model, cfg, 4, "ddp", 1)
    assert (single.weights, single.gradients, single.optimizer) == real_bytes(cfg, vocab_size)


def saved_bytes(config, batch, dtype):
    """The bytes of the tensors autograd saves in one forward (the parameters and buffers left out)."""
    torch.manual_seed(0)
    model = GPT(config)
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x, y = (torch.randint(0, config.vocab_size, (batch, config.block_size)) for _ in range(2))
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x, y)
    return sum(kept.values())


@pytest.mark.filterwarnings("ignore:Mismatch dtype")  # CPU's rms_norm under autocast: the composite path, on purpose
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", [{}, dict(norm="rmsnorm", mlp="swiglu", n_kv_head=1), dict(pos_emb="rope"),
                                  dict(qk_norm=True, mlp="relu2", logit_softcap=10.0)], ids=str)
def test_the_activation_estimate_is_what_autograd_saves(arch, dtype):
    """Per token, measured as differences (two depths, two batch sizes) so that what does not grow with the
    tokens (autocast's weight copies, rope's tables) cancels out."""
    T = 16
    shapes = dict(n_head=2, n_embd=32, block_size=T, vocab_size=96, **arch)
    saved = {(n_layer, batch): saved_bytes(GPTConfig(n_layer=n_layer, **shapes), batch, dtype)
             for n_layer in (1, 2) for batch in (2, 4)}
    block = ((saved[2, 4] - saved[1, 4]) - (saved[2, 2] - saved[1, 2])) / (2 * T)
    outside = (saved[1, 4] - saved[1, 2]) / (2 * T) - block
    d = torch.empty((), dtype=dtype).element_size()
    assert (block, outside) == planning.activation_bytes_per_token(GPTConfig(**shapes), d)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_holds_a_world_size_share_plus_the_gathered_blocks(tmp_path, data_dir, optimizer):
    # every dim 0 (32, 96, 128, 16, and the vocabulary padded to 64) divides by 8: no padding to account for
    cfg = tiny_config(data_dir, tmp_path / "run", optimizer=optimizer, vocab_multiple=64, pos_emb="rope")
    model, _ = planning.meta_model(cfg)
    ddp = planning.memory(model, cfg, 2, "ddp", 2)
    buffers = sum(b.nbytes for b in model.buffers())  # rope's tables: not sharded
    built = build_optimizer(model, cfg, "cpu")
    adamw_params = sum(len(g["params"]) for opt in getattr(built, "optimizers", (built,)) if not isinstance(opt, Muon)
                       for g in opt.param_groups)  # each has a float32 step that every process keeps
    step_bytes = planning.ADAMW_STEP_BYTES * adamw_params
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - cfg.n_layer * block
    for world in (2, 4, 8):
        fsdp = planning.memory(model, cfg, 2, "fsdp", world)
        assert fsdp.weights == (ddp.weights - buffers) / world + buffers
        assert fsdp.gradients == ddp.gradients / world
        assert fsdp.optimizer == (ddp.optimizer - step_bytes) / world + step_bytes
        # the stated extra: root and two blocks gathered in bfloat16, one block's float32 gradients
        assert fsdp.copies == (root + 2 * block) * 2 + block * 4
        assert fsdp.activations == ddp.activations and fsdp.buckets == 0
    assert ddp.buckets == ddp.gradients  # DDP's flat copy of the gradients
    # one process does not shard (sharding.sharded): under either mode it runs plain
    assert planning.memory(model, cfg, 2, "fsdp", 1) == planning.memory(model, cfg, 2, "ddp", 1)
    assert ddp.copies == planning.linear_weight_bytes(model) // 2  # autocast's bfloat16 weight cache


@pytest.mark.parametrize("world", [2, 8])
def test_fsdp_shards_are_what_fully_shard_gives_a_process(world):
    """FSDP2's own sharding, on the meta device under torch's fake process group (one process standing for rank
    0 of `world`): its local shards hold what planning counts, padding of uneven rows included (36 and 65 rows
    do not divide by 8; rank 0 holds the ceil, the most any process holds)."""
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        with torch.device("meta"):
            model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=36, block_size=16, vocab_size=65, pos_emb="rope"))
        planned = planning.weight_bytes(model, world), planning.gradient_bytes(model, world)
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        local = sum(p.to_local().nbytes for p in model.parameters())
        assert planned == (local + sum(b.nbytes for b in model.buffers()), local)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_with_accumulation_holds_what_fully_shard_keeps_between_micro_batches(tmp_path, data_dir, world):
    """FSDP2 itself, on the CPU under torch's fake process group (rank 0 of `world`), bfloat16 compute as on
    CUDA: after a micro-batch's backward under set_requires_gradient_sync(False), as train.py runs all but a
    step's last, the unsharded gradients it keeps are what planning counts (every parameter, float32); with
    one micro-batch per process there are none."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = tiny_config(data_dir, tmp_path / "run", parallel="fsdp", gradient_accumulation_steps=2 * world,
                      n_embd=36, vocab_multiple=1, pos_emb="rope")
    plan, _ = planning.meta_model(cfg)
    accumulating = planning.memory(plan, cfg, 2, "fsdp", world)
    single = planning.memory(plan, tiny_config(data_dir, tmp_path / "run", parallel="fsdp",
                                               gradient_accumulation_steps=world, n_embd=36, vocab_multiple=1,
                                               pos_emb="rope"), 2, "fsdp", world)
    assert single.accumulated == 0 and accumulating.accumulated > 0
    block = sum(p.numel() for p in plan.transformer.h[0].parameters())
    assert accumulating.copies == single.copies - 4 * block  # the one block's gradients are among those held

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        torch.manual_seed(0)
        model = GPT(plan.config)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for b in model.transformer.h:
            fully_shard(b, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        model.set_requires_gradient_sync(False)
        x = torch.randint(0, plan.config.vocab_size, (2, cfg.block_size))
        model(x, x)[1].backward()
        held = [fp.unsharded_accumulated_grad if fp.unsharded_accumulated_grad is not None
                else fp._unsharded_param.grad
                for m in model.modules() if (state := _get_module_fsdp_state(m)) and state._fsdp_param_group
                for fp in state._fsdp_param_group.fsdp_params]
        assert all(g is not None and g.dtype == torch.float32 for g in held)
        assert sum(g.nbytes for g in held) == accumulating.accumulated
    finally:
        torch.distributed.destroy_process_group()


def test_checkpointing_keeps_the_blocks_inputs_and_one_block(tmp_path, data_dir):
    cfg = tiny_config(data_dir, tmp_path / "run", n_layer=4)
    model, _ = planning.meta_model(cfg)
    block, outside = planning.activation_bytes_per_token(model.config, 4)
    plain, checkpointed = planning.activation_bytes(model.config, 10, 4)
    extra = 4 * model.config.vocab_size  # the logits' gradient
    assert plain == 10 * (4 * block + outside + extra)
    assert checkpointed == 10 * (4 * 4 * cfg.n_embd + block + outside + extra) < plain


def test_the_fit_verdict_says_what_would_fit(tmp_path, data_dir):
    """The CUDA branch's verdict, given a free-memory figure (no GPU here)."""
    cfg = tiny_config(data_dir, tmp_path / "run", batch_size=8)
    model, _ = planning.meta_model(cfg)
    need = planning.memory(model, cfg, 2, "ddp", 1).total(False)
    assert planning.fit_verdict(model, cfg, 2, need, 1).startswith("fits: one process (no sharding) over 1 GPU needs")
    verdict = planning.fit_verdict(model, cfg, 2, need - 1, 2)
    assert verdict.startswith("does NOT fit: ddp over 2 GPUs needs")
    checkpointed = planning.memory(model, cfg, 2, "ddp", 2).total(True)
    assert f"activation_checkpointing = true ({planning.size(checkpointed)})" in verdict
    assert 'parallel = "fsdp"' in verdict and "batch_size = 4 with gradient_accumulation_steps = 2" in verdict
    # one GPU runs one process, which never shards: the verdict says so and counts the plain run
    one = planning.fit_verdict(model, dataclasses.replace(cfg, parallel="fsdp"), 2, need, 1)
    assert one.startswith(f"fits: one process (no sharding) over 1 GPU needs {planning.size(need)}")


def test_the_verdict_never_offers_accumulation_that_costs_fsdp_more(tmp_path, data_dir):
    """Under FSDP over 2 with one micro-batch per process, halving the batch and doubling accumulation turns on
    FSDP's held unsharded gradients: where that costs more than the activations it saves, it is not offered."""
    cfg = tiny_config(data_dir, tmp_path / "run", batch_size=2, block_size=8, parallel="fsdp",
                      gradient_accumulation_steps=2, activation_checkpointing=True)
    model, _ = planning.meta_model(cfg)
    need = planning.memory(model, cfg, 2, "fsdp", 2).total(True)
    half = dataclasses.replace(cfg, batch_size=1, gradient_accumulation_steps=4)
    halved = planning.memory(model, half, 2, "fsdp", 2)
    assert halved.accumulated == planning.gradient_bytes(model)  # every float32 gradient, unsharded
    assert halved.total(True) > need  # the advice would have raised the memory it meant to lower
    verdict = planning.fit_verdict(model, cfg, 2, need - 1, 2)
    assert verdict.startswith("does NOT fit") and "batch_size = 1" not in verdict


def test_on_a_cuda_machine_the_plan_ends_with_the_verdict(tmp_path, data_dir, monkeypatch):
    """The CUDA branch's wiring, with torch.cuda's answers stood in for (no GPU here): the free memory of the
    config's device, and the GPUs torchrun would use."""
    cfg = tiny_config(data_dir, tmp_path / "run", device="cuda", dtype="bfloat16", parallel="fsdp")
    model, _ = planning.meta_model(cfg)
    need = planning.memory(model, cfg, 2, "fsdp", 4).total(False)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (need - 1, 2 * need))
    text = planning.describe(cfg)
    assert text.endswith(planning.fit_verdict(model, cfg, 2, need - 1, 4))
    assert text.splitlines()[-1].startswith("does NOT fit: fsdp over 4 GPUs") and asked == [torch.device("cuda")]


def test_plan_prints_the_plan_and_writes_nothing(tmp_path, data_dir):
    out = tmp_path / "run"
    result = run_cli("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--n_layer=2", "--n_head=2",
                     "--n_embd=32", "--block_size=16", "--batch_size=4", "--max_iters=10", "--device=cpu", "--plan")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not out.exists()
    vocab_size = read_meta(str(data_dir))["vocab_size"]
    n_params = sum(p.numel() for p in GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16,
                                                    vocab_size=vocab_size)).parameters())
    assert f"parameters   {n_params / 1e6:.2f}M total" in result.stdout
    assert "64 per step (4 x 16 x 1 accumulation); 10 steps = " in result.stdout
    assert 'config picks parallel = "ddp", activation_checkpointing = false' in result.stdout
    assert "fsdp 8" in result.stdout and "H100" in result.stdout and "40% MFU" in result.stdout


def test_plan_on_a_depth_config_shows_what_the_dial_set(tmp_path, data_dir):
    args = [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}", "--depth=2", "--aspect_ratio=16",
            "--block_size=16", "--batch_size=4", "--device=cpu"]
    cfg = build_config(None, args)
    result = run_cli("train.py", *args, "--plan")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"depth 2: n_layer=2, n_embd=32, n_head=2, learning_rate={cfg.learning_rate:g}, "
            f"min_lr={cfg.min_lr:g}, max_iters={cfg.max_iters}") in result.stdout
    n_params = parameter_count(cfg.model_config(padded_vocab_size(read_meta(str(data_dir))["vocab_size"], 1)))
    tokens = cfg.max_iters * 4 * 16
    assert f"{cfg.max_iters:,} steps" in result.stdout and f"{tokens / n_params:.1f} per parameter" in result.stdout
    assert 20 <= tokens / n_params < 20 + 64 / n_params  # the budget, rounded up to whole steps
