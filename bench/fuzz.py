"""
The fuzzing campaign: every reader of outside input is fed inputs that hypothesis builds (valid ones, damaged
copies of valid ones, and junk), and must either work or refuse with the project's one-line error: a UserError,
or an OSError (a file the system cannot read), which every command's runner (nanoforge.cli.command) prints as
one line. Any other exception is a failure (a traceback for the user), and so is an input that runs longer
than HANG_SECONDS or a reader that leaves a half-written file behind.

    python -m bench.fuzz --examples 10000                  # the long campaign, every reader
    python -m bench.fuzz --examples 200 --reader checkpoint

tests/test_fuzz.py runs the same readers with a few dozen inputs each on every test run (the server's in
tests/test_fuzz_server.py, apart, as serving changes often). docs/robustness.md gives the
long campaign's counts. The readers (what a user hands the project):
    config       a TOML config file plus --key=value overrides (nanoforge.config.build_config)
    data_dir     a prepared data directory: meta.json, the .bin files and their sizes (data.Dataset, batches,
                 evaluation.val_windows)
    checkpoint   a checkpoint file truncated, bit-flipped, with its header, info or tensors changed
                 (loading.load_model)
    tokenizer    a tokenizer's JSON description (tokenizer.tokenizer_from_dict, then encode and decode)
    corpus       a JSONL or Parquet corpus, plain or chat records (preparation.prepare into a fresh directory:
                 on refusal nothing complete-looking may be left there)
    hellaswag    a HellaSwag-format task file (hellaswag.load)
    server       serve.py's HTTP API: request bodies (chat, completions, explain, junk) and headers, through a real
                 server on 127.0.0.1 (every answer below 500 but a full queue's 503, and it keeps serving)
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoforge.errors import UserError

EXPECTED = (UserError, OSError)  # what the commands' runner turns into one line
HANG_SECONDS = 30


class Failure(Exception):
    """A reader's answer that is not the project's: a traceback, a hang, a message over several lines, a
    partial write."""


@contextlib.contextmanager
def time_limit(seconds):
    def expire(signum, frame):
        raise Failure(f"no answer within {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def answer(check, value, counts):
    """Run check(value); count 'worked' or 'refused'; anything else raises Failure (hypothesis then shrinks
    the input and reports it)."""
    counts["inputs"] += 1
    try:
        with time_limit(HANG_SECONDS), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            check(value)
    except EXPECTED as e:
        message = str(e)
        if "\n" in message.strip() or not message.strip():
            raise Failure(f"{type(e).__name__} without a one-line message: {message!r}") from e
        counts["refused"] += 1
        return
    except Failure:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001: every other exception (a Rust panic too) is what it looks for
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise Failure(f"{type(e).__name__}: {e} ({os.path.basename(frame.filename)}:{frame.lineno})") from e
    counts["worked"] += 1


# ----------------------------------------------------------------------------- building blocks

JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=20))
JSON = st.recursive(JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
# numbers near the edges of what a field may hold: 0, 1, negative, huge, fractional
EDGE_NUMBERS = st.sampled_from([0, 1, -1, 2, 3, 7, 16, 255, 256, 257, 65535, 65536, 2**31, 2**40, 10**18, 1.5,
                                float("inf"), float("nan")])
FIELD_VALUES = st.one_of(JSON, EDGE_NUMBERS)


def mutate_dict(base, draw):
    """base with a few fields replaced by, or added as, arbitrary JSON, or removed."""
    d = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(d) or ["x"]
        key = draw(st.one_of(st.sampled_from(keys), st.text(max_size=8)))
        if draw(st.booleans()) and key in d:
            del d[key]
        else:
            d[key] = draw(FIELD_VALUES)
    return d


def write(path, data):
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))


def corrupt_bytes(data, draw):
    """data truncated, extended, or with bits flipped."""
    kind = draw(st.sampled_from(["truncate", "flip", "append", "splice"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(max_size=32)) + data[at + draw(st.integers(0, 32)):]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(out) - 1))
        out[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


# ----------------------------------------------------------------------------- the readers

class Reader:
    """One reader of outside input: a hypothesis strategy of inputs and a check that feeds one to it.
    setup(workdir) builds whatever valid files the inputs are made from."""

    name = ""

    def setup(self, workdir):
        self.workdir = workdir

    def strategy(self):
        raise NotImplementedError

    def check(self, value):
        raise NotImplementedError

    def scratch(self):
        path = tempfile.mkdtemp(dir=self.workdir)
        return path


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 8


class ConfigReader(Reader):
    name = "config"

    def setup(self, workdir):
        super().setup(workdir)
        from nanoforge.config import KEYS

        self.keys = sorted(KEYS)

    def strategy(self):
        key = st.one_of(st.sampled_from(self.keys), st.text(max_size=12))
        value = st.one_of(st.integers(-2**40, 2**40), st.floats(), st.booleans(), st.text(max_size=12),
                          st.lists(st.integers(), max_size=3), EDGE_NUMBERS)
        toml = st.one_of(st.dictionaries(key, value, max_size=5).map(to_toml), st.text(max_size=80))
        override = st.tuples(key, st.one_of(st.text(max_size=12), EDGE_NUMBERS.map(str), st.sampled_from(
            ["true", "false", "cuda", "fsdp", "ddp", "1e-3", "-0", "nan", "inf", "1e308"])))
        overrides = st.lists(override.map(lambda kv: f"--{kv[0]}={kv[1]}"), max_size=4)
        return st.tuples(toml, overrides)

    def check(self, value):
        from nanoforge.config import build_config

        toml, overrides = value
        path = os.path.join(self.scratch(), "config.toml")
        write(path, toml)
        # data_dir points nowhere prepared: the depth dial then assumes GPT-2's vocabulary, as --plan does
        build_config(path, [f"--data_dir={os.path.join(self.workdir, 'none')}", *overrides])


def to_toml(values):
    """A TOML document of key = value lines (strings as JSON strings: TOML's basic strings read them)."""
    def literal(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float):
            return "nan" if v != v else "inf" if v == float("inf") else "-inf" if v == -float("inf") else repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(literal(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)
        return str(v)
    return "".join(f"{json.dumps(k)} = {literal(v)}\n" for k, v in values.items())


class DataDirReader(Reader):
    name = "data_dir"

    def setup(self, workdir):
        super().setup(workdir)
        from nanoforge.preparation import prepare

        quiet = contextlib.redirect_stderr(io.StringIO())
        corpus = os.path.join(workdir, "corpus.txt")
        write(corpus, TEXT)
        chat = os.path.join(workdir, "chat.jsonl")
        write(chat, "".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": f"yo {i}"}]}) + "\n"
                            for i in range(30)))
        self.templates = []
        with quiet:
            for source, kind in ((corpus, "char"), (chat, "byte")):
                out = os.path.join(workdir, f"template_{kind}")
                prepare(source, kind, out, 0.2, workers=1)
                self.templates.append(out)

    def strategy(self):
        @st.composite
        def damaged(draw):
            template = draw(st.sampled_from(self.templates))
            files = sorted(os.listdir(template))
            meta = json.load(open(os.path.join(template, "meta.json")))
            edits = {}
            for _ in range(draw(st.integers(1, 3))):
                name = draw(st.sampled_from(files))
                if name == "meta.json":
                    edits[name] = json.dumps(mutate_dict(meta, draw) if draw(st.integers(0, 4)) else draw(JSON))
                else:
                    data = open(os.path.join(template, name), "rb").read()
                    edits[name] = corrupt_bytes(data, draw) if data else draw(st.binary(max_size=16))
            return template, edits, draw(st.sampled_from([1, 8, 16, 64, 10**6]))
        return damaged()

    def check(self, value):
        from nanoforge.data import Dataset
        from nanoforge.evaluation import val_windows
        from nanoforge.tokenizer import tokenizer_from_dict

        template, edits, block_size = value
        directory = os.path.join(self.scratch(), "data")
        shutil.copytree(template, directory)
        for name, data in edits.items():
            write(os.path.join(directory, name), data)
        data = Dataset(directory, block_size)
        generator = torch.Generator().manual_seed(0)
        for split in ("train", "val"):
            x, y = data.get_batch(split, 2, generator)
            assert x.shape == y.shape and int(x.max()) < data.vocab_size
        tokenizer = tokenizer_from_dict(data.meta["tokenizer"])
        for _ in zip(range(50), val_windows(directory, tokenizer, block_size)):
            pass


class CheckpointReader(Reader):
    name = "checkpoint"

    def setup(self, workdir):
        super().setup(workdir)
        from model import GPT, GPTConfig
        from nanoforge import checkpoint
        from nanoforge.tokenizer import ByteTokenizer

        self.paths = []
        for options in ({}, dict(pos_emb="rope", tie_embeddings=False, mlp="swiglu", n_kv_head=1)):
            torch.manual_seed(0)
            model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=264, **options))
            path = os.path.join(workdir, f"template_{len(self.paths)}.safetensors")
            checkpoint.save(path, model.state_dict(), {"model": dict(vars(model.config)),
                                                         "tokenizer": ByteTokenizer().to_dict(), "step": 1})
            self.paths.append(path)

    def strategy(self):
        @st.composite
        def damaged(draw):
            data = open(draw(st.sampled_from(self.paths)), "rb").read()
            (n,) = struct.unpack("<Q", data[:8])
            header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
            kind = draw(st.sampled_from(["bytes", "info", "header", "tensor"]))
            if kind == "bytes":
                return corrupt_bytes(data, draw)
            if kind == "info":  # the JSON info the checksum does not cover: model config and tokenizer
                info = json.loads(header["__metadata__"]["info"])
                part = draw(st.sampled_from(["model", "tokenizer", None]))
                if part is None:
                    info = draw(st.one_of(st.just(mutate_dict(info, draw)), JSON))
                else:
                    info[part] = draw(st.one_of(st.just(mutate_dict(info[part], draw)), JSON))
                header["__metadata__"]["info"] = json.dumps(info)
            elif kind == "header":
                header["__metadata__"] = {k: (draw(st.text(max_size=12)) if draw(st.booleans()) else v)
                                          for k, v in header["__metadata__"].items()}
            else:  # a tensor's entry: its shape, dtype or offsets
                name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
                field = draw(st.sampled_from(["shape", "dtype", "data_offsets"]))
                header[name][field] = draw(st.one_of(JSON, st.lists(st.integers(-2, 2**40), max_size=3)))
            text = json.dumps(header).encode()
            return struct.pack("<Q", len(text)) + text + body
        return damaged()

    def check(self, value):
        from nanoforge.loading import load_model

        path = os.path.join(self.scratch(), "model.safetensors")
        write(path, value)
        model, tokenizer = load_model(path, "cpu")
        model(torch.tensor([tokenizer.encode("hi")]))


