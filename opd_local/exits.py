"""How a run ends, as the command line reports it: exit codes, and the exception that Ctrl-C becomes."""

EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped


class RunInterrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run; the message says what the run directory holds now."""
