-- Repairs: one row per planned repair, with its status lifecycle and audit trail
-- (spec §8.3, adapted).
CREATE TABLE {schema}.repair_operations (
    id                  uuid PRIMARY KEY,
    violation_ids       uuid[] NOT NULL,
    violation_type      text NOT NULL,
    table_schema        text NOT NULL,
    table_name          text NOT NULL,
    strategy            text NOT NULL,
    rule                text NOT NULL,
    severity            text NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    status              text NOT NULL CHECK (status IN ('pending', 'awaiting_approval', 'in_progress',
                                                         'completed', 'failed', 'rolled_back')),
    requires_approval   boolean NOT NULL,
    approved_by         text,
    approved_at         timestamptz,
    estimated_rows      bigint NOT NULL,
    rows_affected       bigint,
    affected_rows       jsonb,
    plan                jsonb NOT NULL,
    action              jsonb NOT NULL,
    violations          jsonb NOT NULL,
    executed_by         text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    completed_at        timestamptz,
    rolled_back_at      timestamptz,
    pre_repair_snapshot uuid,
    execution_log       jsonb NOT NULL DEFAULT '[]',
    rollback_log        jsonb NOT NULL DEFAULT '[]',
    error_message       text
);
CREATE INDEX repair_operations_created_at_idx ON {schema}.repair_operations (created_at);
CREATE INDEX repair_operations_status_idx ON {schema}.repair_operations (status);

-- The undo log: the before-image (and after-image) of every row a repair touched,
-- written in the repair's own transaction, as PostgreSQL record text.
CREATE TABLE {schema}.repair_undo (
    repair_id     uuid NOT NULL REFERENCES {schema}.repair_operations (id) ON DELETE CASCADE,
    seq           bigserial,
    table_schema  text NOT NULL,
    table_name    text NOT NULL,
    action        text NOT NULL CHECK (action IN ('deleted', 'updated', 'inserted')),
    key           text[] NOT NULL,
    before_row    text,
    after_row     text,
    PRIMARY KEY (repair_id, seq)
);
