"""Shared pytest fixtures: a tiny Qwen2.5-VL built once per session in a temporary folder."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
