"""One module per `cvt` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
