"""The dispatcher: the single owner of job state."""
