"""Drivers run tasks. ``process`` (local child processes) is the embedded default;
a Docker or remote driver would sit beside it implementing ``base.Driver``."""
