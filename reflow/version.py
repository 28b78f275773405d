"""The version of reflow (imported by every layer; imports nothing)."""

__version__ = "0.1.0"
