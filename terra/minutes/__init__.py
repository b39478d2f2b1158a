"""Offline minutes: the compiler, its formats, the job service and the command line."""
