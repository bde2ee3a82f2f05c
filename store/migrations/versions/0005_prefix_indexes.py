"""drop the single-column indexes that a composite index begins with

Revision ID: 0005
Revises: 0004
"""
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

# (index, table, column) -> the index that already leads with that column and serves its lookups
# (a tenant's jobs or files, a job's events or checkpoints, the deletes that cascade to them).
REDUNDANT = [
    ("ix_jobs_tenant_id", "jobs", "tenant_id"),  # ix_jobs_tenant_seq, ix_jobs_tenant_status
    ("ix_files_tenant_id", "files", "tenant_id"),  # ix_files_tenant_seq
    ("ix_job_events_job_id", "job_events", "job_id"),  # ix_job_events_job_seq
    ("ix_checkpoints_job_id", "checkpoints", "job_id"),  # ix_checkpoints_job_seq
]


def upgrade() -> None:
    for name, table, _ in REDUNDANT:
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    for name, table, column in REDUNDANT:
        op.create_index(name, table, [column], unique=False)
