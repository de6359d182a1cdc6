"""gradavg's edge: configs, the training loop, MLflow tracking, progress output and the CLI."""

__version__ = "0.1.0"
