"""
Serving many clients with one model: a bounded queue of generation jobs and one worker thread that
decodes the jobs waiting together as one batch through the engine (engine.Generator.generate).

    scheduler = Scheduler(generator, max_batch=16, max_queue=64)
    job = Job(prompt_ids, dict(max_new_tokens=50, temperature=0.8, top_p=1.0, seed=1, stop=[]), emit)
    scheduler.submit(job)  # QueueFull when max_queue jobs are already waiting

Why this shape:
- Decoding one token costs about the same for 1 row as for 16 on a model this size (the step is bound
  by reading the weights, not by arithmetic), so requests decoded together multiply throughput. The
  worker takes every waiting job (up to max_batch) at once; jobs that arrive while a batch runs wait
  for the next one (static batching: simple, and a batch ends when its longest reply does).
- Each job keeps its own settings and seed (the engine's per-row settings), so a reply does not
  depend on what it was batched with: the same seed gives the same reply alone or in a batch.
- The queue is bounded: past max_queue waiting jobs, submit refuses (the server answers 503 with
  Retry-After) instead of letting latency grow without limit.
- A job whose client went away is marked cancelled; the engine ends its row at the next step.
- The worker reports through job.emit(event), called from its own thread: ("token", id, logprobs)
  for each generated token (when the job asked for logprobs), ("text", piece) as text becomes final,
  ("done", Sample) at the end, or ("error", exception) when the batch failed.
"""

import threading
import time
from dataclasses import dataclass, field

# After the first job of a batch arrives, wait this long for others sent at the same moment (a few
# clients started together) so they share the batch; short next to a token's decode time.
GATHER_SECONDS = 0.005


class QueueFull(Exception):
    """max_queue jobs are already waiting."""


@dataclass
class Job:
    """One request: its prompt token ids, its settings (max_new_tokens, temperature, top_p, seed, stop and
    top_logprobs, None for no log-probabilities) and emit(event), called from the worker thread."""

    prompt_ids: list
    settings: dict
    emit: object
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)


class Scheduler:
    """One worker thread decoding batches of waiting jobs with generator. stop_ids: token ids that end
    every reply (a chat model's chat tokens)."""

    def __init__(self, generator, max_batch, max_queue, stop_ids=()):
        self.generator, self.max_batch, self.max_queue = generator, max_batch, max_queue
        self.stop_ids = list(stop_ids)
        self.waiting = []
        self.running = 0  # jobs in the batch being decoded
        self.batches = 0  # batches decoded so far, and the size of the largest
        self.largest_batch = 0
        self.cancelled = 0  # jobs whose client went away before they were done
        self.changed = threading.Condition()
        self.closed = False
        self.worker = threading.Thread(target=self.work, name="nanoforge-batching", daemon=True)
        self.worker.start()

    def submit(self, job):
        with self.changed:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(job)
            self.changed.notify()

    def close(self):
        with self.changed:
            self.closed = True
            self.changed.notify()
        self.worker.join(timeout=10)

    def next_batch(self):
        """Wait for jobs; return up to max_batch of them, oldest first (None once closed)."""
        with self.changed:
            while not self.waiting and not self.closed:
                self.changed.wait()
            if self.closed:
                return None
        time.sleep(GATHER_SECONDS)
        with self.changed:
            jobs = [job for job in self.waiting[: self.max_batch] if not job.cancelled]
            self.cancelled += len(self.waiting[: self.max_batch]) - len(jobs)
            del self.waiting[: self.max_batch]
            self.running = len(jobs)
            return jobs

    def work(self):
        while (jobs := self.next_batch()) is not None:
            if jobs:
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(jobs))
                self.decode(jobs)
            with self.changed:
                self.running = 0

    def decode(self, jobs):
        """Generate every job's reply in one batch; an error goes to each job, and the worker goes on."""
        settings = {key: [job.settings[key] for job in jobs]
                    for key in ("max_new_tokens", "temperature", "top_p", "seed", "stop")}
        wanted = [job.settings["top_logprobs"] for job in jobs]
        tokens = {}
        if any(k is not None for k in wanted):
            tokens = dict(on_token=lambda b, token, logprobs: jobs[b].emit(("token", token, logprobs))
                          if wanted[b] is not None else None,
                          top_logprobs=max(k or 0 for k in wanted))
        try:
            samples = self.generator.generate(
                [job.prompt_ids for job in jobs], **settings, stop_ids=self.stop_ids,
                on_text=lambda b, text, done: jobs[b].emit(("text", text)) if text else None,
                cancelled=lambda b: jobs[b].cancelled, **tokens)
        except Exception as e:  # a failed batch must not take the server down with it
            for job in jobs:
                job.emit(("error", e))
            return
        for job, sample in zip(jobs, samples):
            self.cancelled += sample.finish_reason == "cancelled"
            job.emit(("done", sample))
