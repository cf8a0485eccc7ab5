"""Tests never reach the Hugging Face hub: offline mode is set before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RLOOP_PROGRESS", "0")
