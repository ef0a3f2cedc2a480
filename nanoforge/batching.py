"""
Serving many clients with one model: a bounded queue of jobs and one worker thread that decodes them together,
a row per job in the KV-cache slots of a slots.SlotDecoder.

    scheduler = Scheduler(generator, max_batch=16, max_queue=64)
    job = Job(prompt_ids, dict(max_new_tokens=50, temperature=0.8, top_p=1.0, seed=1, stop=[]), emit)
    scheduler.submit(job)  # QueueFull when max_queue live jobs are already waiting

Why this shape:
- Decoding one token costs about the same for 1 row as for 16 on a model this size (the step is bound by
  reading the weights, not by arithmetic), so requests decoded together multiply throughput.
- Continuous batching (the default): a waiting job takes a free slot at the next step, and a finished or
  cancelled row frees its slot at once, so a short request never waits for a long one to end. policy="static"
  admits a new batch only once the running one is done (a batch ends when its longest reply does): the
  baseline bench/serve_speed.py compares against, kept for that comparison.
- Each job keeps its own settings and seed, so a reply does not depend on what it was decoded with: the same
  seed gives the same reply alone or beside any others. A job whose settings are out of range, or whose row
  fails, gets its own error; the others go on.
- The queue is bounded and counts live jobs only: past max_queue waiting jobs, submit refuses (the server
  answers 503 with Retry-After) instead of letting latency grow without limit; a job cancelled while waiting
  leaves the queue at once.
- A generation job may carry a deadline (time.monotonic()); past it, waiting or running, it ends with finish
  reason "deadline" and what it has so far.
- A job with `run` set is not decoded: the worker calls run() between steps (model work for the server's "why"
  view), so it waits in the same bounded queue and never runs beside the decoding.
- A job with settings["tools"] (a chat model with the tool tokens) runs the calculator as
  engine.Generator.generate(tools=True) does, with the same replies for the same seed; its text events carry the
  reply's final text only (tools.ReplyText: no calls, outputs or tool tokens), and each call is reported apart.
- The worker reports through job.emit(event), called from its own thread: ("token", id, logprobs) for each
  generated token of the text (when the job asked for logprobs), ("text", piece) as text becomes final,
  ("call", expression, output, ids) when a call has been answered (ids: the call's tokens and its output's, as
  far as the reply got), ("done", Sample) at the end (or ("done", result) of run), or ("error", exception) when
  the job failed.
"""

import threading
import time
from dataclasses import dataclass, field

from nanoforge.engine import Sample
from nanoforge.slots import SlotDecoder

# When the first job arrives at an idle worker, wait this long for others sent at the same moment (a few
# clients started together) so they share the first steps; short next to a token's decode time.
GATHER_SECONDS = 0.005
POLICIES = ("continuous", "static")


class QueueFull(Exception):
    """max_queue jobs are already waiting."""


@dataclass
class Job:
    """One request: its prompt token ids, its settings (max_new_tokens, temperature, top_p, seed, stop,
    top_logprobs, None for no log-probabilities, and tools, True to run the calculator) and emit(event), called
    from the worker thread. deadline: a
    time.monotonic() past which it ends (None: none). run: work to do on the worker instead of decoding."""

    prompt_ids: list
    settings: dict
    emit: object
    deadline: float = None
    run: object = None
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)


class Scheduler:
    """One worker thread decoding the jobs in up to max_batch slots. stop_ids: token ids that end every reply
    (a chat model's engine.reply_end_ids). policy: "continuous" or "static" (the comparison baseline; see above)."""

    def __init__(self, generator, max_batch, max_queue, stop_ids=(), policy="continuous"):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.decoder = SlotDecoder(generator, max_batch, stop_ids)
        self.max_queue, self.policy = max_queue, policy
        self.waiting = []
        self.steps = 0  # decode steps so far, and the most rows decoded in one
        self.largest_batch = 0
        self.cancelled_waiting = 0  # jobs whose client went away before they got a slot
        self.changed = threading.Condition()
        self.closed = False
        self.worker = threading.Thread(target=self.work, name="nanoforge-batching", daemon=True)
        self.worker.start()

    @property
    def running(self):
        return len(self.decoder.rows)

    @property
    def cancelled(self):
        """Jobs whose client went away before they were done."""
        return self.cancelled_waiting + self.decoder.cancelled

    def submit(self, job):
        with self.changed:
            self.drop_cancelled()
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(job)
            self.changed.notify()

    def cancel(self, job):
        """The job's client went away: a waiting job leaves the queue now, a running one at the next step."""
        job.cancelled = True
        with self.changed:
            self.drop_cancelled()

    def drop_cancelled(self):
        live = [job for job in self.waiting if not job.cancelled]
        self.cancelled_waiting += len(self.waiting) - len(live)
        self.waiting = live

    def close(self):
        with self.changed:
            self.closed = True
            self.changed.notify()
        self.worker.join(timeout=10)

    def admit(self):
        """The waiting jobs that may start now, oldest first: as many as there are free slots (static: only when
        every slot is free). Called holding the lock."""
        self.drop_cancelled()
        if self.policy == "static" and self.decoder.rows:
            return []
        free = self.decoder.slots - len(self.decoder.rows)
        jobs, self.waiting = self.waiting[:free], self.waiting[free:]
        return jobs

    def next_jobs(self):
        """Wait until there is work; return the jobs to start now (None once closed)."""
        with self.changed:
            idle = not self.decoder.rows
            while not self.waiting and not self.decoder.rows and not self.closed:
                self.changed.wait()
            if self.closed:
                return None
        if idle:
            time.sleep(GATHER_SECONDS)
        with self.changed:
            return self.admit()

    def work(self):
        while (jobs := self.next_jobs()) is not None:
            for job in jobs:
                self.start(job)
            if self.decoder.rows:
                self.largest_batch = max(self.largest_batch, len(self.decoder.rows))
                try:
                    self.decoder.step()
                except Exception as e:  # the forward pass failed: every row in it ends with the error
                    for row in list(self.decoder.rows):
                        self.decoder.free(row)
                        row.job.emit(("error", e))
                self.steps += 1

    def start(self, job):
        if job.run is None and job.deadline is not None and time.monotonic() > job.deadline:  # waited too long
            job.emit(("done", Sample(list(job.prompt_ids), [], "", "deadline", [], [])))
        elif job.run is not None:
            try:
                job.emit(("done", job.run()))
            except Exception as e:
                job.emit(("error", e))
        else:
            self.decoder.add(job)
