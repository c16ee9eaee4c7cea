"""How a training run stops: on a signal, or when it stalls; each time saying so in one line.

Signals (SIGTERM from a scheduler or a preemption, SIGINT from Ctrl-C):
- the first is answered at once, in one line, and the loop stops after the step under way,
  saving it (loop.Interrupted: exit 128 + the signal's number);
- a second ends the process within a second wherever it is (compiling, inside a compiled step,
  waiting for a checkpoint write), in one line saying what was kept; exit 128 + its number.
Python runs a signal handler only between two bytecodes of the main thread, so while XLA holds
the main thread (a compilation, a long step) the handler waits as long. The C-level handler runs
at once, though, and writes the signal's number to the wakeup file descriptor
(signal.set_wakeup_fd); a thread reading that pipe answers (XLA releases the GIL while it
compiles and runs).

Stalls: the loop says what it is doing as it goes (`beat`); when nothing new is said for
train.stall_timeout seconds, a thread names what the run was doing and ends the process with
EXIT_STALLED; time the process spends suspended (SIGSTOP, a host asleep) is not a stall.
Checkpoints are written to a temporary folder and renamed when complete, so the
last complete one is intact.

With several processes, JAX's preemption service hears SIGTERM and agrees on the step at which
every process stops; SIGINT is passed on to it as a SIGTERM, and a second SIGINT ends this process.
"""

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
from jax.experimental import multihost_utils

EXIT_STALLED = 4


def say(line: str) -> None:
    """One line on stderr, written at once (also from a thread, also right before os._exit)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class RunGuard(contextlib.AbstractContextManager):
    """Signals and the stall watchdog of one run (see the module's docstring).

    `kept()` says, at the moment it is called, what the run leaves on disk (e.g. "checkpoint 40
    is the last one kept"); `prog` starts every line."""

    def __init__(self, stall_timeout: float, kept: Callable[[], str], prog: str = "fwpzoo train"):
        self.stall_timeout, self.kept, self.prog = stall_timeout, kept, prog
        self.signum = None  # the first signal, once heard
        self.doing, self.since = "starting", time.monotonic()
        self.several = jax.process_count() > 1
        self._handlers = {}  # signal -> the handler it had before
        self._heard = 0
        self._done = threading.Event()
        self._write_fd = self._previous_fd = None

    def beat(self, doing: str) -> None:
        """The run is now `doing` this (e.g. "running step 7"); restarts the stall clock."""
        self.doing, self.since = doing, time.monotonic()

    def requested(self, step: int) -> bool:
        """Whether the run must stop after `step` (every process agrees on the step)."""
        if not self.several:
            return self.signum is not None
        if multihost_utils.reached_preemption_sync_point(step):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._listen()
        threading.Thread(target=self._watch, name="fwpzoo-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc_info):
        self._done.set()
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}
        if self._write_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
            os.close(self._write_fd)  # the reader sees the end of the pipe and returns
            self._write_fd = None

    def _listen(self) -> None:
        # several processes: SIGTERM belongs to the preemption service
        signums = (signal.SIGINT,) if self.several else (signal.SIGINT, signal.SIGTERM)
        for signum in signums:
            self._handlers[signum] = signal.signal(signum, self._record)
        read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        reader.start()

    def _record(self, signum, frame) -> None:
        """The Python-level handler: runs in the main thread between bytecodes, so the loop's next
        `requested` sees the signal even when the reading thread has not run yet."""
        if self.signum is None:
            self.signum = signum

    def _read(self, read_fd: int) -> None:
        with contextlib.closing(os.fdopen(read_fd, "rb", buffering=0)) as pipe:
            while data := pipe.read(64):
                for signum in data:
                    if signum in self._handlers:
                        self._answer(signum)

    def _answer(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self._heard += 1
        if self._heard == 1:
            self._record(signum, None)
            say(
                f"{self.prog}: {name} while {self.doing}: stopping after the step under way, "
                "which is saved first; a second signal stops at once without saving"
            )
            if self.several:
                os.kill(os.getpid(), signal.SIGTERM)  # to the preemption service
            return
        say(f"{self.prog}: second {name} while {self.doing}: stopped at once; {self.kept()}")
        os._exit(128 + signum)

    def _watch(self) -> None:
        period = min(self.stall_timeout / 4, 5.0)
        last = awake_since = time.monotonic()
        while not self._done.wait(period):
            now = time.monotonic()
            # a wait that overran by far: the process was suspended (SIGSTOP, a host asleep), so
            # the time since the last beat is not the run's; its stall clock restarts on waking
            if now - last > 2 * period + 1.0:
                awake_since = now
            last = now
            idle = now - max(self.since, awake_since)
            if idle > self.stall_timeout:
                say(
                    f"{self.prog}: no progress for {idle:.0f} s while {self.doing} "
                    f"(train.stall_timeout={self.stall_timeout:g}); stopped; {self.kept()}"
                )
                os._exit(EXIT_STALLED)
