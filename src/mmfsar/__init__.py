"""mmfsar: multimodal few-shot action recognition with knowledge distillation."""

__version__ = "0.1.0"
