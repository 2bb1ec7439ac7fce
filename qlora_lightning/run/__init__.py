"""Running a command: the entry point and its command list, LightningCLI and its Trainer, the
``estimate`` command, callbacks, the progress bar, prediction writers, console output and the cached
``--help`` text.

May import: every other layer of the package. Nothing in the package imports ``run``.
"""