class TokenizerReader(Reader):
    name = "tokenizer"

    def setup(self, workdir):
        super().setup(workdir)
        from nanoforge.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, with_chat_tokens

        bpe = BPETokenizer.train([TEXT], 300)
        self.valid = [CharTokenizer.train(TEXT).to_dict(), ByteTokenizer().to_dict(), bpe.to_dict(),
                      with_chat_tokens(ByteTokenizer()).to_dict()]

    def strategy(self):
        @st.composite
        def described(draw):
            base = draw(st.sampled_from(self.valid))
            if draw(st.integers(0, 4)) == 0:
                return draw(JSON)
            d = mutate_dict(base, draw)
            if "ranks" in d and isinstance(d["ranks"], str) and draw(st.booleans()):
                lines = d["ranks"].splitlines()
                i = draw(st.integers(0, len(lines) - 1))
                lines[i] = draw(st.text(max_size=20))
                d["ranks"] = "\n".join(lines)
            return d
        return st.tuples(described(), st.text(max_size=30))

    def check(self, value):
        from nanoforge.tokenizer import tokenizer_from_dict

        description, text = value
        tokenizer = tokenizer_from_dict(description)
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        tokenizer.decode(ids)


RECORD = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=30), FIELD_VALUES)}),
    st.fixed_dictionaries({"messages": st.one_of(
        st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system"]),
                                                          FIELD_VALUES),
                                        "content": st.one_of(st.text(max_size=20), FIELD_VALUES)}), max_size=4),
        JSON)}),
    st.fixed_dictionaries({"instruction": st.one_of(st.text(max_size=20), FIELD_VALUES),
                           "output": st.one_of(st.text(max_size=20), FIELD_VALUES)},
                          optional={"input": st.one_of(st.text(max_size=10), FIELD_VALUES)}),
    JSON)


