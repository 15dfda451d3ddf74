"""Target selection, the injection engine (the only code that edits the module tree) and state I/O."""
