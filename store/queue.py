"""The job queue: one Celery app definition shared by the worker (whose relay, worker/relay.py,
sends every message) and the API (which only checks the broker for /healthz), and the whole Celery
policy in one place.

The message carries a job id and nothing else; the job row is the truth, the message only wakes a
worker. With no broker configured, the broker is a folder under the data dir (kombu's filesystem
transport), so a laptop needs no server.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time

from celery import Celery

from store.settings import Settings

RUN_JOB = "driftsafe.run_job"
QUEUE = "driftsafe.jobs"
WORKER_CONCURRENCY = 1  # one job (one GPU) per worker process
# Redis re-delivers an unacknowledged message after its visibility timeout. Jobs acknowledge late
# (on finish), so the timeout must outlast the longest job; the row's compare-and-set claim makes
# any re-delivery harmless anyway.
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600
SEND_TIMEOUT_S = 2.0  # a relay's send never holds its rows' locks longer than this
EPOCH_KEY = "driftsafe:broker_epoch"
RESEND_KEY = "driftsafe:resending"  # held by the one worker re-sending a lost broker's messages
RESEND_CLAIM_S = 120  # a re-sender that dies on the way frees the claim after this
SWEEP_KEY = "driftsafe:sweeping"  # held by the one worker looking for single lost messages
SCAN_CHUNK = 1000  # messages read per round trip when listing what the broker holds
SCAN_OVERLAP = 64

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    app = Celery("driftsafe", broker=settings.celery_broker_url)
    options: dict = {"visibility_timeout": VISIBILITY_TIMEOUT_S,
                     "socket_connect_timeout": SEND_TIMEOUT_S, "socket_timeout": SEND_TIMEOUT_S,
                     "max_retries": 0}
    if settings.celery_broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        options = dict(data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
                       processed_folder=str(folder / "processed"), store_processed=False)
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=SEND_TIMEOUT_S,
        task_default_queue=QUEUE,
        # Late ack: a message is acked when its job ends, so a worker that dies mid-job does not
        # lose it. A killed worker's message is not re-queued by Celery (reject_on_worker_lost
        # False): the reaper re-queues the job itself, from the heartbeat, exactly once.
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        # A broker that restarts must not kill the job that is training: the row, not the
        # message, is the truth (Celery 6 would cancel running late-ack tasks by default).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_concurrency=WORKER_CONCURRENCY,
        task_serializer="json",
        accept_content=["json"],  # never unpickle a message
        result_backend=None,
        task_ignore_result=True,
    )
    return app


def task_time_limit(settings: Settings, total_steps: int | None) -> float:
    """A job's hard time limit: a fixed allowance plus a per-step one, so a stuck job ends."""
    steps = total_steps or settings.max_job_steps
    return settings.task_time_limit_base_seconds + steps * settings.task_time_limit_per_step_seconds


def backstop_time_limit(settings: Settings, total_steps: int | None) -> float:
    """Celery's hard limit for the task: the job's own limit (enforced by the runner, which saves
    a checkpoint and fails the job) plus room to do that, for a step that never returns."""
    return task_time_limit(settings, total_steps) * 1.05 + 120


def _limits(time_limit: float | None) -> dict:
    return {"time_limit": time_limit, "soft_time_limit": time_limit * 0.98} if time_limit else {}


def enqueue_jobs(app: Celery, jobs: list[tuple[str, float | None]]) -> bool:
    """Send the wake-up messages of `jobs` (job id, time limit) together. On Redis they go in one
    pipelined round trip (kombu's `Producer.batch`): sent one by one, each paid a round trip, a
    new client object and the GIL time of both, about half of the sending cost. Other brokers
    send them one by one.

    False if the broker failed: whether any of the batch arrived is then unknown, every job of it
    stays unrecorded, and the relay (worker/relay.py) sends them again. A message twice is
    harmless: the worker's claim of the row is a compare-and-set, and a second message finds the
    job taken."""
    try:
        with app.producer_or_acquire() as producer, producer.batch():
            for job_id, time_limit in jobs:
                # the reprs given: Celery's own (saferepr of the arguments) was 15% of a send
                app.send_task(RUN_JOB, args=[job_id], queue=QUEUE, retry=False,
                              producer=producer, argsrepr=repr([job_id]), kwargsrepr="{}",
                              **_limits(time_limit))
        return True
    except Exception:  # noqa: BLE001 - any broker failure leaves the rows for the next pass
        log.warning("could not enqueue %d job(s) (%s...); the relay sends them again",
                    len(jobs), jobs[0][0] if jobs else "", exc_info=True)
        return False


class UnreadableMessage(ValueError):
    """A message in our queue whose job cannot be read: the sweep stops rather than guess."""


def job_of_message(message: bytes | str | dict) -> str | None:
    """The job id a wake-up message names, from kombu's JSON envelope (body: base64 JSON of
    [args, kwargs, embed]); None for another task's message. Only JSON is ever parsed: a
    message that is not ours in a form this reads (another serializer, compression, another
    protocol) raises UnreadableMessage."""
    try:
        if not isinstance(message, dict):
            message = json.loads(message)
        if message.get("headers", {}).get("task") != RUN_JOB:
            return None
        if message.get("content-type") != "application/json" or \
                message.get("headers", {}).get("compression"):
            raise UnreadableMessage(f"a {RUN_JOB} message in {message.get('content-type')}")
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        job_id = json.loads(body)[0][0]
    except UnreadableMessage:
        raise  # its own message, not the generic one below
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise UnreadableMessage(f"unreadable message: {e}") from None
    if not isinstance(job_id, str):
        raise UnreadableMessage(f"a {RUN_JOB} message whose argument is not a job id")
    return job_id