class CorpusReader(Reader):
    name = "corpus"

    def strategy(self):
        line = st.one_of(RECORD.map(lambda r: json.dumps(r).encode()), st.binary(max_size=30))
        document = st.fixed_dictionaries({"text": st.text(min_size=1, max_size=20)}).map(lambda r: json.dumps(r).encode())
        jsonl = st.one_of(st.lists(line, min_size=0, max_size=8),
                          st.lists(document, min_size=10, max_size=20),  # enough documents for both splits
                          st.tuples(st.lists(document, min_size=10, max_size=20), line).map(lambda p: p[0] + [p[1]]))
        jsonl = jsonl.map(lambda lines: b"\n".join(lines))
        parquet = st.lists(st.one_of(st.text(max_size=20), st.none()), max_size=16)
        return st.tuples(st.sampled_from(["jsonl", "parquet"]), jsonl, parquet,
                         st.sampled_from(["char", "byte"]), st.sampled_from(["text", "content", "messages"]),
                         st.booleans())

    def check(self, value):
        from nanoforge.preparation import prepare

        kind, jsonl, column, tokenizer, field, skip_bad = value
        directory = self.scratch()
        path = os.path.join(directory, f"corpus.{kind}")
        if kind == "jsonl":
            write(path, jsonl)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({field: pa.array(column, pa.string())}), path)
        out = os.path.join(directory, "out")
        try:
            prepare(path, tokenizer, out, 0.2, workers=1, text_field=field, skip_bad=skip_bad)
        except EXPECTED:
            left = [n for n in os.listdir(out) if n == "meta.json" or n.endswith(".tmp")] if os.path.isdir(out) else []
            if left:
                raise Failure(f"refused, but left {left} in the output directory (a partial write)")
            raise
        from nanoforge.data import read_meta

        read_meta(out)


