"""The capability probe and both sides of every check it drives: the probe agrees with what the private ops
really do, decoding's fast layers give the plain layers' results (the plain side forced in-process with
NANOFORGE_FAST_PATHS=off), Muon's own update is torch.optim.Muon's in bfloat16 and close to it in float32, and
train.py and sample.py say which machine made their figures."""

import copy
import json

import pytest
import torch

from conftest import run_cli, tiny_config
from nanoforge import device as device_module
from nanoforge import machine as machine_module
from nanoforge.cpu_decoding import Int8Linear, PackedLinear, fast_linear
from nanoforge.device import resolve_dtype
from nanoforge.engine import Generator, KVCache
from nanoforge.machine import SWITCH, MachineError, probe
from nanoforge.optim import Muon, build_optimizer, newton_schulz_dtype
from test_generate import CHARS, small_model


@pytest.fixture
def fast_paths_off(monkeypatch):
    """The machine as a CPU without any of the fast paths: NANOFORGE_FAST_PATHS=off for this test."""
    monkeypatch.setenv(SWITCH, "off")
    probe.cache_clear()
    yield probe()
    probe.cache_clear()  # the next probe() reads the environment monkeypatch restores


def test_the_switch_turns_every_cpu_fast_path_off_and_a_bad_value_is_one_line(fast_paths_off, monkeypatch):
    assert not (fast_paths_off.native_bf16 or fast_paths_off.packed_linear or fast_paths_off.packed_linear_bf16
                or fast_paths_off.int8_kernel or fast_paths_off.fast_paths)
    summary = fast_paths_off.summary()
    assert summary.startswith(f"machine: {fast_paths_off.cpu} (") and "\n" not in summary
    assert "no CPU fast paths; NANOFORGE_FAST_PATHS=off" in summary
    monkeypatch.setenv(SWITCH, "fast")
    probe.cache_clear()
    with pytest.raises(MachineError, match="^NANOFORGE_FAST_PATHS must be 'on' or 'off', got 'fast': unset it"):
        probe()


def test_the_probe_says_what_the_packed_ops_really_do(monkeypatch):
    """Where the probe says the packed bfloat16 op runs, it runs; where it says not (an AVX2-only CPU, or
    ONEDNN_MAX_CPU_ISA=AVX2 as in CI's second pass), the op raises from inside torch: what the probe spares us.
    The switch is on here, whatever the run's: this is about the hardware (and torch's ISA variables)."""
    monkeypatch.setenv(SWITCH, "on")
    probe.cache_clear()
    machine = probe()
    probe.cache_clear()
    linear = torch.nn.Linear(32, 16)
    if machine.packed_linear:
        x = torch.randn(3, 32)
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-6)
    bf16 = torch.nn.Linear(32, 16).bfloat16()
    if machine.packed_linear_bf16:
        PackedLinear(bf16)
    elif machine.packed_linear:  # oneDNN is there but cannot run bfloat16 on this CPU
        with pytest.raises(RuntimeError, match="bf16 path needs the cpu support"):
            PackedLinear(bf16)
    assert machine.native_bf16 <= machine.packed_linear_bf16  # native bfloat16 is a subset of what oneDNN runs


def test_packed_bfloat16_takes_torchs_kernel_for_one_row_and_puts_onednn_back(monkeypatch):
    """One row in bfloat16 runs F.linear with oneDNN off (faster at batch 1, docs/performance.md), more rows the
    packed op; both agree with the product computed in float32 to bfloat16's round-off, and the process-wide
    oneDNN switch is as it was afterwards, even when the product raises."""
    monkeypatch.setenv(SWITCH, "on")
    probe.cache_clear()
    machine, chosen = probe(), fast_linear(torch.device("cpu"), torch.bfloat16)
    probe.cache_clear()  # the run's own switch applies again to the tests after this one
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).bfloat16()
    assert chosen is (PackedLinear if machine.packed_linear_bf16 else None)
    if not machine.packed_linear_bf16:
        return  # bfloat16 decodes with nn.Linear here, which already runs torch's kernel (no oneDNN bfloat16)
    layer = PackedLinear(linear)
    assert layer.weight is linear.weight  # the model's own weight, not a copy
    for rows in (1, 3):
        x = torch.randn(rows, 64).bfloat16()
        expected = x.float() @ linear.weight.float().T + linear.bias.float()
        torch.testing.assert_close(layer(x).float(), expected, rtol=0.02, atol=0.02)
    assert torch._C._get_mkldnn_enabled()
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, 63).bfloat16())  # a wrong width: the kernel raises
    assert torch._C._get_mkldnn_enabled()
    assert PackedLinear(torch.nn.Linear(64, 48)).weight is None  # float32 keeps the packed path for one row


