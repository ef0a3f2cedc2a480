"""
nanoforge's library: what the commands at the top of the checkout (prepare.py, train.py, sample.py, eval.py,
explain.py, plot.py, export.py) are made of. model.py, the GPT itself, stays at the top: it is the file to read.

One module per concern:
    config          the training config (TrainConfig), its TOML files and --key=value overrides
    data            reading a prepared data directory (train.bin, val.bin, meta.json) in batches
    sources         reading a corpus from text, JSONL and Parquet files, in bounded pieces
    datasets        the built-in datasets by name: pinned URLs, checksums, resumable downloads
    preparation     tokenizing a corpus on a pool of processes and writing a data directory
    tokenizer       char, byte, BPE and GPT-2 tokenizers, and the chat tokens
    chat_format     conversations as tokens: the chat format, its loss mask, chat records
    chat_tasks      the built-in chat tasks for offline SFT
    checkpoint      the checkpoint file format (safetensors, atomic, checksummed) and a run's checkpoints
    loading         building a model from a checkpoint, for inference or to start training from it
    gpt2            OpenAI GPT-2 weights and tokenizer in, Hugging Face GPT-2 directories out
    optim           AdamW and Muon, and the learning-rate groups
    device          devices, dtypes and GPU peak FLOP/s
    distributed     torchrun (DDP) process groups
    lock            one process at a time per output directory
    tracking        Weights & Biases and TensorBoard
    records         JSONL and Parquet records
    engine          the generation engine: KV cache, prefill and decode, batches, stop conditions
    sampling        top-k, top-p, repetition penalty, drawing tokens, streaming text, prompt lookup
    cpu_decoding    the CPU decoding layers (packed and int8 weights, one-query attention)
    inspect_model   what happens inside a forward pass: attention, logit lens, traced activations
    inspect_html    explain.py's offline HTML page
"""
