"""Shared test setup. Everything runs offline on a CPU: models are built tiny, in code."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["fixtures_qwen", "fixtures_pipeline"]
