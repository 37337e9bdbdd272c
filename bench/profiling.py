"""Cost measurement from outside a method: wall, CPU, host and GPU memory per phase.

Peak host memory per phase is the resident-set high-water mark (``VmHWM``),
reset at the start of each phase through ``/proc/self/clear_refs`` on Linux.
Where that reset is unavailable the value is the process-lifetime peak and the
record says so. GPU columns hold peak allocated and peak reserved bytes
separately, and are None (NA) on a CPU-only run.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from bench.errors import CappedError

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


def _read_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mib() -> float:
    """Resident set size now, in MiB."""
    kib = _read_status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def peak_rss_mib() -> float:
    """Resident-set high-water mark since the last reset, in MiB."""
    kib = _read_status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark; False if this OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class CostMeter:
    """Records wall and CPU seconds and peak memory per named phase.

    Args:
        device: "cpu" or a CUDA device; GPU counters are read only for CUDA.
        wall_cap_s: wall-time cap of a capped phase, checked by :meth:`check`.
        rss_cap_mib: host-memory cap of a capped phase, checked by :meth:`check`.
    """

    device: str = "cpu"
    wall_cap_s: float | None = None
    rss_cap_mib: float | None = None
    phases: dict[str, dict] = field(default_factory=dict)
    _capped_start: float | None = None

    @contextmanager
    def phase(self, name: str, *, capped: bool = False):
        """Measure the enclosed block as phase ``name``."""
        cuda = self.device.startswith("cuda") and torch.cuda.is_available()
        peak_reset = reset_peak_rss()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        if capped:
            self._capped_start = wall0
        try:
            yield self
        finally:
            if cuda:
                torch.cuda.synchronize()
            self.phases[name] = {
                "wall_s": time.perf_counter() - wall0,
                "cpu_s": time.process_time() - cpu0,
                "peak_rss_mib": peak_rss_mib(),
                "peak_rss_is_phase_peak": peak_reset,
                "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
            }
            if capped:
                self._capped_start = None

    def check(self) -> None:
        """Raise CappedError if the running capped phase exceeded a cap.

        Long method loops call this once per step so that a cap ends the cell
        as a recorded ``capped`` outcome instead of a hang.
        """
        if self._capped_start is None:
            return
        elapsed = time.perf_counter() - self._capped_start
        if self.wall_cap_s is not None and elapsed > self.wall_cap_s:
            raise CappedError(f"wall time {elapsed:.0f} s exceeded the cap of {self.wall_cap_s:.0f} s")
        if self.rss_cap_mib is not None:
            rss = current_rss_mib()
            if rss > self.rss_cap_mib:
                raise CappedError(f"resident memory {rss:.0f} MiB exceeded the cap of {self.rss_cap_mib:.0f} MiB")


def hardware_info() -> dict:
    """Describe the CPU (and GPU if one is used) for records and table grouping."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info
