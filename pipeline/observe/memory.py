"""Memory as a run uses it: the peak of each rank, measured the same way the memory plan predicts it.

On a GPU the figure is PyTorch's allocator peak (``torch.cuda.max_memory_allocated``): tensors, not the CUDA
context or NCCL buffers. On CPU it is the resident set above what the process held just before the model was
loaded (the Python, torch and DeepSpeed runtime and the tokenized data), read from ``/proc/self/status``
(``VmHWM``) and reset through ``/proc/self/clear_refs`` (Linux), so the loading peak and the training peak are
told apart. ``launch/plan.py`` predicts the training peak; ``tests/test_plan.py`` compares the two.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import torch

GiB = 1024 ** 3


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _trim_heap() -> None:
    """Give freed heap pages back to the OS, so the resident set is what is live (glibc keeps them otherwise)."""
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


class MemoryMeter:
    """One rank's memory since a baseline; ``device`` is where the tensors live."""

    def __init__(self, device: torch.device):
        self.gpu = device.type == "cuda"
        self.device = device
        self.available = self.gpu or Path("/proc/self/status").is_file()
        self.base = 0
        self.reset(baseline=True)

    def _current(self) -> int:
        if self.gpu:
            return torch.cuda.memory_allocated(self.device)
        return _status_kb("VmRSS") * 1024 if self.available else 0

    def reset(self, baseline: bool = False) -> None:
        """Start a new peak window at the current usage; ``baseline`` also makes the current usage the zero."""
        if not self.available:
            return
        if self.gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _trim_heap()
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            except OSError:
                pass  # the peak then also covers what came before; still an upper bound
        if baseline:
            self.base = self._current()

    def peak(self) -> int:
        """Bytes above the baseline at the highest point of the current window."""
        if not self.available:
            return 0
        top = torch.cuda.max_memory_allocated(self.device) if self.gpu else _status_kb("VmHWM") * 1024
        return max(0, top - self.base)
