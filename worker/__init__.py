"""Celery app and the job lifecycle: claim, run, heartbeat, cancel, resume, finish, reap."""
