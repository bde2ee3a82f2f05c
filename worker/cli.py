"""`driftsafe serve worker`: one Celery worker process, one job at a time."""

from __future__ import annotations


def serve_worker(args) -> int:
    from store.db import migrate
    from worker.app import app, settings

    migrate(settings)
    argv = ["worker", "--loglevel=INFO", "--concurrency=1", "--pool=prefork",
            "--without-gossip", "--without-mingle", "-Q", "driftsafe.jobs"]
    if args.name:
        argv.append(f"--hostname={args.name}")
    app.worker_main(argv)
    return 0
