"""An opt-in sampling profiler for a server worker (KAIROS_PROFILE_OUT, read by serving.settings).

cProfile sees one thread; a worker's request runs on the event loop (HTTP, BentoML, middleware) and on a pipeline
thread. Every `interval_s` this thread reads every other thread's Python stack (`sys._current_frames`) and counts
each stack; threads parked in a wait (selector, lock, queue, sleep) are counted apart as idle. `dump` writes the
busy stacks in the collapsed format (`frame;frame;leaf count`, flamegraph.pl reads it) and a table of functions by
own and inclusive samples, so HTTP's share of a request is read against the pipeline's.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from types import FrameType

# leaf functions that mean the thread is waiting, not running Python (the GIL is released there)
IDLE_LEAVES = frozenset({"select", "wait", "_worker", "get", "sleep", "run_forever", "_run_once", "poll",
                         "accept", "recv", "read", "readline", "_wait_for_tstate_lock", "acquire", "join", "xread",
                         "read_from_socket", "_socket_can_read"})


def _label(frame) -> str:
    code = frame.f_code
    return f"{os.path.basename(os.path.dirname(code.co_filename))}/{os.path.basename(code.co_filename)}:{code.co_name}"


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds each live thread of this process has used, by thread name (same-named threads summed)."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), f"native-{tid}")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class StackSampler:
    def __init__(self, out: str, interval_s: float = 0.002, dump_every_s: float = 2.0) -> None:
        self.out, self.interval_s, self.dump_every_s = out, interval_s, dump_every_s
        self.stacks: Counter[tuple[str, ...]] = Counter()
        self.idle = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kairos-sampler", daemon=True)

    def start(self) -> "StackSampler":
        # a thread running Python gives the GIL up only every switch interval (5 ms): sampled at a 2 ms period it
        # would be caught mostly where it blocks; a short interval lets the sampler in wherever the thread is
        sys.setswitchinterval(min(sys.getswitchinterval(), self.interval_s / 4))
        self._thread.start()
        return self

    def _run(self) -> None:
        me = threading.get_ident()
        last_dump = time.monotonic()
        while not self._stop.wait(self.interval_s):
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                if frame.f_code.co_name in IDLE_LEAVES:
                    self.idle += 1
                    continue
                stack = []
                f: FrameType | None = frame
                while f is not None:
                    stack.append(_label(f))
                    f = f.f_back
                self.stacks[tuple(reversed(stack))] += 1
                self.samples += 1
            if time.monotonic() - last_dump > self.dump_every_s:
                self.dump()
                last_dump = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self.dump()

    def dump(self) -> None:
        stacks = dict(self.stacks)
        own: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        for stack, n in stacks.items():
            own[stack[-1]] += n
            for name in set(stack):
                incl[name] += n
        total = max(sum(stacks.values()), 1)
        path = f"{self.out}.{os.getpid()}"
        with open(path + ".cpu", "a") as fh:  # a timeline: the difference of two lines is a window's CPU per thread
            fh.write(f"{time.time():.1f} samples={self.samples} "
                     + " ".join(f"{name.replace(' ', '_')}={cpu:.2f}" for name, cpu in thread_cpu_s().items()) + "\n")
        with open(path + ".collapsed", "w") as fh:
            for stack, n in sorted(stacks.items(), key=lambda kv: -kv[1]):
                fh.write(";".join(stack) + f" {n}\n")
        with open(path + ".txt", "w") as fh:
            fh.write("CPU s per thread (/proc/self/task/*/stat utime+stime): "
                     + ", ".join(f"{name} {cpu:.2f}" for name, cpu in thread_cpu_s().items()) + "\n")
            fh.write(f"busy samples {total} (idle {self.idle}), interval {self.interval_s * 1000:.1f} ms\n")
            fh.write("own%    incl%   function\n")
            for name, n in incl.most_common(120):
                fh.write(f"{100 * own[name] / total:6.2f} {100 * n / total:7.2f}   {name}\n")
            fh.write("\nby own samples\n")
            for name, n in own.most_common(60):
                fh.write(f"{100 * n / total:6.2f} {100 * incl[name] / total:7.2f}   {name}\n")
