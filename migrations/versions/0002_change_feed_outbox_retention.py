"""Change feed position, ready-hook outbox, an index for pruning events by age.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 06:45:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    # Existing recordings start at position 0: below any transaction id, so a consumer reading the
    # feed from the beginning gets each of them once, in id order.
    with op.batch_alter_table('voice_recordings', schema=None) as batch_op:
        batch_op.add_column(sa.Column('change_position', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.create_index('ix_voice_recordings_change_position_id', ['change_position', 'id'], unique=False)

    op.create_table('hook_outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('recording_id', sa.String(length=128), nullable=False),
    sa.Column('task_id', sa.String(length=36), nullable=False),
    sa.Column('recording', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('hook_outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hook_outbox_recording_id'), ['recording_id'], unique=False)

    # Retention deletes the oldest events in batches; without this index each batch scans the table.
    # On PostgreSQL it is built CONCURRENTLY (outside the migration's transaction), so workers keep
    # writing events while it is built over a large table.
    if op.get_bind().dialect.name == 'postgresql':
        with op.get_context().autocommit_block():
            op.create_index('ix_webhook_events_received_at', 'webhook_events', ['received_at'], unique=False,
                            postgresql_concurrently=True, if_not_exists=True)
    else:
        with op.batch_alter_table('webhook_events', schema=None) as batch_op:
            batch_op.create_index('ix_webhook_events_received_at', ['received_at'], unique=False)


def downgrade():
    with op.batch_alter_table('webhook_events', schema=None) as batch_op:
        batch_op.drop_index('ix_webhook_events_received_at')
    with op.batch_alter_table('hook_outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hook_outbox_recording_id'))
    op.drop_table('hook_outbox')
    with op.batch_alter_table('voice_recordings', schema=None) as batch_op:
        batch_op.drop_index('ix_voice_recordings_change_position_id')
        batch_op.drop_column('change_position')
