-- A scheduled run is claimed (run_id) under a lease its leader renews
-- (running_until); attempts counts claims of the current run, panics all panics.
ALTER TABLE {schema}.scheduled_tasks
    ADD COLUMN run_id        uuid,
    ADD COLUMN running_until timestamptz,
    ADD COLUMN attempts      integer NOT NULL DEFAULT 0,
    ADD COLUMN panics        bigint NOT NULL DEFAULT 0;
