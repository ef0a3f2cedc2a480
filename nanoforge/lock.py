"""
An exclusive lock on an output directory, so that two processes never write into the same one.

train.py holds it on its out_dir and prepare.py on its --out for as long as they run. It is an OS
file lock (flock) on DIR/.lock: the kernel releases it when the process ends, however it ends
(kill -9 included), so a lock is never left behind. The file keeps the holder's PID for the error
message. A clean exit removes it; after a kill it stays, unlocked, and means nothing.
"""

import contextlib
import fcntl
import os

from nanoforge.errors import UserError


class DirectoryInUse(UserError):
    """Another live process holds the directory's lock."""


class DirectoryLock:
    def __init__(self, directory, what, fix):
        """what: the command (for the message), fix: what the user should do when the directory is taken."""
        self.path = os.path.join(directory, ".lock")
        self.directory, self.what, self.fix = directory, what, fix
        self.file = None

    def __enter__(self):
        self.created = not os.path.isdir(self.directory)
        while True:
            os.makedirs(self.directory, exist_ok=True)
            try:
                f = open(self.path, "a+")
            except FileNotFoundError:  # a holder that had created the directory removed it as we came
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise DirectoryInUse(f"'{self.directory}' is in use by another {self.what} (PID {holder}): "
                                     f"{self.fix}") from None
            if self.still_linked(f):
                break
            f.close()  # the holder removed this file as we opened it: lock the file at the path now
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f
        return self

    def still_linked(self, f):
        try:
            return os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc):
        with contextlib.suppress(FileNotFoundError):  # the directory was removed while we ran
            os.remove(self.path)  # while still holding the lock: a process that opened it sees it unlinked
        if self.created:  # an early error leaves no empty directory behind (a non-empty one stays)
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)
        self.file.close()  # closing the file releases the lock
        self.file = None
