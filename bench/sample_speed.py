"""
Generation speed: the cache-free reference (GPT.generate), our engine (nanoforge/engine.py) and,
when transformers is installed, Hugging Face's generate on the same weights, side by side in
one run and at equal precision, so the ratios hold even on a busy machine.

    python -m bench.sample_speed            # both model sizes, batch 1 and 8, 256 and 1024 new tokens
    python -m bench.sample_speed --quick    # 64 and 256 new tokens, fewer reference probes
    python -m bench.sample_speed --threads 1 --batches 1 --new-tokens 256   # the rows in docs/performance.md
    python -m bench.sample_speed --models gpt2-124M --precisions float32 --batches 1 --new-tokens 128   # one row

Models have random weights: (a) the shakespeare_char config (6 layers, 6 heads, 384 wide,
block_size 256, 65 tokens) and (b) GPT-2 124M (12, 12, 768, block_size 1024, 50257 tokens).
Every method decodes greedily from the same 1-token prompt for exactly the given number of
tokens. Tokens/s counts new tokens of all rows: batch * new tokens / seconds.

Each row is one precision, on both sides: float32 (engine and HF in float32), bfloat16 (both
with bfloat16 weights and cache), int8 (the engine's weight-only int8 with bfloat16
activations; HF has no int8 without extra packages, so that row has no HF cell). The reference
is timed in float32 only.

What is timed, exactly:
- engine and Hugging Face: one whole generation each, after a short warm-up; the precisions
  run one after another within a row group, so they see the same load.
- reference: a whole generation when its estimate fits the time budget; otherwise single
  reference steps (one GPT.generate call for one token) at a few context lengths, and the
  total time estimated by summing the interpolated step time over every step: such numbers
  are marked "~".
- bandwidth: summing a 1 GiB float32 tensor (bytes read / s), measured next to each batch-1
  row group. The bound for batch-1 decoding is bandwidth / bytes the engine's decoder reads per
  token (every matrix once, in its own dtype: 4, 2 or 1 byte per weight, plus one row of each
  embedding table); "of bound" is the engine's batch-1 speed as a fraction of it.
- matrix multiplies alone: one step's Linear layers run back to back on a 1-row input, nothing
  else; its tok/s is the ceiling the matrix kernels set, and its fraction of the bound says how
  close those kernels stream to the measured bandwidth.
- past block_size (shakespeare_char, 1024 tokens) the engine uses its default slide of
  block_size / 4; with slide=1 it would do the reference's work (a full forward per token).
"""

import argparse
import copy
import time

import numpy as np
import torch

from nanoforge import gpt2
from nanoforge.cpu_decoding import PackedLinear
from nanoforge.machine import probe
from nanoforge.engine import Generator
from model import GPT, GPTConfig
from nanoforge.cpu_decoding import Int8Linear

MODELS = {
    "shakespeare_char": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, dropout=0.0),
    "gpt2-124M": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, dropout=0.0),
}


class NoTokenizer:
    """Generation needs only decode (for text) and eot_id; ids are all the bench looks at."""

    eot_id = None

    def decode(self, ids):
        return ""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def read_bandwidth(device, gib=1):
    x = torch.ones(gib * 2**28, device=device)  # gib GiB of float32
    x.sum()
    seconds = min(timed(x.sum, device)[0] for _ in range(5))
    return x.numel() * 4 / seconds


def bytes_per_token(decoder):
    """Bytes a batch-1 decode step reads: every tensor of the engine's decoder once, except the embedding
    tables, of which it reads one row each; each matrix as the step reads it (PackedLinear: its packed copy,
    or in bfloat16 its plain weight; a tied lm_head: the whole table)."""
    tensors = {id(t): t for t in [*decoder.parameters(), *decoder.buffers()]}
    for module in decoder.modules():
        if isinstance(module, torch.nn.Embedding):
            tensors.pop(id(module.weight), None)
    for module in decoder.modules():
        if isinstance(module, PackedLinear):
            read = module.packed if module.weight is None else module.weight
            tensors[id(read)] = read
        elif isinstance(module, torch.nn.Linear):
            tensors[id(module.weight)] = module.weight
    return sum(t.numel() * t.element_size() for t in tensors.values())


