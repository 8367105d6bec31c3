//! The schema and its migrations.

/// The newest schema version this build writes.
pub(super) const SCHEMA_VERSION: i64 = 10;

/// Schema migrations, applied in order; entry `i` takes the schema to version `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE instances (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    machine     TEXT NOT NULL,
    status      TEXT NOT NULL,
    context     TEXT NOT NULL,
    result      TEXT,
    error       TEXT,
    parent      TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    ended_at    BIGINT
);
CREATE INDEX instances_by_machine ON instances (machine, id);
CREATE INDEX instances_by_status ON instances (status, id);
CREATE INDEX instances_by_parent ON instances (parent) WHERE parent IS NOT NULL;
CREATE INDEX instances_ended ON instances (ended_at) WHERE status <> 'running';

-- No foreign keys to `instances`: every insert would share-lock the instance's row, and the
-- branches of one instance (100,000 of them, say) would all contend for that one row.
-- phasm deletes an instance's rows itself.
CREATE TABLE tasks (
    id               BIGSERIAL PRIMARY KEY,
    instance_id      BIGINT NOT NULL,
    name             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    from_state       TEXT,
    event            TEXT NOT NULL,
    context          TEXT NOT NULL,
    step             BIGINT NOT NULL,
    branch           TEXT NOT NULL,
    queue            TEXT NOT NULL,
    target           TEXT,
    status           TEXT NOT NULL,
    due_at           BIGINT NOT NULL,
    claim            BIGINT NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    attempts         BIGINT NOT NULL DEFAULT 0,
    first_attempt_at BIGINT,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    token            TEXT,
    grp              TEXT,
    page_queued      BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (instance_id, name)
);
CREATE INDEX tasks_ready ON tasks (due_at) WHERE status = 'ready';
CREATE INDEX tasks_waiting ON tasks (instance_id) WHERE status = 'waiting';
CREATE INDEX tasks_joins ON tasks (instance_id, from_state, grp) WHERE kind = 'join';

