"""
`python train.py CONFIG --plan`: what a run will cost before it starts. The model is built on the meta device
(shapes, no storage) and nothing is written; the plan gives the parameters, FLOPs and tokens, the memory per
device, and the training time on the GPUs of device.GPU_PEAK_FLOPS.

Memory per device, in bytes:
- Weights, gradients and optimizer state are exact (tests/test_planning.py compares them with a real model and
  optimizer). train.py keeps all three in float32 whatever the autocast dtype. Weights include the buffers (rope's
  cos and sin tables, one pair per block). The optimizer is nanoforge.optim.build_optimizer's, built over the meta
  model: AdamW keeps exp_avg and exp_avg_sq (the parameter's size each) and a float32 `step` per parameter; Muon
  keeps one momentum_buffer per block matrix, and its AdamW the rest as above.
- DDP (several processes) adds its gradient buckets: a flat copy of every gradient (train.py does not ask for
  gradient_as_bucket_view). Under autocast (bfloat16/float16) the weights that enter a matrix multiply are cast
  once per forward and kept (autocast's weight cache): the Linear weights again, at the autocast dtype's size.
- FSDP (FSDP2's fully_shard on each block and the root) cuts every parameter, its gradient and its optimizer
  state into world-size pieces along dim 0 (the last piece padded: each process holds ceil(dim0 / world) rows);
  the buffers and AdamW's `step` scalars are not cut. Its stated extra: the unsharded parameters in compute, at
  the autocast dtype's size (the parameter dtype of FSDP's mixed-precision policy on CUDA): the root's (the
  embeddings, the final norm and an untied lm_head, which FSDP2 keeps gathered from the forward to the backward)
  and two blocks' (the one computing and the next, prefetched), plus one block's unsharded float32 gradients
  before they are reduce-scattered. With more than one micro-batch per process (gradient_accumulation_steps
  / world > 1) train.py runs all but the last under set_requires_gradient_sync(False): FSDP2 then keeps every
  parameter's unsharded float32 gradient from one micro-batch to the next (its reduce dtype; the model's whole
  float32 size, tests/test_planning.py counts them under a fake process group), which replaces the one block's.
- One process never shards (sharding.sharded needs two or more): its column is what runs, whatever `parallel`.
- Activations: what autograd keeps for the backward of one micro-batch (batch_size x block_size tokens), after
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4.1) adapted
  to our blocks: attention is the fused SDPA, which keeps its output and a log-sum-exp but never the T x T scores
  (their 5as/h term is gone); there are no dropout masks unless dropout > 0; the residual stream and the norms
  stay float32 while the matrix multiplies' inputs are in the autocast dtype (d bytes). Per token and block, with
  C = n_embd, K = the k (and v) width and H the MLP's hidden width: 2 x (4C + 8) for the two LayerNorms (their
  input, mean and rstd; an RMSNorm keeps its input, its float32 normalised input and rstd: 8C + 4); d(C + (C + 2K)
  + C) + 4 x n_head for attention (c_attn's input, its output, of which q, k and v are views that SDPA keeps,
  SDPA's output, laid out as c_proj's input, and its log-sum-exp); d(C + c_fc's fan-out + H) for the MLP (c_fc's
  input, the activation's input, c_proj's input; swiglu keeps silu(gate) too: + dH). rope or qk_norm make q and k
  new tensors: + d(C + K) + dC (SDPA's output follows their layout, so c_proj's input becomes a copy); qk_norm's
  rms_norm keeps + 4(C + K) (+ 4(C + K) more under autocast, its input upcast) and its rstd. dropout adds 2C bytes
  of masks (and SDPA's own dropout is not modelled). Outside the blocks: ln_f, lm_head's input (dC), the float32
  log-probabilities of the loss (4 x vocab), the int64 inputs and targets (16), logit_softcap's tanh (d x vocab),
  and, as the backward starts, the float32 gradient of the logits (4 x vocab). tests/test_planning.py checks the
  kept bytes against the tensors autograd saves on CPU, in float32 and under bfloat16 autocast. With activation
  checkpointing (per block) only each block's input (4C) is kept, and one block's activations at a time are
  recomputed in the backward. The total adds the parts as if all were alive at once (gradients fill in as
  activations are freed, so it errs high); it is not yet checked against a GPU's measured peak memory.
"""

