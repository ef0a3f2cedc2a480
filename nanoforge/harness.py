"""
The bridge to EleutherAI's lm-evaluation-harness (pip install -e '.[harness]'): any checkpoint of ours, or a
GPT-2 directory, as the harness's `LM`, so its tasks run on architectures that Hugging Face's GPT-2 class
cannot hold (rotary, RMSNorm, QK-norm, an untied head, ...).

    loglikelihood          multiple_choice.continuation_logprobs, on the harness's own split of context and
                           continuation (multiple_choice.encode_pair), so the numbers are its HFLM's
    loglikelihood_rolling  a whole text in windows of block_size, every token predicted once (the harness's
                           own rolling-window helpers), from the start token
    generate_until         greedy decoding through the engine (nanoforge.engine.Generator), stopping at
                           the request's `until` strings or after max_gen_toks tokens

run_tasks calls lm_eval.simple_evaluate; a directory of task YAML files (include_path) adds tasks of one's
own, for instance over a local JSON file, as the tests do offline.
"""

from nanoforge.engine import Generator
from nanoforge.errors import UserError
from nanoforge.multiple_choice import (ACC_NORM_CONVENTION, HARNESS_ACC_NORM_CONVENTION, continuation_logprobs, encode_pair,
                                       start_ids)

try:
    from lm_eval.api.model import LM
except ImportError:  # the bridge is an optional extra: LM stands in so this module imports without it
    LM = object

DEFAULT_MAX_GEN_TOKS = 256  # the harness's own default


class HarnessError(UserError):
    """lm-evaluation-harness missing, or a task it cannot find; the message says what to do."""


def require_lm_eval():
    if LM is object:
        raise HarnessError("--harness needs lm-evaluation-harness: pip install -e '.[harness]' "
                           "(or pip install lm-eval)")


class NanoforgeLM(LM):
    """A model of ours (eval mode) and its tokenizer, as lm-evaluation-harness's LM."""

    def __init__(self, model, tokenizer, batch_size=32):
        require_lm_eval()
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    def loglikelihood(self, requests):
        pairs = [encode_pair(self.tokenizer, context, continuation) for context, continuation in
                 (r.args for r in requests)]
        return continuation_logprobs(self.model, pairs, self.batch_size, self.tokenizer.vocab_size)

    def loglikelihood_rolling(self, requests):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []  # every window of every text, and the text it belongs to
        for i, request in enumerate(requests):
            ids = self.tokenizer.encode(request.args[0])
            for window in get_rolling_token_windows(ids, start_ids(self.tokenizer)[0],
                                                    self.model.config.block_size, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, continuation_logprobs(self.model, windows, self.batch_size,
                                                                        self.tokenizer.vocab_size)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests):
        """Greedy continuations, batched by identical generation settings (the harness sends one task's
        requests with the same ones)."""
        generator = Generator(self.model, self.tokenizer)
        groups = {}  # settings -> indices of the requests that use them
        for i, request in enumerate(requests):
            settings = dict(request.args[1])
            until = settings.get("until") or []
            key = (tuple([until] if isinstance(until, str) else until),
                   int(settings.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)))
            groups.setdefault(key, []).append(i)
        texts = [None] * len(requests)
        for (until, max_new_tokens), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                samples = generator.generate([requests[i].args[0] for i in chunk], max_new_tokens=max_new_tokens,
                                             temperature=0, stop=until)
                for i, sample in zip(chunk, samples):
                    texts[i] = sample.text
        return texts


def run_tasks(model, tokenizer, tasks, limit=None, include_path=None, batch_size=32):
    """lm_eval.simple_evaluate over the named tasks; returns (its results dict, its table as text)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HarnessError(f"lm-evaluation-harness has no task {unknown[0]!r}: see `lm_eval ls tasks`, or pass "
                           "a directory of task YAML files with --harness-include DIR")
    results = simple_evaluate(model=NanoforgeLM(model, tokenizer, batch_size), tasks=tasks, limit=limit,
                              task_manager=manager, log_samples=False)
    table = make_table(results)
    for task in results["results"].values():  # the JSON, like the table, says which acc_norm this is
        if any(key.startswith("acc_norm") for key in task):
            task["acc_norm_convention"] = HARNESS_ACC_NORM_CONVENTION
    if "acc_norm" in table:
        table = table.rstrip("\n") + f"\nacc_norm above: {HARNESS_ACC_NORM_CONVENTION}; eval.py --task's is {ACC_NORM_CONVENTION}"
    return results, table