def decode_logits(gen, idx, dtype):
    """Logits (B, steps, V) of a prefill of 5 positions and a decode step per further position."""
    cache = KVCache(gen.config, idx.size(0), "cpu", dtype)
    steps = [gen.prefill(idx[:, :5], cache)]
    steps += [gen.decode_one_token(idx[:, t : t + 1], cache) for t in range(5, idx.size(1))]
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("dtype, quantize, tolerance", [(torch.float32, None, 1e-5), (torch.bfloat16, None, 0.05),
                                                        (torch.float32, "int8", 0.05)])
def test_fast_and_plain_decoding_give_the_same_logits_and_tokens(dtype, quantize, tolerance, monkeypatch):
    model = small_model().to(dtype)
    idx = torch.randint(0, CHARS.vocab_size, (2, 12))
    fast = Generator(model, CHARS, quantize=quantize)
    with monkeypatch.context() as m:
        m.setenv(SWITCH, "off")
        probe.cache_clear()
        plain = Generator(model, CHARS, quantize=quantize)
    probe.cache_clear()
    layer = plain.decoder.transformer.h[0].mlp.c_fc
    assert type(layer) is (Int8Linear if quantize else torch.nn.Linear) and not getattr(layer, "kernel", False)
    if quantize:
        assert fast.decoder.transformer.h[0].mlp.c_fc.kernel == probe().int8_kernel
    logits = [decode_logits(gen, idx, gen.dtype) for gen in (fast, plain)]
    torch.testing.assert_close(logits[0], logits[1], rtol=tolerance, atol=tolerance * logits[1].abs().max().item())
    tokens = [[s.ids for s in gen.generate(idx[:, :4].tolist(), max_new_tokens=20, temperature=0)]
              for gen in (fast, plain)]
    assert tokens[0] == tokens[1]


def muon_pair(ns_dtype, seed=0):
    """Two copies of the same three matrices (a tall, a wide and a square one), under torch.optim.Muon and ours."""
    torch.manual_seed(seed)
    shapes = [(48, 16), (16, 40), (24, 24)]
    weights = [torch.randn(shape) for shape in shapes]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.95)
    return (torch.optim.Muon(theirs, **settings), theirs), (Muon(ours, ns_dtype=ns_dtype, **settings), ours)


def run_steps(optimizer, params, steps=3):
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same gradients for both optimizers
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()


def test_muon_in_bfloat16_is_torchs_and_in_float32_close_to_it():
    (torch_muon, theirs), (our_muon, ours) = muon_pair(torch.bfloat16)
    start = [p.detach().clone() for p in theirs]
    run_steps(torch_muon, theirs)
    run_steps(our_muon, ours)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)  # the same bfloat16 iteration: to round-off
    # The state is torch's: the same hyperparameters and a momentum_buffer per matrix, so checkpoints resume.
    assert our_muon.state_dict()["param_groups"] == torch_muon.state_dict()["param_groups"]
    for index, state in torch_muon.state_dict()["state"].items():
        assert state.keys() == {"momentum_buffer"}
        torch.testing.assert_close(our_muon.state_dict()["state"][index]["momentum_buffer"], state["momentum_buffer"])

    (_, _), (f32_muon, f32) = muon_pair(torch.float32)
    run_steps(f32_muon, f32)
    for a, b, p0 in zip(theirs, f32, start):  # the updates differ by bfloat16's round-off, ~1%, not in kind
        moved_theirs, moved_ours = a.detach() - p0, b.detach() - p0
        assert (moved_ours - moved_theirs).norm() < 0.03 * moved_theirs.norm()


