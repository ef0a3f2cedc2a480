"""
Prepare a corpus for training: read documents, tokenize them in parallel, write train.bin, val.bin, meta.json.

    python prepare.py pystdlib
    python prepare.py my_corpus/ --tokenizer bpe --vocab-size 4096 --out data/my_corpus

SOURCE is a built-in dataset name, or a local file, directory or glob pattern:
    pystdlib          the local Python installation's standard-library sources (offline, the quickstart
                      corpus; one document: the modules joined by blank lines)
    shakespeare_char  tinyshakespeare, character-level (downloaded and checksummed, or --source a local copy)
    shakespeare       tinyshakespeare, GPT-2 BPE (or --tokenizer bpe --vocab-size N: a BPE trained on it)
    fineweb_edu       FineWeb-Edu's 10BT sample: parquet shards from Hugging Face, resumable and
                      checksummed (--shards N takes the first N), GPT-2 BPE
    chat_tasks        chat data: generated conversations of small tasks (offline; the SFT demo)
    arithmetic        chat data: generated addition and multiplication, half the replies calling the
                      calculator (offline; the SFT before rl.py, docs/rl.md)
    dolly             chat data: Databricks Dolly 15k at a pinned revision, resumable and checksummed
                      (or --source a local databricks-dolly-15k.jsonl), GPT-2 BPE
    FILE.jsonl        one document per line: the string under --text-field
    FILE.parquet      one document per row of the --text-field column (needs pyarrow: pip install 'nanoforge[parquet]')
    FILE              any other file is one UTF-8 text document
    DIR or 'GLOB'     every file below DIR (or matching GLOB, ** included), each read as above, in sorted order

A .jsonl or .parquet file is chat data when its first record (JSONL) or its columns (Parquet) hold
`messages` (a list of {"role", "content"}) or Alpaca's `instruction` (with optional `input`, and
`output`). Each conversation is rendered by chat_format.py with the chat tokens added to the tokenizer, and
written with its loss mask ({split}_mask.bin) and where it starts ({split}_starts.bin). A bad record
stops preparation with its file and line (or row) and the problem; --skip-bad leaves such records out
and counts them (meta.json's skipped_records).

--tokenizer-from CKPT takes the tokenizer of a run directory or checkpoint file (or a Hugging Face GPT-2
directory) instead of building one: to fine-tune that model, or continue training it on other text.

Documents are separated by the end-of-text token (char has none: by a blank line, "\\n\\n"). Each
document (or conversation) goes to val with probability val_fraction, drawn in order from
random.Random(seed). A source of one document (a single text file) keeps nanoGPT's split: its last
val_fraction is val.

The corpus is streamed: documents are read in pieces, tokenized by a pool of --workers processes in
chunks of about --chunk-size characters, and appended to the .bin files in order, so memory stays
bounded by chunk size x workers however large the corpus. Output files are written under temporary
names and renamed when complete; meta.json is written last, so a directory with a meta.json is
always a complete preparation.
"""


from nanoforge import cli
from nanoforge.preparation import default_out_dir, prepare
from nanoforge.sources import CHUNK_SIZE
from nanoforge.tokenizer import KINDS


@cli.command(interrupted="interrupted: nothing was written (no meta.json); run the command again")
def main(argv=None):
    parser = cli.parser(__doc__)
    parser.add_argument("name", metavar="SOURCE", help="built-in dataset name, or a file, directory or glob pattern")
    parser.add_argument("--tokenizer", choices=KINDS, help="default: char (gpt2 for shakespeare, fineweb_edu, dolly)")
    parser.add_argument("--tokenizer-from", metavar="CKPT",
                        help="the tokenizer of this run directory, checkpoint file or Hugging Face GPT-2 directory "
                             "(to fine-tune or continue training it)")
    parser.add_argument("--vocab-size", type=int, help="with --tokenizer bpe: tokens to learn, end-of-text included")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: data/<name>)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out for val.bin")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the document split (chat_tasks has its own)")
    parser.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
    parser.add_argument("--text-field", default="text", help="JSONL field or Parquet column holding the text")
    parser.add_argument("--source", help="local copy of a built-in dataset's download (skips the network)")
    parser.add_argument("--shards", type=int, help="fineweb_edu: download and use only the first N shards")
    parser.add_argument("--skip-bad", action="store_true",
                        help="chat data: leave out bad records (counted and reported) instead of stopping")
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE,
                        help="characters per task sent to a worker; memory grows with chunk size x workers")
    args = parser.parse_args(argv)
    meta = prepare(args.name, args.tokenizer, args.out, args.val_fraction, args.source, args.vocab_size,
                   args.workers, args.seed, args.text_field, args.shards, args.chunk_size, args.tokenizer_from,
                   args.skip_bad)
    out = args.out or default_out_dir(args.name)
    print(
        f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"({meta['train_documents']:,} + {meta['val_documents']:,} {'conversations' if meta.get('chat') else 'documents'}), "
        f"vocab {meta['vocab_size']} ({meta['tokenizer']['type']}), {meta['dtype']}"
    )


if __name__ == "__main__":
    main()
