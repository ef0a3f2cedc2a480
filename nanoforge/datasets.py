"""
The built-in datasets by name: where each comes from (pinned URLs and sha256 checksums), resumable
downloads, and the Source for a name, a file, a directory or a glob pattern.
"""

import glob
import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request

from tqdm import tqdm

from nanoforge.sources import (
    CHUNK_SIZE,
    PrepareError,
    files_source,
    stdlib_source,
    text_file_source,
)

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# The Hugging Face API lists a folder's files with their sizes and sha256 (Git LFS object ids).
FINEWEB_EDU_API = "https://huggingface.co/api/datasets/HuggingFaceFW/fineweb-edu/tree/main/sample/10BT"
FINEWEB_EDU_URL = "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/"
# Databricks Dolly 15k (CC BY-SA 3.0): 15,011 human-written instruction/response pairs, one JSONL file.
# The revision is pinned: its sha256 is the Git LFS object id the API lists for the file at that commit,
# which no later push can change (we could not read the hash itself without network when writing this).
DOLLY_REVISION = "bdd27f4d94b9c1f951818a7da7fd7aeea5dbff1a"
DOLLY_FILE = "databricks-dolly-15k.jsonl"
DOLLY_API = f"https://huggingface.co/api/datasets/databricks/databricks-dolly-15k/tree/{DOLLY_REVISION}"
DOLLY_URL = f"https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/{DOLLY_REVISION}/{DOLLY_FILE}"

# GSM8K (Cobbe et al. 2021, MIT): grade-school maths word problems, for rl.py and eval.py's --task gsm8k. The
# files are pinned to a commit of OpenAI's repository, whose bytes these sha256 digests are.
GSM8K_COMMIT = "3101c7d5072418e28b9008a6636bde82a006892c"
GSM8K_URL = f"https://raw.githubusercontent.com/openai/grade-school-math/{GSM8K_COMMIT}/grade_school_math/data/"
GSM8K_SHA256 = {"train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
                "test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"}

# name -> (default tokenizer, what it is)
BUILTINS = {
    "pystdlib": ("char", "this Python's standard-library sources (offline)"),
    "shakespeare_char": ("char", "tinyshakespeare, character-level"),
    "shakespeare": ("gpt2", "tinyshakespeare, GPT-2 BPE"),
    "fineweb_edu": ("gpt2", "FineWeb-Edu 10BT sample, GPT-2 BPE"),
    "chat_tasks": ("char", "small generated tasks for chat fine-tuning (offline)"),
    "dolly": ("gpt2", "Databricks Dolly 15k instructions and responses, for chat fine-tuning"),
    "arithmetic": ("char", "generated addition and multiplication, half the replies calling the calculator, for "
                   "chat fine-tuning before rl.py (offline)"),
}


# ---------------------------------------------------------------------------------------------
# Downloads: resumable (HTTP Range into a .part file) and checksummed


def sha256_of_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class DownloadError(PrepareError):
    """The file could not be fetched: no network, or the server refused it. `problem` says which; the message
    adds the way out, a local copy (callers with another flag for it, such as eval.py's --data, say their own)."""

    def __init__(self, problem, fix="pass --source PATH to a local copy of the file"):
        super().__init__(f"{problem}: {fix}")
        self.problem = problem


# What a failing network raises; any other OSError while downloading is this machine's (a full disk, a
# directory we may not write), and gets its own message.
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)


def offline_error(url, e):
    if isinstance(e, urllib.error.HTTPError):
        return DownloadError(f"could not download {url}: the server answered {e.code} {e.reason}")
    return DownloadError(f"could not download {url} ({getattr(e, 'reason', e)}; no network?)")


def write_error(path, e):
    return PrepareError(f"could not write '{path}' ({e.strerror or e}): free some space or choose another --out "
                        "(what was downloaded is kept, and the download resumes from it)")


def download(url, sha256, dest, digest=sha256_of_file):
    """Fetch url into dest, verifying its sha256 (or what digest(path) returns, for a file pinned by
    another hash). An interrupted download resumes from dest.part with an HTTP Range request; a good copy
    already at dest is reused."""
    if os.path.isfile(dest) and digest(dest) == sha256:
        return dest
    tmp = dest + ".part"
    have = os.path.getsize(tmp) if os.path.isfile(tmp) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            if have and getattr(response, "status", 200) != 206:
                have = 0  # the server ignored the Range header: start again
            total = int(response.headers.get("Content-Length") or 0) + have or None
            with open(tmp, "ab" if have else "wb") as out, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(dest), leave=False
            ) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except NETWORK_ERRORS as e:
        raise offline_error(url, e) from None
    except OSError as e:
        raise write_error(tmp, e) from None
    got = digest(tmp)
    if got != sha256:
        os.remove(tmp)
        kind = "sha256" if digest is sha256_of_file else digest.__name__
        raise PrepareError(f"download of {url} has {kind} {got}, expected {sha256}: the file changed or was corrupted")
    os.replace(tmp, dest)
    return dest


