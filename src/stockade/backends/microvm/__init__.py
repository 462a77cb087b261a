"""The microVM backend (tier 1): a guest kernel per sandbox, driven by a VMM ``Driver``."""