import dataclasses
import math

import torch
from torch import nn

from model import GPT, MLP
from nanoforge.device import GPU_PEAK_FLOPS, resolve_device, resolve_dtype
from nanoforge.optim import Muon, build_optimizer
from nanoforge.sizing import millions, sizing_vocab, tokens_per_step

MFU = 0.40  # a good, not a record, utilisation for a GPT of this kind on one node
WORLD_SIZES = (1, 2, 4, 8)
ADAMW_STEP_BYTES = 4  # AdamW's per-parameter `step`: a float32 scalar


@dataclasses.dataclass
class Memory:
    """Bytes per device for one way of running (a parallel mode over a world size)."""

    weights: int
    gradients: int
    optimizer: int
    copies: int  # DDP: autocast's weight cache; FSDP: the gathered parameters and one block's gradients
    buckets: int  # DDP's gradient buckets
    activations: int
    activations_checkpointed: int
    accumulated: int = 0  # FSDP with accumulation: the unsharded float32 gradients kept between micro-batches

    def total(self, checkpointed):
        kept = self.activations_checkpointed if checkpointed else self.activations
        return self.weights + self.gradients + self.optimizer + self.copies + self.buckets + self.accumulated + kept


def meta_model(cfg):
    """(the config's GPT on the meta device, a note on where its vocabulary came from)."""
    vocab_size, note = sizing_vocab(cfg.data_dir, cfg.vocab_multiple)
    with torch.device("meta"):
        return GPT(cfg.model_config(vocab_size)), note.strip(" ()")