def test_a_torch_muon_checkpoint_resumes_in_ours_step_for_step():
    (torch_muon, theirs), (our_muon, ours) = muon_pair(torch.bfloat16)
    run_steps(torch_muon, theirs)
    our_muon.load_state_dict(copy.deepcopy(torch_muon.state_dict()))  # as from a file: no shared buffers
    with torch.no_grad():
        for a, b in zip(theirs, ours):
            b.copy_(a)
    run_steps(torch_muon, theirs, steps=2)
    run_steps(our_muon, ours, steps=2)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_muon_orthogonalises_in_bfloat16_only_where_it_is_native(fast_paths_off):
    assert newton_schulz_dtype("cpu") == torch.float32 and newton_schulz_dtype("mps") == torch.float32
    cfg = tiny_config(".", ".", optimizer="muon")
    assert build_optimizer(small_model(), cfg, "cpu").optimizers[0].ns_dtype == torch.float32
    probe.cache_clear()
    on = probe()
    assert newton_schulz_dtype("cpu") == (torch.bfloat16 if on.native_bf16 else torch.float32)


def test_auto_dtype_on_cuda_takes_bfloat16_only_where_the_gpu_has_it(monkeypatch):
    real = probe()
    for native, expected in [(True, torch.bfloat16), (False, torch.float16)]:
        fake = machine_module.Machine(**{**real.as_dict(), "cuda": "GPU", "cuda_bf16": native})
        monkeypatch.setattr(device_module, "probe", lambda cuda=None: fake)
        assert resolve_dtype("auto", "cuda") == expected
    assert resolve_dtype("auto", "cpu") == torch.float32  # training on a CPU: float32, bfloat16 or not


def test_train_says_and_records_its_machine_and_sample_says_it(data_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--n_layer=1", "--n_head=2",
                     "--n_embd=16", "--block_size=8", "--batch_size=2", "--max_iters=4", "--eval_interval=2",
                     "--eval_iters=1", "--log_interval=2", "--device=cpu", "--compile=false")
    assert result.returncode == 0, result.stderr
    assert probe().summary() in result.stderr.splitlines()
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert records[0]["machine"] == json.loads(json.dumps(probe().as_dict()))
    assert all("machine" not in r for r in records[1:])
    sampled = run_cli("sample.py", "--ckpt", out, "--max-new-tokens", "3", "--device", "cpu",
                      env={SWITCH: "off"})
    assert sampled.returncode == 0, sampled.stderr
    assert "no CPU fast paths; NANOFORGE_FAST_PATHS=off" in sampled.stderr.splitlines()[0]


def test_a_cpu_run_leaves_cuda_alone(tmp_path, data_dir, monkeypatch):
    """On a machine with a GPU, train.py --device cpu never asks CUDA anything (its name, its bfloat16: each
    initialises CUDA); a run on CUDA, or a dtype chosen for it, does. The GPU's answers are stood in for."""
    from conftest import tiny_config
    from nanoforge.device import resolve_dtype
    from train import train

    import sys

    asked = []

    def from_the_probe():  # torch's own code (GradScaler, autocast) may ask too: only the probe is watched
        return sys._getframe(2).f_globals["__name__"] == "nanoforge.machine"

    # no GPU here: is_available answers True to the probe alone, so the run itself stays on its CPU path
    monkeypatch.setattr(torch.cuda, "is_available", lambda: from_the_probe() and not asked.append("is_available"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: asked.append("name") or "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **k: asked.append("bf16") or True)
    probe.cache_clear()
    try:
        train(tiny_config(data_dir, tmp_path / "run", max_iters=2, eval_interval=2, device="cpu", dtype="auto"))
        assert asked == []
        assert "CUDA not probed (unused)" in probe(cuda=False).summary()
        assert resolve_dtype("auto", "cuda") == torch.bfloat16 and "name" in asked
        assert probe(cuda=True).cuda == "Fake GPU"
    finally:
        probe.cache_clear()
