"""The package version, once (the `serial-lora --version` output and every file's `created_by` read it)."""

__version__ = "0.1.0"
