"""Callbacks that SIGKILL their own process, to test resuming after a hard kill."""

import os
import signal

from lightning.pytorch import Callback


class KillAtStep(Callback):
    """Kill the process, with no chance to clean up, once ``step`` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class _KillWhenWritten:
    """Kills the process when ``torch.save`` reaches it, after the temporary file was opened."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(Callback):
    """Kill the process in the middle of writing the first checkpoint at or after ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step >= self.step:
            checkpoint["kill"] = _KillWhenWritten()
