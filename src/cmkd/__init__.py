"""cmkd: cross-modal knowledge distillation into speech LLMs."""

__version__ = "0.1.0"
