"""Known library messages that mean nothing to an lmtuner user, silenced one by one (never whole loggers).
Called first thing by every lmtuner process that may import the libraries: the server, the CLI, the training
child, the demo. Imports no library itself."""

from __future__ import annotations

import logging
import warnings

# (logger name, the start of the message): each was seen on a first `make demo`, and each is a library's own
# remark about itself, not about the user's job.
_LOG_LINES = (
    # bitsandbytes tries to fetch a faster CPU 4-bit kernel from the Hugging Face Hub through the `kernels`
    # package; installing `kernels` would not help an offline machine, and bitsandbytes falls back to its own
    # torch implementation, which is what ran in every measurement in docs/.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # DeepSpeed's accelerator auto-detection on a machine without a GPU; lmtuner says so itself (inspect_gpus).
    ("DeepSpeed", "Setting accelerator to CPU"),
)
# (warning category, the start of the message, the module that emits it)
_WARNINGS = (
    # peft asks `getattr(model, "is_gradient_checkpointing", …)`, a property transformers 5.x deprecates; the
    # warning is about peft's code, not ours (lmtuner never reads it).
    (FutureWarning, "`is_gradient_checkpointing` is deprecated", "transformers.modeling_utils"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_library_noise() -> None:
    """Installs the filters above; safe to call more than once and before the libraries are imported (a filter
    on a logger survives the library's own set-up of that logger)."""
    for name, prefix in _LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))
    for category, message, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
