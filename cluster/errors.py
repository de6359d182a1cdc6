"""The cluster's errors, each of a kind ``gradavg``'s exit status goes by (``jobs.errors``, a module that
imports nothing of the project's: importing it here makes no cycle)."""

from jobs.errors import JobFailed, UserError


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot run the job as configured; the message says what to change."""


class WorkerFailuresError(JobFailed, RuntimeError):
    """Workers kept dying: the job stops, to be resumed from its last checkpoint."""
