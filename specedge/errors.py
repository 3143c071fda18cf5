"""What the CLIs need before any model is loaded, in a module that loads nothing heavy:
the error they catch by type and the model preset names (importing torch costs seconds)."""

from __future__ import annotations


class ModelError(RuntimeError):
    """A model cannot be loaded or paired; the message says what to do."""


TINY_TARGET = "tiny-test"
TINY_DRAFT = "tiny-test-draft"
DEMO_TARGET = "qwen2.5-coder-1.5b"
DEMO_DRAFT = "qwen2.5-coder-0.5b"
PRESETS = (TINY_TARGET, TINY_DRAFT, DEMO_TARGET, DEMO_DRAFT)
