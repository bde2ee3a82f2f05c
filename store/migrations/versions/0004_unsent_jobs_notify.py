"""unsent jobs: on PostgreSQL, NOTIFY the workers' relays when a job row needs its message

Revision ID: 0004
Revises: 0003
"""
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# worker/relay.py LISTENs on this channel. A row needs a message when it is queued and has none
# recorded: a new job, a re-queued one, or every queued job after the broker lost its messages.
# One notification per transaction (PostgreSQL folds identical ones), none for other updates.
CHANNEL = 'driftsafe_unsent_jobs'


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return  # SQLite has no NOTIFY: the relay polls
    op.execute(f"""
        CREATE FUNCTION driftsafe_notify_unsent_job() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', '');
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER jobs_notify_unsent
        AFTER INSERT OR UPDATE OF status, enqueued_at ON jobs
        FOR EACH ROW WHEN (NEW.status = 'queued' AND NEW.enqueued_at IS NULL)
        EXECUTE FUNCTION driftsafe_notify_unsent_job()""")


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute("DROP TRIGGER jobs_notify_unsent ON jobs")
    op.execute("DROP FUNCTION driftsafe_notify_unsent_job()")
