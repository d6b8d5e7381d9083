"""The ``embcompress`` command line: one module per command, thin over the library.

``main`` builds the app; ``_options`` holds the shared option aliases, ``_errors`` maps the library's exceptions to
one-line messages and exit codes, ``_render`` prints a rich table or ``--json``.
"""
