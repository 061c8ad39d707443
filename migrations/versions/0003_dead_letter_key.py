"""Dead letters get a key of their own, unique: a dead letter filed twice (two drainers of the
Redis-held list at once, a drainer that died between filing and popping) is kept once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:50:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    # Rows filed before this revision have no key (NULL): unique constraints let NULLs repeat.
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('letter_key', sa.String(length=200), nullable=True))
        batch_op.create_unique_constraint('uq_dead_letters_letter_key', ['letter_key'])


def downgrade():
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.drop_constraint('uq_dead_letters_letter_key', type_='unique')
        batch_op.drop_column('letter_key')