CREATE TABLE history (
    id          BIGSERIAL PRIMARY KEY,
    instance_id BIGINT NOT NULL,
    from_state  TEXT,
    event       TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    task        TEXT NOT NULL,
    branch      TEXT NOT NULL,
    ends_branch BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX history_by_instance ON history (instance_id, id);

CREATE TABLE logs (
    id          BIGSERIAL PRIMARY KEY,
    instance_id BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    level       TEXT NOT NULL,
    message     TEXT NOT NULL,
    task        TEXT NOT NULL
);
CREATE INDEX logs_by_instance ON logs (instance_id, id);

CREATE TABLE items (
    id          BIGSERIAL PRIMARY KEY,
    instance_id BIGINT NOT NULL,
    state       TEXT NOT NULL,
    grp         TEXT NOT NULL,
    context     TEXT NOT NULL,
    branch      TEXT NOT NULL,
    step        BIGINT NOT NULL,
    join_task   BIGINT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX items_by_group ON items (instance_id, state, grp, id);
CREATE INDEX items_by_join ON items (join_task) WHERE join_task IS NOT NULL;
-- Counting a queue's running steps across workers (`max_concurrent`).
CREATE INDEX tasks_leased ON tasks (queue) WHERE lease_owner IS NOT NULL;

-- A queue's `rate`, shared by every worker: a token bucket.
CREATE TABLE queue_rates (
    queue      TEXT PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,
    updated_at BIGINT NOT NULL
);
",
    r"
-- Workers say they are alive (and what they take), so status can tell that no worker will
-- take a step.
CREATE TABLE workers (
    owner      TEXT PRIMARY KEY,
    machines   TEXT NOT NULL,
    targets    TEXT,
    queues     TEXT,
    started_at BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
",
    r"
-- Instances a commit may have completed, queued in that commit's transaction and removed by
-- the check right after it: what is left here is what a dead worker left unchecked, and all
-- the sweep looks at (it no longer scans every running instance).
CREATE TABLE settle_queue (
    instance_id BIGINT PRIMARY KEY,
    queued_at   BIGINT NOT NULL
);
",
    r"
-- Waiting for events from outside. A waiting branch is a task of kind 'wait' (due at its
-- timeout, or never); `accepts` says how each event it accepts is dispatched.
ALTER TABLE tasks ADD COLUMN accepts TEXT;
CREATE INDEX tasks_waits ON tasks (instance_id) WHERE kind = 'wait';
-- Events accepted while no branch waited for them, in order, until a wait takes them.
CREATE TABLE events (
    id          BIGSERIAL PRIMARY KEY,
    instance_id BIGINT NOT NULL,
    event       TEXT NOT NULL,
    data        TEXT NOT NULL,
    event_id    TEXT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX events_by_instance ON events (instance_id, id);
-- The ids of events accepted per instance: the same id sent again changes nothing.
CREATE TABLE deliveries (
    instance_id BIGINT NOT NULL,
    event_id    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (instance_id, event_id)
);
-- Keys made once per database: `wait_token` signs wait tokens.
CREATE TABLE phasm_keys (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO phasm_keys (name, value)
VALUES ('wait_token', replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));
",
    r"
-- Schedules: the last tick each fired. A tick fires only when it is later than `last_tick`,
-- which every worker checks and moves in one transaction, the row locked (the fence).
CREATE TABLE schedules (
    name          TEXT PRIMARY KEY,
    last_tick     BIGINT NOT NULL,
    last_instance TEXT,
    updated_at    BIGINT NOT NULL
);
",
    r"
-- The console's machine page counts running and failed instances of one machine, and what
-- ended lately; both through an index, however many instances ended long ago.
CREATE INDEX instances_by_machine_status ON instances (machine, status);
CREATE INDEX instances_ended_by_machine ON instances (machine, ended_at, status)
    WHERE status <> 'running';
-- An instance's tasks in order (the list shows each instance's oldest pending step).
CREATE INDEX tasks_by_instance ON tasks (instance_id, id);
-- What a worker says of itself besides what it takes (host, pid, version, concurrency,
-- steps in flight), as JSON.
ALTER TABLE workers ADD COLUMN about TEXT;
",
    r"
-- Each step keeps the context it was given and its step number: the console shows a step's
-- context before and after, and a reset runs a chosen step again from exactly that context.
ALTER TABLE history ADD COLUMN context TEXT;
ALTER TABLE history ADD COLUMN step BIGINT;
-- A reset runs an instance again: the history rows up to this id belong to its earlier runs,
-- so its branch counts and end states are of the run since.
ALTER TABLE instances ADD COLUMN reset_after BIGINT NOT NULL DEFAULT 0;
-- The instance list with a created range: newest first through this index, however many
-- instances were created since (one entry per instance started).
CREATE INDEX instances_by_created ON instances (created_at, id);
",
    r"
-- Machines live in the database: every deploy stores each machine whose definition changed
-- as its next version (immutable, numbered from 1 per machine).
CREATE TABLE machine_versions (
    id          BIGSERIAL PRIMARY KEY,
    machine     TEXT NOT NULL,
    version     INTEGER NOT NULL,
    hash        TEXT NOT NULL,
    definition  TEXT NOT NULL,
    source      TEXT NOT NULL,
    path        TEXT NOT NULL,
    deployed_at BIGINT NOT NULL,
    UNIQUE (machine, version)
);
-- The version an instance started on (a machine_versions id): the latest of its machine when
-- it started; NULL for one started before its machine was first deployed, which that first
-- deploy adopts as version 1.
ALTER TABLE instances ADD COLUMN version BIGINT;
",
    r"
-- The live instances of each version (running or failed; ended ones are not counted), for
-- the counts `phasm versions` shows.
CREATE INDEX instances_live_by_version ON instances (version, status)
    WHERE status IN ('running', 'failed');
",
    r"
-- Claims take due tasks oldest first and, among tasks due at the same time, in the order
-- they were queued (as SQLite's index, which ends with the row id, reads them): the index
-- holds that order, so a claim reads its few candidates without sorting every tie (a fork's
-- branches are all due at once).
DROP INDEX tasks_ready;
CREATE INDEX tasks_ready ON tasks (due_at, id) WHERE status = 'ready';
",
];

/// Any number, the same in every phasm: serialises schema migrations of workers starting at
/// once.
pub(super) const MIGRATION_LOCK: i64 = 0x7068_6173_6d00;
