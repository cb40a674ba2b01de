"""The ``berth`` command: one module of subcommands per component."""
