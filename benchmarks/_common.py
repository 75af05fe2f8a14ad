"""What the benchmark scripts share: writing results and measuring memory."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from pathlib import Path


def machine() -> str:
    """The CPU the figures were measured on: ratios against dense move with it (wide vector
    units favour dense GEMM and the sparse kernels differently)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} logical CPUs, {vector}"


def write_result(lines: list[str], out: Path) -> str:
    """Write the Markdown ``lines`` to ``out`` (under benchmarks/results/), with a last line
    naming the machine; print and return it."""
    text = "\n".join([*lines, "", f"Machine: {machine()}."]) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return text


class AnonymousPeak:
    """Peak anonymous resident memory (RssAnon: the process's own data, not the library code
    that touching new torch functions pages in), sampled every millisecond in a thread."""

    def __init__(self):
        self.peak = self.base = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def stop(self) -> float:
        """MB above the level when sampling began."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
        return self.peak - self.base


def rss_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM: unlike ru_maxrss it is not
    inherited from the parent process across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
