"""The short fuzzing campaign on serve.py's HTTP API (bench/fuzz.py's server reader): request bodies for chat,
completions and explain (valid, damaged, junk) and headers, sent to a real serve.py on 127.0.0.1. Every answer
is below 500 (but a full queue's 503) with an error object for a 4xx, and the server keeps serving. Kept apart
from tests/test_fuzz.py because serving changes often: adapt the strategy in bench/fuzz.py with the API."""

from collections import Counter

from bench import fuzz


def test_serve_answers_every_request_below_500_and_keeps_serving(tmp_path):
    counts = Counter()
    fuzz.campaign(fuzz.READERS["server"], 40, str(tmp_path), counts, seed=0)
    assert counts["inputs"] == counts["worked"] > 0
