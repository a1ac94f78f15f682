"""Evaluation: offline long texts and needle-in-a-haystack prompts (``haystack``), and the task runners."""
