"""The `--mode` programs: each module holds one mode's start-up and its outputs, and a `run(config, workdir)` that
returns {label: value} for the console. The work itself lives in the library modules they call."""
