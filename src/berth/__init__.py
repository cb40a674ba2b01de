"""berth: run cloud processing services on one machine or many."""

__version__ = "0.1.0"
