"""hardening: poison-pill counter, planned steps, indexes for events, quotas and due webhooks

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

DUE = sa.text("delivered_at IS NULL AND NOT gave_up")


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lost_without_progress', sa.Integer(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('claimed_step', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('total_steps', sa.Integer(), nullable=True))
        batch_op.create_index('ix_jobs_tenant_status', ['tenant_id', 'status'], unique=False)
    op.create_index('ix_job_events_job_seq', 'job_events', ['job_id', 'seq'], unique=False)
    op.create_index('ix_checkpoints_job_seq', 'checkpoints', ['job_id', 'seq'], unique=False)
    op.create_index('ix_idempotency_created', 'idempotency_records', ['created_at'], unique=False)
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries', ['next_attempt_at'],
                    unique=False, postgresql_where=DUE, sqlite_where=DUE)


def downgrade() -> None:
    op.drop_index('ix_webhook_deliveries_due', table_name='webhook_deliveries')
    op.drop_index('ix_idempotency_created', table_name='idempotency_records')
    op.drop_index('ix_checkpoints_job_seq', table_name='checkpoints')
    op.drop_index('ix_job_events_job_seq', table_name='job_events')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_tenant_status')
        batch_op.drop_column('total_steps')
        batch_op.drop_column('claimed_step')
        batch_op.drop_column('lost_without_progress')
