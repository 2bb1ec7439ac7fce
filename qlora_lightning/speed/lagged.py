"""Reading the GPU's results on the host a little late, so that the host never waits for the GPU.

``tensor.item()`` or ``torch.cuda.synchronize()`` in a training step makes the host wait until
the GPU has run everything queued; the GPU then idles while the host prepares the next work. A
value copied to pinned memory behind the work that makes it, and read once a :class:`Mark`
placed after the copy is reached, costs neither.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterator, Optional

import torch


def copy_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``tensor``, valid once a :class:`Mark` made after this call is reached."""
    if not tensor.is_cuda:
        return tensor.detach().clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor.detach(), non_blocking=True)


class Mark:
    """A point in the device's queue of work, reached when everything queued before it has run.

    On a GPU a timing event on the current stream; on the CPU, where work runs as it is
    issued, the clock at creation.
    """

    def __init__(self, device: torch.device):
        self._event: Optional[torch.cuda.Event] = None
        self._time = 0.0
        if device.type == "cuda":
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record(torch.cuda.current_stream(device))
        else:
            self._time = time.perf_counter()

    def reached(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        """Block until reached: the work queued after this mark keeps the GPU busy meanwhile."""
        if self._event is not None:
            self._event.synchronize()

    def seconds_since(self, earlier: "Mark") -> float:
        """Device time from ``earlier`` to this mark (waits until this one is reached)."""
        if self._event is None:
            return self._time - earlier._time
        self.wait()
        return earlier._event.elapsed_time(self._event) / 1e3


class HostReadings:
    """Device values on their way to the host, each read once it has arrived."""

    def __init__(self):
        self._pending: deque[tuple[Any, torch.Tensor, Mark]] = deque()

    def push(self, tag: Any, value: torch.Tensor) -> None:
        self._pending.append((tag, copy_to_host(value), Mark(value.device)))

    def arrived(self, wait: bool = False) -> Iterator[tuple[Any, torch.Tensor]]:
        """(tag, CPU copy) of each value that has reached the host, oldest first; ``wait``: all of
        them."""
        while self._pending and (wait or self._pending[0][2].reached()):
            tag, value, mark = self._pending.popleft()
            mark.wait()
            yield tag, value
