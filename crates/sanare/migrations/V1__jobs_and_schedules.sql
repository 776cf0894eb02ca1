CREATE TABLE {schema}.jobs (
    id           uuid PRIMARY KEY,
    batch_id     uuid NOT NULL,
    kind         text NOT NULL,
    payload      jsonb NOT NULL,
    status       text NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'running', 'done', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 3,
    claimed_by   text,
    lease_until  timestamptz,
    result       jsonb,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX jobs_claimable_idx ON {schema}.jobs (kind, created_at)
    WHERE status IN ('queued', 'running');
CREATE INDEX jobs_batch_idx ON {schema}.jobs (batch_id);

CREATE TABLE {schema}.scheduled_tasks (
    name              text PRIMARY KEY,
    last_started_at   timestamptz,
    last_finished_at  timestamptz,
    last_outcome      text,
    last_error        text,
    leader            text
);
