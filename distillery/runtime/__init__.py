"""Run-time services for training scripts: atomic checkpoints and metric logging."""
from distillery.runtime.checkpoint import (
    atomic_write_text,
    checkpoint_sha256,
    flatten_state,
    load_checkpoint,
    load_checkpoint_meta,
    resolve_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
    sha256_file,
    step_dir_name,
    unflatten_state,
    update_link,
)

__all__ = ["save_checkpoint", "save_run_checkpoint", "load_checkpoint", "load_checkpoint_meta", "flatten_state", "unflatten_state", "update_link",
           "resolve_checkpoint", "step_dir_name", "atomic_write_text", "checkpoint_sha256", "sha256_file", "Logger"]


def __getattr__(name: str):
    # Logger pulls in tqdm/wandb; import it lazily so checkpoint-only users stay light.
    if name == "Logger":
        from distillery.runtime.logging import Logger

        return Logger
    raise AttributeError(f"module 'distillery.runtime' has no attribute {name!r}")
