"""One module per `linectl` subcommand; each exposes register(subparsers)."""
