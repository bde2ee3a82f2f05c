"""unsent jobs: a partial index of the queued jobs whose message is not recorded

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# The rows worker/relay.py looks for on every pass, oldest first: the queued jobs waiting for their
# message, however long the backlog already sent (store.jobstate.UNSENT_MESSAGE).
UNSENT = sa.text("status = 'queued' AND enqueued_at IS NULL")


def upgrade() -> None:
    op.create_index('ix_jobs_unsent', 'jobs', ['seq'], unique=False,
                    postgresql_where=UNSENT, sqlite_where=UNSENT)


def downgrade() -> None:
    op.drop_index('ix_jobs_unsent', table_name='jobs')
