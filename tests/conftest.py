"""Test-wide environment: offline wandb, headless rendering, and runs written under tmp dirs."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MUJOCO_GL", "egl")