def shard_bytes(tensor, world):
    """What one of `world` processes holds of a tensor FSDP2 cuts along dim 0 (ceil(dim0 / world) rows)."""
    if world == 1 or tensor.dim() == 0:
        return tensor.nbytes
    return math.ceil(tensor.size(0) / world) * (tensor.nbytes // tensor.size(0))


def weight_bytes(model, world=1):
    return sum(shard_bytes(p, world) for p in model.parameters()) + sum(b.nbytes for b in model.buffers())


def gradient_bytes(model, world=1):
    return sum(shard_bytes(p, world) for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(model, cfg, world=1):
    """The state build_optimizer's optimizers create in their first step, per process."""
    optimizer = build_optimizer(model, cfg, "cpu")  # over meta parameters: groups, no state, no storage
    total = 0
    for opt in getattr(optimizer, "optimizers", (optimizer,)):
        for p in (p for group in opt.param_groups for p in group["params"]):
            if isinstance(opt, Muon):
                total += shard_bytes(p, world)  # momentum_buffer
            else:
                total += 2 * shard_bytes(p, world) + ADAMW_STEP_BYTES  # exp_avg, exp_avg_sq, step
    return total


def linear_weight_bytes(model):
    """The float32 bytes of the weights that enter matrix multiplies (the blocks' Linear layers and lm_head)."""
    return sum({id(m.weight): m.weight.nbytes for m in model.modules() if isinstance(m, nn.Linear)}.values())


def activation_bytes_per_token(config, d):
    """(bytes one block keeps for the backward per token, bytes kept outside the blocks per token), d the
    autocast dtype's size; the module docstring derives the terms."""
    C, kv = config.n_embd, config.kv_heads * (config.n_embd // config.n_head)
    mlp = model_mlp_widths(config)
    if config.norm == "layernorm":
        norm = 4 * C + 8  # its float32 input, mean and rstd
    else:
        norm = 4 * C + 4 * C + 4  # its float32 input, the normalised input (float32) and rstd
    block = 2 * norm
    # c_attn's input, its output (q, k and v are views of it, and SDPA keeps them), SDPA's output (which is laid
    # out as c_proj's input) and its log-sum-exp
    block += d * C + d * (C + 2 * kv) + d * C + 4 * config.n_head
    if config.qk_norm or config.pos_emb == "rope":
        # SDPA keeps new q and k tensors, and its output follows their layout: c_proj's input is a copy
        block += d * (C + kv) + d * C
    if config.qk_norm:
        # rms_norm keeps q and k normalised in float32, their float32 copy under autocast, and rstd
        block += (4 + (4 if d < 4 else 0)) * (C + kv) + 4 * (config.n_head + config.kv_heads)
    block += d * C + d * mlp["fan_out"] + d * mlp["hidden"]  # c_fc's input, the activation's input, c_proj's input
    if config.mlp == "swiglu":
        block += d * mlp["hidden"]  # silu(gate), kept by the product
    if config.dropout > 0:
        block += 2 * C  # the two residual dropouts' boolean masks
    # ln_f, lm_head's input, the float32 log-probabilities the loss keeps, the int64 inputs and targets
    outside = norm + d * C + 4 * config.vocab_size + 16
    if config.logit_softcap > 0:
        outside += d * config.vocab_size  # tanh's output
    return block, outside


def model_mlp_widths(config):
    """The MLP's hidden width and c_fc's output width (twice hidden for swiglu), as model.MLP builds them."""
    with torch.device("meta"):
        mlp = MLP(config)  # model.py is the one place these widths are decided
    return {"hidden": mlp.c_proj.in_features, "fan_out": mlp.c_fc.out_features}


def activation_bytes(config, tokens, d):
    """(activations kept without checkpointing, with per-block checkpointing) for `tokens` tokens."""
    block, outside = activation_bytes_per_token(config, d)
    outside += 4 * config.vocab_size  # the float32 logits' gradient, alive with them as the backward starts
    plain = config.n_layer * block + outside
    checkpointed = config.n_layer * 4 * config.n_embd + block + outside  # blocks' inputs + one block recomputed
    return tokens * plain, tokens * checkpointed


def gathered_bytes(model, d, accumulating=False):
    """FSDP's extra: the root's and two blocks' unsharded parameters at d bytes each, and one block's float32
    gradients (unless accumulating: then every unsharded gradient is held already, Memory.accumulated)."""
    block_numel = max(sum(p.numel() for p in block.parameters()) for block in model.transformer.h)
    in_blocks = {id(p) for block in model.transformer.h for p in block.parameters()}
    root_numel = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    return (root_numel + 2 * block_numel) * d + (0 if accumulating else block_numel * 4)


def memory(model, cfg, d, parallel, world):
    """Memory per device when `world` processes run cfg under `parallel` ('ddp' or 'fsdp'). One process
    runs plain whatever `parallel` says (nothing to shard across, no gradients to average)."""
    activations = activation_bytes(model.config, cfg.batch_size * cfg.block_size, d)
    if parallel == "fsdp" and world > 1:
        accumulating = cfg.gradient_accumulation_steps // world > 1
        return Memory(weight_bytes(model, world), gradient_bytes(model, world),
                      optimizer_state_bytes(model, cfg, world), gathered_bytes(model, d, accumulating), 0,
                      *activations, accumulated=gradient_bytes(model) if accumulating else 0)
    autocast_cache = linear_weight_bytes(model) * d // 4 if d < 4 else 0
    buckets = gradient_bytes(model) if world > 1 else 0
    return Memory(weight_bytes(model), gradient_bytes(model), optimizer_state_bytes(model, cfg), autocast_cache,
                  buckets, *activations)


def planned_device_type(cfg):
    """The device type cfg trains on. A config that names cuda is planned for CUDA on any machine: --plan is
    for before the GPU hours."""
    if cfg.device.startswith("cuda"):
        return "cuda"
    return resolve_device(cfg.device).type


def planned_dtype(cfg, device_type):
    """(autocast dtype, how it was chosen). dtype='auto' for CUDA on a machine without one: bfloat16 assumed."""
    if cfg.dtype == "auto" and device_type == "cuda" and not torch.cuda.is_available():
        return torch.bfloat16, "auto: bfloat16 assumed (no GPU here; a GPU from Ampere on has it)"
    dtype = resolve_dtype(cfg.dtype, device_type)
    return dtype, str(dtype).removeprefix("torch.")


def size(n_bytes):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


def duration(seconds):
    for unit, scale in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.1f} {unit}"
    return f"{seconds:.0f} s"


# The memory table's columns: (heading, parallel mode, world size). DDP holds the same on 2, 4 or 8 processes;
# one process runs plain under either mode (it does not shard).
COLUMNS = (("1 process", None, 1), ("ddp 2-8", "ddp", 2),
           *((f"fsdp {w}", "fsdp", w) for w in WORLD_SIZES if w > 1))


def memory_table(model, cfg, d):
    """The memory per device, one column per (mode, world size); * marks what the config picks."""
    columns = [(heading + ("*" if mode in (cfg.parallel, None) else ""),
                memory(model, cfg, d, mode or cfg.parallel, world)) for heading, mode, world in COLUMNS]
    ckpt = cfg.activation_checkpointing
    rows = [("weights and buffers (float32)", lambda m: m.weights),
            ("gradients (float32)", lambda m: m.gradients),
            (f"optimizer state ({cfg.optimizer}, float32)", lambda m: m.optimizer),
            ("autocast copies | fsdp gathered", lambda m: m.copies),
            ("ddp gradient buckets", lambda m: m.buckets),
            ("fsdp unsharded grads (accumulating)", lambda m: m.accumulated),
            ("activations", lambda m: m.activations),
            ("activations, checkpointed", lambda m: m.activations_checkpointed),
            ("total" + ("" if ckpt else "*"), lambda m: m.total(False)),
            ("total, checkpointed" + ("*" if ckpt else ""), lambda m: m.total(True))]
    lines = [f"  {'':<36}" + "".join(f"{heading:>11}" for heading, _ in columns)]
    for label, value in rows:
        lines.append(f"  {label:<36}" + "".join(f"{size(value(m)):>11}" for _, m in columns))
    return lines


def time_table(total_flops):
    """Training time at MFU on each GPU of the peak table, on 1 and 8 of them."""
    lines = [f"  {'GPU':<12}{'peak':>12}{'1 GPU':>12}{'8 GPUs':>12}"]
    for name, peak in GPU_PEAK_FLOPS:
        seconds = total_flops / (peak * MFU)
        lines.append(f"  {name:<12}{peak / 1e12:>9.0f} TF{duration(seconds):>12}{duration(seconds / 8):>12}")
    return lines


def fit_verdict(model, cfg, d, free_bytes, n_gpus):
    """Whether cfg's run fits in free_bytes per GPU on n_gpus GPUs (the config's parallel mode over all of them),
    and if not, what would: each alternative with its total."""
    ckpt = cfg.activation_checkpointing
    need = memory(model, cfg, d, cfg.parallel, n_gpus).total(ckpt)
    mode = cfg.parallel if n_gpus > 1 else "one process (no sharding)"
    where = f"{mode} over {n_gpus} GPU{'s' if n_gpus > 1 else ''} needs {size(need)} per GPU"
    if need <= free_bytes:
        return f"fits: {where}; {size(free_bytes)} is free"
    options = []  # (what to change, its total): only changes that lower the need are offered
    if not ckpt:
        options.append(("activation_checkpointing = true", memory(model, cfg, d, cfg.parallel, n_gpus).total(True)))
    if cfg.parallel == "ddp" and n_gpus > 1:
        options.append(('parallel = "fsdp"', memory(model, cfg, d, "fsdp", n_gpus).total(ckpt)))
    if cfg.batch_size > 1:
        # under fsdp, accumulation keeps every unsharded gradient between micro-batches: halving can cost more
        half = dataclasses.replace(cfg, batch_size=cfg.batch_size // 2,
                                   gradient_accumulation_steps=cfg.gradient_accumulation_steps * 2)
        halved = memory(model, half, d, cfg.parallel, n_gpus).total(ckpt)
        options.append((f"batch_size = {half.batch_size} with gradient_accumulation_steps = "
                        f"{half.gradient_accumulation_steps}", halved))
    advice = "; or ".join(f"{change} ({size(total)})" for change, total in options if total < need)
    advice = advice or "more GPUs under fsdp"
    return f"does NOT fit: {where} and {size(free_bytes)} is free: try {advice}"


def cuda_fit(model, cfg, d):
    """On a machine with CUDA: the verdict against the free memory of the GPU cfg.device names, over all the
    GPUs torchrun --nproc_per_node would use here."""
    free, _ = torch.cuda.mem_get_info(resolve_device(cfg.device))
    return fit_verdict(model, cfg, d, free, torch.cuda.device_count())


def summary(cfg, model, vocab_note, precision):
    """The plan's first lines: the model, what the depth dial set, parameters, FLOPs, tokens, precision."""
    c = model.config
    n_params, per_step = model.num_params(non_embedding=False), tokens_per_step(cfg)
    total_tokens = per_step * cfg.max_iters
    lines = [f"model        {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, context {c.block_size}, "
             f"vocabulary {c.vocab_size:,}" + (f" ({vocab_note})" if vocab_note else "")]
    if cfg.depth:
        lines.append(f"depth dial   depth {cfg.depth}: n_layer={c.n_layer}, n_embd={c.n_embd}, n_head={c.n_head}, "
                     f"learning_rate={cfg.learning_rate:g}, min_lr={cfg.min_lr:g}, max_iters={cfg.max_iters} "
                     f"({cfg.tokens_per_param:g} tokens per parameter; keys set explicitly win)")
    if cfg.init_from != "scratch":
        lines.append(f"init_from    '{cfg.init_from}': planned with the config's model keys; its weights set "
                     "the shape when training starts")
    return lines + [
        (f"parameters   {millions(n_params)} total, {millions(model.num_params())} without the embeddings that "
         "are only looked up"),
        f"FLOPs        {model.flops_per_token():.3g} per token (forward + backward: 6N + 12 x layers x context x width)",
        (f"tokens       {per_step:,} per step ({cfg.batch_size} x {cfg.block_size} x "
         f"{cfg.gradient_accumulation_steps} accumulation); {cfg.max_iters:,} steps = {millions(total_tokens)} "
         f"tokens, {total_tokens / n_params:.1f} per parameter"),
        f"precision    {precision}; weights, gradients and optimizer state in float32",
        (f"config picks parallel = \"{cfg.parallel}\", activation_checkpointing = "
         f"{str(cfg.activation_checkpointing).lower()} (* below)"),
    ]


def describe(cfg):
    """The plan of cfg's run, as printed text. Nothing is allocated (the model is on the meta device)."""
    model, vocab_note = meta_model(cfg)
    device_type = planned_device_type(cfg)
    dtype, dtype_note = planned_dtype(cfg, device_type)
    d = torch.empty((), dtype=dtype).element_size()
    total_flops = model.flops_per_token() * tokens_per_step(cfg) * cfg.max_iters
    lines = [
        *summary(cfg, model, vocab_note, f"{dtype_note} on {device_type}"),
        "",
        (f"memory per device, micro-batch {cfg.batch_size} x {cfg.block_size} (activations are an estimate, "
         "not yet checked against a GPU):"),
        *memory_table(model, cfg, d),
        "",
        f"training time at {MFU:.0%} MFU: {total_flops:.3g} FLOPs / (peak x {MFU:.0%} x GPUs)",
        *time_table(total_flops),
        "",
    ]
    if device_type == "cuda" and torch.cuda.is_available():
        lines.append(cuda_fit(model, cfg, d))
    elif device_type == "cuda":
        lines.append("no CUDA GPU here: run --plan on the GPU machine to compare with its free memory")
    return "\n".join(lines)
