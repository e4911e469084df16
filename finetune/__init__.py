"""finetune: config-driven transfer learning for Keras vision backbones."""

__version__ = "0.1.0"
