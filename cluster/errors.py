class ClusterError(RuntimeError):
    """The Ray cluster cannot run the job as configured; the message says what to change."""


class WorkerFailuresError(RuntimeError):
    """Workers kept dying: the job stops, to be resumed from its last checkpoint."""
