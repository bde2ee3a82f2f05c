"""unsent jobs: a partial index of the jobs whose message is not recorded

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
# message (and the few that ended before it was sent), however long the backlog already sent.
UNSENT = sa.text("enqueued_at IS NULL")


def upgrade() -> None:
    op.create_index('ix_jobs_unsent', 'jobs', ['seq'], unique=False,
                    postgresql_where=UNSENT, sqlite_where=UNSENT)


def downgrade() -> None:
    op.drop_index('ix_jobs_unsent', table_name='jobs')
