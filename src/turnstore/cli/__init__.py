"""The ``turnstore`` command line, a client of the public faces."""
