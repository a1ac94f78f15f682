"""Hugging Face integration: the attention/mask interface registration and version compatibility."""
