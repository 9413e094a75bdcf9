"""Command implementations behind the `vfiomig` CLI (one module per subcommand)."""
