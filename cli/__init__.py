"""The ``reflow`` command line (Typer): parse, call the library, show progress and results."""