def hf_listing(api_url):
    """A Hugging Face API folder listing: [{"path", "size", "lfs": {"oid": sha256, ...}}, ...]."""
    try:
        with urllib.request.urlopen(api_url, timeout=30) as response:
            return json.load(response)
    except NETWORK_ERRORS as e:
        raise offline_error(api_url, e) from None


def download_dolly(download_dir):
    """Download Dolly 15k at its pinned revision, checked against the sha256 the API lists for it."""
    listed = [f for f in hf_listing(DOLLY_API) if f.get("path") == DOLLY_FILE and "lfs" in f]
    if not listed:
        raise PrepareError(f"{DOLLY_API} does not list {DOLLY_FILE}: pass --source PATH to a local copy of it")
    os.makedirs(download_dir, exist_ok=True)
    return download(DOLLY_URL, listed[0]["lfs"]["oid"], os.path.join(download_dir, DOLLY_FILE))


def fineweb_edu_shards(download_dir, shards):
    """Download the first `shards` parquet files of FineWeb-Edu's 10BT sample (all when None)."""
    listing = hf_listing(FINEWEB_EDU_API)
    files = sorted((f for f in listing if f.get("path", "").endswith(".parquet")), key=lambda f: f["path"])
    if not files:
        raise PrepareError(f"{FINEWEB_EDU_API} lists no parquet files: the dataset layout changed")
    os.makedirs(download_dir, exist_ok=True)
    paths = []
    for f in tqdm(files[:shards], desc="shards", unit="shard", disable=len(files[:shards]) < 2):
        dest = os.path.join(download_dir, os.path.basename(f["path"]))
        paths.append(download(FINEWEB_EDU_URL + f["path"], f["lfs"]["oid"], dest))
    return paths


def gsm8k_files(download_dir):
    """(train, test) paths of GSM8K's two JSONL files, downloaded once into download_dir (resumably, checked)."""
    os.makedirs(download_dir, exist_ok=True)
    fix = "pass a local copy of a GSM8K JSONL file (eval.py --data FILE.jsonl, rl.py --task_data=FILE.jsonl)"
    paths = []
    for name in ("train.jsonl", "test.jsonl"):
        try:
            paths.append(download(GSM8K_URL + name, GSM8K_SHA256[name], os.path.join(download_dir, name)))
        except DownloadError as e:
            raise DownloadError(e.problem, fix) from None
    return tuple(paths)


def tinyshakespeare(source_path, out_dir):
    if not source_path:
        os.makedirs(out_dir, exist_ok=True)
        return download(TINYSHAKESPEARE_URL, TINYSHAKESPEARE_SHA256, os.path.join(out_dir, "input.txt"))
    if sha256_of_file(source_path) != TINYSHAKESPEARE_SHA256:
        raise PrepareError(
            f"'{source_path}' is not tinyshakespeare (sha256 {sha256_of_file(source_path)}, "
            f"expected {TINYSHAKESPEARE_SHA256}): pass the unmodified input.txt"
        )
    return source_path


def open_source(name, source_path, out_dir, val_fraction, text_field="text", shards=None, chunk_size=CHUNK_SIZE):
    """The Source for a built-in name, a file, a directory or a glob pattern."""
    if name == "pystdlib":
        return stdlib_source(val_fraction, chunk_size)
    if name in ("shakespeare_char", "shakespeare"):
        path = tinyshakespeare(source_path, out_dir)
        return text_file_source(path, {"name": "tinyshakespeare", "url": TINYSHAKESPEARE_URL}, val_fraction, chunk_size)
    if name == "fineweb_edu":
        if source_path:
            paths = sorted(glob.glob(os.path.join(source_path, "*.parquet")))[:shards]
            if not paths:
                raise PrepareError(f"no .parquet files in '{source_path}': pass the directory of downloaded shards")
        else:
            paths = fineweb_edu_shards(os.path.join(out_dir, "download"), shards)
        return files_source(paths, {"name": "fineweb_edu", "url": FINEWEB_EDU_API, "shards": len(paths)}, "text", chunk_size)
    if os.path.isfile(name):
        description = {"name": os.path.abspath(name)}
        if name.endswith((".jsonl", ".parquet")):
            return files_source([name], description, text_field, chunk_size)
        return text_file_source(name, description, val_fraction, chunk_size)
    if os.path.isdir(name):
        paths = glob.glob(os.path.join(name, "**", "*"), recursive=True)
    else:
        paths = glob.glob(name, recursive=True) if glob.has_magic(name) else []
    paths = sorted(p for p in paths if os.path.isfile(p))
    if not paths:
        raise PrepareError(
            f"'{name}' is neither a built-in dataset ({', '.join(BUILTINS)}) nor an existing file, "
            "directory or glob pattern matching files"
        )
    return files_source(paths, {"name": os.path.abspath(name) if os.path.isdir(name) else name}, text_field, chunk_size)