def matrices_alone_seconds(decoder, device):
    """Seconds for one pass of a batch-1 step's matrix multiplies alone: every Linear of the
    decoder once, in order, on a 1-row input (each read from memory, as in a real step). The
    engine's speed over 1 / this is how much of its time goes to anything but the matrices."""
    layers = [m for m in decoder.modules() if isinstance(m, (torch.nn.Linear, PackedLinear, Int8Linear))]
    dtype = next(decoder.parameters()).dtype
    inputs = [torch.randn(1, in_features(m), device=device, dtype=dtype) for m in layers]
    run = lambda: [m(x) for m, x in zip(layers, inputs)]  # noqa: E731
    with torch.no_grad():  # as decoding runs: with autograd on, the packed bfloat16 op with a bias is ~500x slower
        run()
        return min(timed(run, device)[0] for _ in range(5))


def in_features(layer):
    return layer.weight.size(1) if isinstance(layer, (torch.nn.Linear, Int8Linear)) else layer.in_features


def hf_model(model):
    """transformers' GPT2LMHeadModel of the same shape with the same weights (its Conv1D layers
    store the weight transposed relative to nn.Linear)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                                    bos_token_id=None, eos_token_id=None))
    missing, _ = hf.load_state_dict(gpt2.ours_to_hf(model.state_dict()), strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to wte, as ours is
    return hf.to(next(model.parameters()).device).eval()


def hf_generate(hf, prompt, n):
    return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                       eos_token_id=None, attention_mask=torch.ones_like(prompt))


def reference_seconds(model, prompt, n, budget, probes):
    """(seconds, measured?) for GPT.generate to make n tokens: timed whole when the estimate
    fits the budget, else estimated from single steps timed at `probes` context lengths."""
    block = model.config.block_size
    device = prompt.device
    last = min(prompt.size(1) + n - 1, block)
    lengths = np.unique(np.linspace(prompt.size(1), last, probes).astype(int))
    step = []
    for length in lengths:
        context = torch.zeros(prompt.size(0), int(length), dtype=torch.long, device=device)
        step.append(min(timed(lambda: model.generate(context, 1, temperature=0), device)[0] for _ in range(2)))
    contexts = np.minimum(np.arange(prompt.size(1), prompt.size(1) + n), block)
    estimate = float(np.interp(contexts, lengths, step).sum())
    if estimate <= budget:
        return timed(lambda: model.generate(prompt, n, temperature=0), device)[0], True
    return estimate, False


def timed_generator(model, device, quantize=None):
    """A Generator whose decode steps record their finishing times in .step_times."""
    gen = Generator(model, NoTokenizer(), quantize=quantize)
    gen.step_times = []
    decode = gen.decode_step

    def step(idx, cache):
        out = decode(idx, cache)
        sync(device)
        gen.step_times.append(time.perf_counter())
        return out

    gen.decode_step = step
    return gen


def run_engine(gen, prompt, n, device):
    """(seconds, samples, 'ms/token over the first 10% of steps -> the last 10%')."""
    gen.step_times.clear()
    seconds, samples = timed(lambda: gen.generate(prompt.tolist(), max_new_tokens=n, temperature=0),
                             device)
    gaps = np.diff(gen.step_times) * 1000
    tenth = max(1, len(gaps) // 10)
    return seconds, samples, f"{gaps[:tenth].mean():.1f} → {gaps[-tenth:].mean():.1f}"


PRECISIONS = ("float32", "bfloat16", "int8")


def engines_and_hf(model, device, with_hf, precisions=PRECISIONS):
    """{precision: (engine Generator, HF model or None)} on the same weights, for each of precisions."""
    hf = hf_model(model) if with_hf else None
    made = {
        "float32": lambda: (timed_generator(model, device), hf),
        "bfloat16": lambda: (timed_generator(copy.deepcopy(model).to(torch.bfloat16), device),
                             hf and copy.deepcopy(hf).to(torch.bfloat16)),
        "int8": lambda: (timed_generator(model, device, quantize="int8"), None),
    }
    return {precision: made[precision]() for precision in precisions}


def bench_rows(name, model, runners, device, batch, n, budget, probes, bandwidth):
    """Print one row per precision for this batch size and number of new tokens."""
    prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
    tokens = batch * n
    ref_s, measured = reference_seconds(model, prompt, n, budget, probes)
    mark = "" if measured else "~"
    for precision, (gen, hf) in runners.items():
        eng_s, samples, latency = run_engine(gen, prompt, n, device)
        hf_cell = ratio_hf = "n/a (no int8)" if hf is None else "n/a (past block_size)"
        if hf is not None and n <= model.config.block_size:  # the last new token is fed at position n - 1
            hf_s, hf_out = timed(lambda: hf_generate(hf, prompt, n), device)
            same = hf_out[:, 1:].tolist() == [s.ids for s in samples]
            hf_cell = f"{tokens / hf_s:.1f}" + ("" if same else " (tokens differ)")
            ratio_hf = f"{hf_s / eng_s:.2f}×"
        ref_cells = f"{mark}{tokens / ref_s:.1f} | {mark}{ref_s / eng_s:.1f}×" if precision == "float32" else " | "
        bound_cell = matrices_cell = ""
        if batch == 1:
            bound = bandwidth / bytes_per_token(gen.decoder)
            bound_cell = f"{tokens / eng_s / bound:.0%} of {bound:.0f} tok/s ({bandwidth / 1e9:.1f} GB/s)"
            alone = 1 / matrices_alone_seconds(gen.decoder, device)
            matrices_cell = f"{alone:.0f} tok/s, {alone / bound:.0%} of bound"
        print(f"| {name} | {batch} | {n} | {precision} | {ref_cells} | {tokens / eng_s:.1f} | {hf_cell} | "
              f"{ratio_hf} | {latency} | {bound_cell} | {matrices_cell} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 and 256 new tokens, fewer reference probes")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=None,
                        help="numbers of new tokens (default 256 1024; quick 64 256)")
    parser.add_argument("--reference-budget", type=float, default=None,
                        help="longest whole reference run in seconds; longer ones are estimated (default 60, quick 10)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="default: all")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS), help="default: all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.new_tokens or ((64, 256) if args.quick else (256, 1024))
    budget = args.reference_budget or (10.0 if args.quick else 60.0)
    probes = 4 if args.quick else 6
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    try:
        import transformers
    except ImportError:
        transformers = None

    print(probe().summary())
    print(f"torch {torch.__version__}, transformers {transformers and transformers.__version__}, "
          f"{torch.get_num_threads()} CPU threads; greedy decoding from a 1-token prompt")
    for device_name in devices:
        device = torch.device(device_name)
        print(f"\n{device_name}: read bandwidth {read_bandwidth(device) / 1e9:.1f} GB/s at the start")
        print("| model | batch | new tokens | precision (both sides) | reference tok/s | engine / reference "
              "| engine tok/s | HF generate tok/s | engine / HF | engine ms/token, first → last 10% of steps "
              "| engine, of bandwidth bound | matrix multiplies alone |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name in args.models:
            torch.manual_seed(0)
            model = GPT(MODELS[name]).to(device).eval()
            runners = engines_and_hf(model, device, transformers is not None, args.precisions)
            for batch in args.batches:
                warm_prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
                for gen, hf in runners.values():
                    gen.generate(warm_prompt.tolist(), max_new_tokens=8, temperature=0)
                    if hf is not None:
                        hf_generate(hf, warm_prompt, 8)
                for n in lengths:
                    # bandwidth measured again right here: other jobs on the machine change it
                    bandwidth = read_bandwidth(device) if batch == 1 else None
                    bench_rows(name, model, runners, device, batch, n, budget, probes, bandwidth)


if __name__ == "__main__":
    main()
