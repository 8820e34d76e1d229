"""One module per command: its request (what to do, as a value), the call that runs it,
and the report it returns. The CLI and scripts call the same functions."""
