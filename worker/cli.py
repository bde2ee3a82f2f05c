"""`driftsafe serve worker`: one Celery worker process, one job at a time."""

from __future__ import annotations


def serve_worker(args) -> int:
    from store.db import migrate
    from store.queue import QUEUE, WORKER_CONCURRENCY
    from worker.app import app, settings

    migrate(settings)
    argv = ["worker", "--loglevel=INFO", f"--concurrency={WORKER_CONCURRENCY}", "--pool=prefork",
            "--without-gossip", "--without-mingle", "-Q", QUEUE]
    if args.name:
        argv.append(f"--hostname={args.name}")
    app.worker_main(argv)
    return 0