class HellaswagReader(Reader):
    name = "hellaswag"

    def strategy(self):
        valid = st.fixed_dictionaries({"ctx": st.text(max_size=20), "label": st.sampled_from([0, 1, "1"]),
                                       "endings": st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=4)})
        example = st.one_of(valid, st.fixed_dictionaries({
            "ctx": st.one_of(st.text(max_size=20), FIELD_VALUES),
            "endings": st.one_of(st.lists(st.text(max_size=8), max_size=5), JSON),
            "label": st.one_of(st.integers(-2, 5), st.text(max_size=3), FIELD_VALUES)}))
        line = st.one_of(example.map(lambda r: json.dumps(r).encode()), st.binary(max_size=30),
                         JSON.map(lambda r: json.dumps(r).encode()))
        return st.tuples(st.lists(line, max_size=5).map(lambda lines: b"\n".join(lines)),
                         st.one_of(st.none(), st.integers(0, 5)))

    def check(self, value):
        from nanoforge import hellaswag

        data, limit = value
        path = os.path.join(self.scratch(), "hellaswag.jsonl")
        write(path, data)
        hellaswag.load(path, limit)


class ServerReader(Reader):
    """serve.py itself, in a subprocess on a free port of 127.0.0.1 (as a user runs it), with a tiny random chat
    model: every request body and header set gets an answer below 500, and the server keeps serving."""

    name = "server"
    PATHS = ["/v1/chat/completions", "/v1/completions", "/explain", "/v1/models", "/health"]

    def setup(self, workdir):
        super().setup(workdir)
        import httpx

        from model import GPT, GPTConfig
        from nanoforge import checkpoint
        from nanoforge.tokenizer import ByteTokenizer, with_chat_tokens

        tokenizer = with_chat_tokens(ByteTokenizer())
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32))
        path = os.path.join(workdir, "chat.safetensors")
        checkpoint.save(path, model.state_dict(), {"model": dict(vars(model.config)), "tokenizer": tokenizer.to_dict()})
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.log = open(os.path.join(workdir, "serve.log"), "w")
        self.process = subprocess.Popen([sys.executable, os.path.join(repo, "serve.py"), "--ckpt", path, "--port",
                                         str(port), "--device", "cpu"], stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(timeout=HANG_SECONDS)
        deadline = time.time() + 120
        while time.time() < deadline and self.process.poll() is None:
            try:
                if self.http.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("serve.py did not start")

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        self.http.close()
        self.log.close()

    def strategy(self):
        message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system"]),
                                                           FIELD_VALUES),
                                         "content": st.one_of(st.text(max_size=20), FIELD_VALUES)})
        chat = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=3), JSON)},
                                     optional={"max_tokens": st.one_of(st.integers(-2, 4), FIELD_VALUES),
                                               "temperature": FIELD_VALUES, "top_p": FIELD_VALUES,
                                               "stream": st.one_of(st.booleans(), FIELD_VALUES), "seed": FIELD_VALUES,
                                               "stop": st.one_of(st.text(max_size=3), JSON), "n": FIELD_VALUES,
                                               "logprobs": FIELD_VALUES, "top_logprobs": FIELD_VALUES,
                                               "model": st.one_of(st.text(max_size=8), FIELD_VALUES),
                                               "reply_ids": JSON, "step": FIELD_VALUES})
        completion = st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=20), JSON,
                                                                st.lists(st.integers(-5, 300), max_size=5))},
                                           optional={"max_tokens": st.one_of(st.integers(-2, 4), FIELD_VALUES),
                                                     "logprobs": FIELD_VALUES, "echo": FIELD_VALUES,
                                                     "stream": st.one_of(st.booleans(), FIELD_VALUES)})
        body = st.one_of(chat.map(lambda b: json.dumps(b).encode()), completion.map(lambda b: json.dumps(b).encode()),
                         JSON.map(lambda b: json.dumps(b).encode()), st.binary(max_size=40))
        # values an HTTP client sends (httpx itself refuses others: edge whitespace, other transfer codings)
        header_text = st.one_of(st.sampled_from(["application/json", "text/plain", "gzip", "100-continue",
                                                 "Bearer x", "*/*", "application/json; charset=latin-1"]),
                                st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30))
        headers = st.dictionaries(st.sampled_from(["Content-Type", "Accept", "Authorization", "Content-Encoding",
                                                   "Expect", "X-Request-Id", "Accept-Encoding"]),
                                  header_text, max_size=3)
        return st.tuples(st.sampled_from(["POST", "POST", "GET", "PUT"]), st.sampled_from(self.PATHS), body, headers)

    def check(self, value):
        import httpx

        method, path, body, headers = value
        try:
            r = self.http.request(method, self.url + path, content=body, headers=headers)
        except httpx.TransportError as e:
            raise Failure(f"{method} {path} got no answer ({type(e).__name__}: {e})") from None
        if r.status_code >= 500 and r.status_code != 503:  # 503: a full queue, which a client may retry
            raise Failure(f"{method} {path} answered {r.status_code}: {r.text[:200]}")
        if r.status_code >= 400 and "error" not in r.json():
            raise Failure(f"{method} {path} answered {r.status_code} without an error object: {r.text[:200]}")
        if self.http.get(self.url + "/health").status_code != 200:
            raise Failure("the server stopped serving")


