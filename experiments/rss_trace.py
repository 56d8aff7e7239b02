"""Where a command's peak memory is reached: its resident set sampled while it runs, cut into
phases at each line it writes to stderr (the commands log every step of their work there).

    .venv/bin/python -m experiments.rss_trace [--interval=0.05] [--stop_after=REGEX] -- \\
        .venv/bin/python -m batquant_jax.calibrate --model=qwen2.5-coder-1.5b ...

For each phase (the time between two lines; a phase is named by the line that ends it) it
prints the largest resident set sampled in it and, where the phase raised the kernel's
high-water mark (VmHWM, which misses no spike), the new mark. --stop_after ends the command
(SIGTERM) once a line matches, after the phase that line closes: the per-layer phases of a
calibration repeat, so a few layers show the shape of a whole run (and any growth from one layer
to the next, which only a whole run measures in full). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import queue
import re
import subprocess
import sys
import threading
import time
from typing import Iterator, NamedTuple

GIB = 2 ** 30


class Phase(NamedTuple):
    seconds: float  # when the line ending the phase arrived, from the start
    rss_max: int  # the largest resident set sampled in the phase, bytes
    new_hwm: int | None  # the high-water mark, where this phase raised it; bytes
    line: str


def read_status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes of a live process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except (FileNotFoundError, ProcessLookupError):
        return None
    if len(fields) < 2:  # a zombie has no memory lines left
        return None
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


def phases(events) -> Iterator[Phase]:
    """Folds a time-ordered stream of events into phases, each yielded as its line arrives.
    events: ("sample", t, rss, hwm) and ("line", t, text); samples after the last line form a
    final phase named "(exit)"."""
    rss_max, hwm_before, hwm = 0, 0, 0
    pending = False
    for ev in events:
        if ev[0] == "sample":
            _, _, rss, hwm_now = ev
            rss_max, hwm, pending = max(rss_max, rss), max(hwm, hwm_now), True
        else:
            _, t, text = ev
            yield Phase(t, rss_max, hwm if hwm > hwm_before else None, text)
            rss_max, hwm_before, pending = 0, hwm, False
    if pending:
        yield Phase(ev[1], rss_max, hwm if hwm > hwm_before else None, "(exit)")


def trace(cmd: list[str], interval: float = 0.05, stop_after: str | None = None):
    """Runs cmd; yields its events (see ``phases``) as they happen. Its stderr lines become
    events (the caller prints what it wants); its stdout passes through."""
    stop = re.compile(stop_after) if stop_after else None
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)  # its stdout passes through
    lines: queue.Queue = queue.Queue()

    def reader():
        for line in proc.stderr:
            lines.put((time.monotonic(), line.rstrip("\n")))
        lines.put(None)
    threading.Thread(target=reader, daemon=True).start()
    t0, done, stopping = time.monotonic(), False, False
    while not done:
        status = read_status(proc.pid)
        if status is not None:
            yield ("sample", time.monotonic() - t0, *status)
        try:
            while True:
                item = lines.get(timeout=interval if status is not None else 1.0)
                if item is None:
                    done = True
                    break
                yield ("line", item[0] - t0, item[1])
                if stop is not None and not stopping and stop.search(item[1]):
                    proc.terminate()
                    stopping = True
                if lines.empty():
                    break
        except queue.Empty:
            pass
    proc.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    ap.add_argument("--stop_after", default=None, help="end the command after a matching line")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    print(f"{'s':>7}  {'rss max':>9}  {'new peak':>9}  line ending the phase", flush=True)
    peak = 0
    for p in phases(trace(cmd, args.interval, args.stop_after)):
        mark = f"{p.new_hwm / GIB:7.2f} G" if p.new_hwm else ""
        peak = max(peak, p.new_hwm or 0)
        print(f"{p.seconds:7.1f}  {p.rss_max / GIB:7.2f} G  {mark:>9}  {p.line[:110]}", flush=True)
    print(f"peak resident set (VmHWM): {peak / GIB:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
