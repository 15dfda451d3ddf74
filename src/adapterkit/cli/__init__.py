"""The command line: thin commands over the library (the library itself never parses argv)."""
