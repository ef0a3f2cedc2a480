"""
nanoforge's library: what the commands at the top of the checkout (prepare.py, train.py, sample.py, serve.py,
eval.py, explain.py, features.py, plot.py, export.py, scaling.py, rl.py) are made of. model.py, the GPT itself,
stays at the top: it is the file to read.

One module per concern:
    config          the training config (TrainConfig), its TOML files and --key=value overrides
    sizing          the depth dial: shape, learning rates and token budget from one number
    planning        train.py --plan: parameters, FLOPs, memory per device and training time before a run
    scaling         the scaling sweep: its runs, their results, the power-law fit and its figure
    data            reading a prepared data directory (train.bin, val.bin, meta.json) in batches
    sources         reading a corpus from text, JSONL and Parquet files, in bounded pieces
    datasets        the built-in datasets by name: pinned URLs, checksums, resumable downloads
    preparation     tokenizing a corpus on a pool of processes and writing a data directory
    tokenizer       char, byte, BPE and GPT-2 tokenizers, and the chat tokens
    chat_format     conversations as tokens: the chat format, its loss mask, chat records
    chat_tasks      the built-in chat tasks for offline SFT
    tools           the calculator a chat model calls: a safe evaluator and the engine's per-row tool state
    tasks           tasks with verifiers for RL and eval.py --task: problems, rewards, held-out splits, GSM8K
    reinforce       rl.py's config, rollouts, group advantages, policy-gradient loss with KL and clipping, pass@k
    checkpoint      the checkpoint file format (safetensors, atomic, checksummed) and a run's checkpoints
    loading         building a model from a checkpoint, for inference or to start training from it
    gpt2            OpenAI GPT-2 weights and tokenizer in, Hugging Face GPT-2 directories out
    optim           AdamW and Muon, and the learning-rate groups
    training        one training step: schedule, micro-batches, the NaN-guarded update, evaluation, signals
    runs            a training run: its starting model, RunState, checkpoints written and restored, resume
    lora            LoRA: low-rank adapters on frozen weights, merged back; the base a LoRA checkpoint names
    device          devices, dtypes and GPU peak FLOP/s
    machine         the capability probe: what this machine runs natively, which fast paths are on
    distributed     torchrun (DDP) process groups
    sharding        FSDP2: sharding the model over processes, and whole checkpoints in and out of shards
    lock            one process at a time per output directory
    tracking        Weights & Biases and TensorBoard
    records         JSONL and Parquet records
    plotting        reading a run's log.jsonl back, and the style plot.py and scaling.py draw in
    engine          the generation engine: KV cache, prefill and decode, batches, stop conditions
    sampling        top-k, top-p, repetition penalty, drawing tokens, streaming text, prompt lookup
    cpu_decoding    the CPU decoding layers (packed and int8 weights, one-query attention)
    server          serve.py's app: the OpenAI-compatible API and the chat page (chat_page.html)
    openai_api      OpenAI's request and response shapes, checked and written
    batching        the bounded queue and worker that serve concurrent requests
    slots           continuous batching: a row per request in KV-cache slots, joining and leaving every step
    evaluation      eval.py's loss, perplexity, bits per byte and chat exact match
    multiple_choice scoring a context's endings: acc and acc_norm
    hellaswag       the HellaSwag task: its file, its download, scoring during training
    harness         the lm-evaluation-harness bridge (an LM over any checkpoint)
    inspect_model   what happens inside a forward pass: attention, logit lens, traced activations
    inspect_html    explain.py's offline HTML page
    interventions   ablation, head importance, direct logit attribution, activation patching
    causal_views    explain.py's flags and views of the interventions
    features        sparse autoencoders on one site of a model: training step, metrics, SAE file, steering
    feature_survey  what each SAE feature does on data: density, top contexts, histogram, logit effects
    features_html   features.py's offline page: the feature browser and the embedding map
    embedding_space nearest tokens by cosine in the embedding and un-embedding, and their PCA map
    errors          UserError, the base of every error a user can cause
    cli             the command-line dialect every command shares, and its runner
"""
