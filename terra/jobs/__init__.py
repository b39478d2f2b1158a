"""Durable jobs: the store (job files and leases) and the one runner every job kind uses."""

from terra.jobs.store import Job, JobStatus, JobStore, Lease, new_job

__all__ = ["Job", "JobStatus", "JobStore", "Lease", "new_job"]
