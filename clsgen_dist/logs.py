"""Logging set-up shared by the entry points: INFO on rank 0, warnings elsewhere, library noise muted."""

from __future__ import annotations

import logging
import warnings

from .distributed import is_main


def setup_logging() -> None:
    level = logging.INFO if is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns at import that its optional CPU kernels package is absent
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # deprecation notices raised inside DeepSpeed / peft, not actionable by our users
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001
        pass
    import transformers

    transformers.logging.set_verbosity_error()
