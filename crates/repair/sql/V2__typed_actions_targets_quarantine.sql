-- Repairs store typed data, never SQL text; their rows are recorded in a table, not in
-- the plan; removed rows go to a quarantine.

-- Two more statuses: `planning` (rows still being recorded; never runs) and
-- `replan_needed` (written by version 1 as SQL text; never runs).
ALTER TABLE {schema}.repair_operations DROP CONSTRAINT repair_operations_status_check;
ALTER TABLE {schema}.repair_operations ADD CONSTRAINT repair_operations_status_check
    CHECK (status IN ('planning', 'pending', 'awaiting_approval', 'in_progress', 'completed',
                      'failed', 'rolled_back', 'replan_needed'));
ALTER TABLE {schema}.repair_operations
    ADD COLUMN violation_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN rows_skipped bigint;
UPDATE {schema}.repair_operations SET violation_count = cardinality(violation_ids);

-- Version 1 actions held SQL conditions and assignments. They are kept for the audit
-- trail, wrapped so that no version reads them as an action, and the repairs that had
-- not run are never run: they must be planned again.
UPDATE {schema}.repair_operations
   SET action = jsonb_build_object('legacy', action),
       status = CASE WHEN status IN ('pending', 'awaiting_approval', 'in_progress', 'failed')
                     THEN 'replan_needed' ELSE status END,
       error_message = CASE WHEN status IN ('pending', 'awaiting_approval', 'in_progress', 'failed')
                            THEN 'planned by an older version as SQL text, which this version never runs: plan the repair again'
                            ELSE error_message END;

-- The rows a repair covers: one per row key, written in batches as violations stream
-- in, re-checked at execute time. `digest` is md5 of the row's record text when the
-- repair was planned (null: the row did not exist); `columns` the damaged columns a
-- restore puts back (null: all); `outcome` what the last committed run did with it:
-- `repaired`, or skipped because the row `changed` since planning or is `fixed`
-- (no longer violates).
CREATE TABLE {schema}.repair_targets (
    repair_id     uuid NOT NULL REFERENCES {schema}.repair_operations (id) ON DELETE CASCADE,
    seq           bigserial,
    key           text[] NOT NULL,
    violation_id  uuid,
    columns       text[],
    digest        text,
    outcome       text CHECK (outcome IN ('pending', 'repaired', 'changed', 'fixed')),
    PRIMARY KEY (repair_id, seq),
    UNIQUE (repair_id, key)
);

-- Rows removed by a repair: the full row image, restorable by id.
CREATE TABLE {schema}.repair_quarantine (
    id              bigserial PRIMARY KEY,
    repair_id       uuid NOT NULL REFERENCES {schema}.repair_operations (id),
    table_schema    text NOT NULL,
    table_name      text NOT NULL,
    key             text[] NOT NULL,
    row_image       text NOT NULL,
    quarantined_at  timestamptz NOT NULL DEFAULT now(),
    restored_at     timestamptz,
    restored_by     text
);
CREATE INDEX repair_quarantine_repair_idx ON {schema}.repair_quarantine (repair_id);

-- Rows version 1 deleted are quarantined rows: move their undo records there.
-- Those of repairs already rolled back are recorded as restored then.
INSERT INTO {schema}.repair_quarantine (repair_id, table_schema, table_name, key, row_image,
                                        quarantined_at, restored_at, restored_by)
SELECT u.repair_id, u.table_schema, u.table_name, u.key, u.before_row,
       coalesce(o.completed_at, o.created_at), o.rolled_back_at,
       CASE WHEN o.rolled_back_at IS NOT NULL THEN 'rollback' END
  FROM {schema}.repair_undo u JOIN {schema}.repair_operations o ON o.id = u.repair_id
 WHERE u.action = 'deleted' AND u.before_row IS NOT NULL
 ORDER BY u.repair_id, u.seq;
DELETE FROM {schema}.repair_undo WHERE action = 'deleted';
ALTER TABLE {schema}.repair_undo DROP CONSTRAINT repair_undo_action_check;
ALTER TABLE {schema}.repair_undo ADD CONSTRAINT repair_undo_action_check
    CHECK (action IN ('updated', 'inserted'));
