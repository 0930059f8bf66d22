"""Run a Python module under a CPU-time sampling profiler: `python bench/cpu_sampler.py OUT -m module args...`.

`setitimer(ITIMER_PROF)` fires only while the process consumes CPU (user + system), so the samples say where CPU
goes, not where the process waited or was preempted (py-spy cannot tell those apart on this machine: a thread
waiting in `epoll` or preempted after a `send()` counts as active to it). Each sample records the main thread's
Python stack at the next bytecode boundary, so time in a C function or a system call counts for the Python line
that called it; CPU of other threads counts for whatever the main thread runs next.

Sampling starts at the first SIGUSR2 (after start-up and a warm-up, say) and stops at the second, which writes
OUT: one line per distinct stack, `frame;frame;... count` (outermost first, like py-spy's raw format and
flamegraph.pl's input). The garbage collector's CPU (inside whatever line allocated, so spread over the stacks)
is also measured apart with `gc.callbacks`: lines `#gc <generation> <collections> <seconds>`.
"""

from __future__ import annotations

import gc
import os
import runpy
import signal
import sys
import time
from collections import Counter
from types import FrameType

INTERVAL_S = 0.002  # of CPU: a sample costs ~10-20 us, so ~1% overhead


def main() -> None:
    out, flag, module, *args = sys.argv[1:]
    if flag != "-m":
        raise SystemExit(__doc__)
    samples: Counter[tuple[tuple[str, str, int], ...]] = Counter()
    gc_cpu_s: Counter[int] = Counter()  # by generation, while sampling
    gc_runs: Counter[int] = Counter()
    gc_started = [0.0]

    def time_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.process_time()
        elif signal.getitimer(signal.ITIMER_PROF)[0]:
            gc_cpu_s[info["generation"]] += time.process_time() - gc_started[0]
            gc_runs[info["generation"]] += 1

    def sample(signum: int, frame: FrameType | None) -> None:
        stack = []
        while frame is not None:
            code = frame.f_code
            stack.append((code.co_qualname, code.co_filename, frame.f_lineno))
            frame = frame.f_back
        samples[tuple(stack)] += 1

    def start_or_stop(signum: int, frame: FrameType | None) -> None:
        if not signal.getitimer(signal.ITIMER_PROF)[0]:
            signal.setitimer(signal.ITIMER_PROF, INTERVAL_S, INTERVAL_S)
            return
        signal.setitimer(signal.ITIMER_PROF, 0)
        with open(out, "w") as file:
            for stack, count in samples.items():
                frames = ";".join(f"{name} ({path}:{line})" for name, path, line in reversed(stack))
                file.write(f"{frames} {count}\n")
            for generation, seconds in sorted(gc_cpu_s.items()):
                file.write(f"#gc {generation} {gc_runs[generation]} {seconds:.6f}\n")

    signal.signal(signal.SIGPROF, sample)
    signal.signal(signal.SIGUSR2, start_or_stop)
    gc.callbacks.append(time_gc)
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()  # as `python -m` has it: the module of the working directory, not an installed one
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
