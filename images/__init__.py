"""The README figures and the one command that regenerates them: ``python -m images.make_all``."""
