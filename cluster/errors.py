class ClusterError(RuntimeError):
    """The Ray cluster cannot run the job as configured; the message says what to change."""