class BrokerWatch:
    """Watches a Redis broker for lost wake-up messages, of every queued job or of one.

    Every job: a random marker is kept in Redis; if it vanishes, Redis restarted without
    persistence and every queued job's message is gone (`lost_messages`). One worker at a time
    re-sends: the one holding a short-lived claim (SET NX with an expiry), so a restart causes
    one resend, not one per worker. The marker goes back only once the re-send is recorded
    (`resent`): a re-sender that fails on the way gives its claim back (`abandon`), and one that
    dies loses it when it expires, so the next pass re-sends.

    One job: kombu's Redis transport pops a message (BRPOP) before it records it as delivered
    and unacknowledged, so a consumer that dies between the two loses it; and a pool child
    killed after receiving its message but before claiming the job has its message acknowledged
    (`task_reject_on_worker_lost` is off, see `make_celery`). `held` says which jobs' messages
    the broker still holds, waiting or lately delivered; the reaper gives a new message to a
    long-queued job that is not among them.

    Other brokers keep their messages (the folder broker) or are not watched."""

    def __init__(self, settings: Settings):
        url = settings.celery_broker_url
        self.client = None
        if url.startswith(("redis://", "rediss://")):
            import redis

            self.client = redis.Redis.from_url(url, socket_timeout=SEND_TIMEOUT_S,
                                               socket_connect_timeout=SEND_TIMEOUT_S)

    def lost_messages(self) -> bool:
        """True when the broker lost its messages and this worker is to re-send them."""
        if self.client is None:
            return False
        try:
            if self.client.get(EPOCH_KEY) is not None:
                return False
            # new or emptied broker: whatever was queued is not in it
            return bool(self.client.set(RESEND_KEY, b"1", nx=True, ex=RESEND_CLAIM_S))
        except Exception:  # noqa: BLE001 - a broker that is down now is checked next pass
            log.warning("broker epoch check failed", exc_info=True)
            return False

    def resent(self) -> None:
        self.client.set(EPOCH_KEY, secrets.token_hex(8).encode())
        self.client.delete(RESEND_KEY)

    def abandon(self) -> None:
        try:
            self.client.delete(RESEND_KEY)
        except Exception:  # noqa: BLE001 - the claim expires by itself
            log.warning("could not give back the re-send claim", exc_info=True)

    def take_sweep(self, every_s: float) -> bool:
        """True for one worker per `every_s`: the one to look for single lost messages now.
        Never while the broker's marker is missing: every queued job's message is then being
        re-sent (`lost_messages`), and an empty broker would make every one look lost."""
        if self.client is None:
            return False
        try:
            if self.client.get(EPOCH_KEY) is None:
                return False
            return bool(self.client.set(SWEEP_KEY, b"1", nx=True,
                                        px=max(1, int(every_s * 1000))))
        except Exception:  # noqa: BLE001 - a broker that is down now is checked next pass
            log.warning("could not take the lost-message sweep", exc_info=True)
            return False

    def held(self, jobs: set[str], delivered_within_s: float) -> set[str] | None:
        """Which of `jobs` the broker holds a wake-up message for: waiting in the queue (kombu
        keeps a list per priority, oldest at the tail) or delivered within `delivered_within_s`
        and not yet acknowledged (kombu's `unacked` hash, indexed by delivery time in
        `unacked_index`). An older delivery of a job still queued belongs to a worker that died
        or hung before its claim, or to an earlier attempt of a job since re-queued: kombu keeps
        such entries for the visibility timeout (7 days). The lists are read from their oldest
        end, and only until every job is found. None if the broker could not be read, or held a
        message of ours it could not read. `make_celery` sets none of kombu's key options
        (prefix, separator, priority steps), so kombu's defaults name the keys."""
        from kombu.transport.redis import PRIORITY_STEPS, Channel

        if self.client is None:
            return None
        held: set[str] = set()
        try:
            tags = self.client.zrangebyscore(Channel.unacked_index_key,
                                             time.time() - delivered_within_s, "+inf")
            for b in range(0, len(tags), SCAN_CHUNK):
                for delivered in self.client.hmget(Channel.unacked_key, tags[b: b + SCAN_CHUNK]):
                    if delivered is None:
                        continue  # acknowledged meanwhile
                    message, _exchange, routing_key = json.loads(delivered)
                    if routing_key == QUEUE:
                        held.add(job_of_message(message))
            lists = [QUEUE] + [f"{QUEUE}{Channel.sep}{p}" for p in PRIORITY_STEPS if p]
            for key in lists:
                end = -1
                while not jobs <= held:
                    chunk = self.client.lrange(key, end - SCAN_CHUNK + 1, end)
                    held.update(job_of_message(raw) for raw in chunk)
                    if len(chunk) < SCAN_CHUNK:
                        break  # read through to the newest
                    # Reads overlap: a consumer popping the tail meanwhile moves every message
                    # one index towards it, which must not make the scan step over one.
                    end -= SCAN_CHUNK - SCAN_OVERLAP
        except UnreadableMessage as e:
            log.warning("not looking for lost messages: %s", e)
            return None
        except Exception:  # noqa: BLE001 - a broker that is down now is checked next pass
            log.warning("could not list the broker's messages", exc_info=True)
            return None
        return held & jobs
