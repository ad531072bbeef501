"""Subcommands of the `kvqueue` CLI: argument parsing only, logic lives in the library."""