READERS = {reader.name: reader for reader in (ConfigReader(), DataDirReader(), CheckpointReader(),
                                              TokenizerReader(), CorpusReader(), HellaswagReader(), ServerReader())}


def campaign(reader, examples, workdir, counts, seed=None):
    """Feed `examples` inputs to one reader, counting them in counts {inputs, worked, refused}. A failure
    raises (hypothesis shrinks the input first: the exception names the smallest input it found)."""
    reader.setup(workdir)
    try:
        run(reader, examples, counts, seed)
    finally:
        if hasattr(reader, "close"):
            reader.close()


def run(reader, examples, counts, seed):
    run_settings = settings(max_examples=examples, deadline=None, database=None, derandomize=seed is not None,
                            suppress_health_check=list(HealthCheck), print_blob=True)

    @run_settings
    @given(reader.strategy())
    def one(value):
        answer(reader.check, value, counts)

    one()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000, help="inputs per reader (default 1000)")
    parser.add_argument("--reader", choices=sorted(READERS), action="append", help="only this reader (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"fuzz: {args.examples} inputs per reader; python {sys.version.split()[0]}, torch {torch.__version__}")
    failed = False
    for name in args.reader or READERS:
        start = time.time()
        counts = Counter()
        with tempfile.TemporaryDirectory() as workdir:
            try:
                campaign(READERS[name], args.examples, workdir, counts)
                verdict = "no failure"
            except Exception as e:  # noqa: BLE001: report it and go on to the next reader
                found = e.exceptions if isinstance(e, BaseExceptionGroup) else [e]
                verdict, failed = f"FAILED: {len(found)} distinct failure(s):\n  " + "\n  ".join(
                    f"{type(x).__name__}: {str(x)[:300]}" + "".join(f"\n    {note[:600]}" for note in
                                                                     getattr(x, "__notes__", []))
                    for x in found), True
        print(f"{name:<11} {counts['inputs']:>7} inputs: {counts['worked']:>6} worked, {counts['refused']:>6} "
              f"refused with one line; {verdict} ({time.time() - start:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
