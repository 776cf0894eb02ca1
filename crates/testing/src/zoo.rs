//! A schema zoo: what real schemas hold, for every engine to run over.
//!
//! [`install`] creates two schemas, `zoo` and `"Zoo Schema"`, with deterministic,
//! **clean** data: no engine should report anything on a fresh zoo, under any of the
//! [`SESSION_SETTINGS`]. Tests plant their own damage on top of it and check that
//! exactly that is found.
//!
//! What it holds:
//! - **tables**: partitioned by range (with a default partition and a hash
//!   sub-partitioned partition), by list (with a default) and by hash; an
//!   inheritance parent with a child; tables without a primary key (one of them
//!   partitioned); quoted mixed-case names in a non-public schema;
//! - **types**: a domain, an enum, arrays, `jsonb`, `json`, `xml`, `point`, stored
//!   generated and identity (`ALWAYS` and `BY DEFAULT`) columns, TOAST-sized text,
//!   `bytea`, `numeric` `NaN` and ±`Infinity`, `float8` `-0` and ±`Infinity`,
//!   `timestamptz`, `interval` and a range, non-ASCII text;
//! - **constraints and indexes**: a `NOT VALID` check and a `NOT VALID` foreign key
//!   (both satisfied by the data), a `NO INHERIT` check, a deferrable foreign key, a
//!   `MATCH FULL` composite foreign key, a foreign key from a partitioned table (cloned
//!   onto each partition) and one to a partitioned table (which PostgreSQL keeps once
//!   per referenced partition), an exclusion constraint, partial and expression unique
//!   indexes, and an **invalid index** (left by a failed `CREATE INDEX CONCURRENTLY`);
//! - **statistics**: a table that was never analysed (`reltuples = -1`, autovacuum
//!   off for it).

use tokio_postgres::Client;

/// One table of the zoo.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ZooTable {
    /// Schema name, unquoted.
    pub schema: &'static str,
    /// Table name, unquoted.
    pub name: &'static str,
    /// Whether the table has a primary key.
    pub primary_key: bool,
    /// Whether it is a partitioned table (holds no rows itself).
    pub partitioned: bool,
    /// Rows [`install`] puts in it (for a partitioned table or an inheritance
    /// parent: in it and its partitions or children together).
    pub rows: i64,
}

impl ZooTable {
    /// `"schema"."name"`, quoted.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote(self.schema), quote(self.name))
    }
}

/// Every table [`install`] creates, partitions and inheritance children included.
pub const TABLES: &[ZooTable] = &[
    t("zoo", "events", true, true, 600),
    t("zoo", "events_2025h1", true, false, 200),
    t("zoo", "events_2025h2", true, true, 200),
    t("zoo", "events_2025h2_p0", true, false, 105),
    t("zoo", "events_2025h2_p1", true, false, 95),
    t("zoo", "events_default", true, false, 200),
    t("zoo", "regions", true, true, 9),
    t("zoo", "regions_eu", true, false, 4),
    t("zoo", "regions_us", true, false, 3),
    t("zoo", "regions_other", true, false, 2),
    t("zoo", "readings", false, true, 300),
    t("zoo", "readings_h0", false, false, 110),
    t("zoo", "readings_h1", false, false, 80),
    t("zoo", "readings_h2", false, false, 110),
    t("zoo", "sensors", true, false, 30),
    t("zoo", "event_notes", true, false, 150),
    t("zoo", "vehicles", true, false, 60),
    t("zoo", "cars", true, false, 20),
    t("zoo", "typed", true, false, 120),
    t("zoo", "accounts", true, false, 100),
    t("zoo", "orders", true, false, 300),
    t("zoo", "order_items", true, false, 600),
    t("zoo", "bookings", true, false, 50),
    t("zoo", "no_pk_log", false, false, 250),
    t("zoo", "never_analyzed", true, false, 400),
    t("Zoo Schema", "MixedCase Table", true, false, 40),
    t("Zoo Schema", "child Rows", true, false, 80),
];

const fn t(
    schema: &'static str,
    name: &'static str,
    primary_key: bool,
    partitioned: bool,
    rows: i64,
) -> ZooTable {
    ZooTable {
        schema,
        name,
        primary_key,
        partitioned,
        rows,
    }
}

/// The name of the index a failed `CREATE INDEX CONCURRENTLY` left invalid.
pub const INVALID_INDEX: &str = "typed_invalid_idx";

/// Session settings that differ from PostgreSQL's defaults, one `(name, value)` per
/// setting, value as SQL. A test sets each with `ALTER DATABASE … SET` or
/// `ALTER ROLE … SET` (so every new session gets it) and checks that nothing is
/// reported. `lc_numeric` needs a locale the server knows: see [`lc_numeric`].
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("TimeZone", "'Pacific/Chatham'"),
    ("DateStyle", "'SQL, DMY'"),
    ("IntervalStyle", "'sql_standard'"),
    ("bytea_output", "'escape'"),
    ("extra_float_digits", "-3"),
];

/// A non-default `lc_numeric` this server accepts (one with a decimal comma when the
/// machine has such a locale), or `None` when it knows only `C`/`POSIX`.
pub async fn lc_numeric(client: &Client) -> Option<String> {
    for candidate in [
        "de_DE.UTF-8",
        "de_DE.utf8",
        "fr_FR.UTF-8",
        "fr_FR.utf8",
        "C.UTF-8",
        "C.utf8",
    ] {
        let set = format!("SET lc_numeric = {}", quote_literal(candidate));
        if client.batch_execute(&set).await.is_ok() {
            let _ = client.batch_execute("RESET lc_numeric").await;
            return Some(candidate.to_owned());
        }
    }
    None
}

/// Creates the zoo in the current database and fills it. Takes a plain client
/// (not a transaction): the invalid index needs `CREATE INDEX CONCURRENTLY`.
pub async fn install(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(DDL).await?;
    client.batch_execute(DATA).await?;
    // Division by zero on the row whose `small` is 3: the concurrent build fails
    // and leaves the index behind, marked invalid.
    let build = client
        .batch_execute(&format!(
            "CREATE INDEX CONCURRENTLY {INVALID_INDEX} ON zoo.typed ((100 / (small - 3)))"
        ))
        .await;
    assert!(
        build.is_err(),
        "the zoo's invalid index was built: its data no longer holds a row with small = 3"
    );
    // Everything but `never_analyzed` gets statistics.
    for table in TABLES.iter().filter(|t| t.name != "never_analyzed") {
        client
            .batch_execute(&format!("ANALYZE {}", table.quoted()))
            .await?;
    }
    Ok(())
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

const DDL: &str = r#"
CREATE SCHEMA zoo;
CREATE SCHEMA "Zoo Schema";

CREATE DOMAIN zoo.positive_int AS integer CHECK (VALUE > 0);
CREATE TYPE zoo.mood AS ENUM ('sad', 'ok', 'happy', 'ecstatic');

-- Range partitions, a default, and a partition sub-partitioned by hash.
CREATE TABLE zoo.events (
    id         bigint NOT NULL,
    created_at timestamptz NOT NULL,
    kind       text NOT NULL,
    payload    jsonb,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE zoo.events_2025h1 PARTITION OF zoo.events
    FOR VALUES FROM ('2025-01-01 00:00:00+00') TO ('2025-07-01 00:00:00+00');
CREATE TABLE zoo.events_2025h2 PARTITION OF zoo.events
    FOR VALUES FROM ('2025-07-01 00:00:00+00') TO ('2026-01-01 00:00:00+00')
    PARTITION BY HASH (id);
CREATE TABLE zoo.events_2025h2_p0 PARTITION OF zoo.events_2025h2 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE zoo.events_2025h2_p1 PARTITION OF zoo.events_2025h2 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE zoo.events_default PARTITION OF zoo.events DEFAULT;

-- List partitions with a default.
CREATE TABLE zoo.regions (
    country text NOT NULL,
    code    text NOT NULL,
    name    text NOT NULL,
    PRIMARY KEY (country, code)
) PARTITION BY LIST (country);
CREATE TABLE zoo.regions_eu PARTITION OF zoo.regions FOR VALUES IN ('DE', 'FR');
CREATE TABLE zoo.regions_us PARTITION OF zoo.regions FOR VALUES IN ('US');
CREATE TABLE zoo.regions_other PARTITION OF zoo.regions DEFAULT;

-- Hash partitions, no primary key.
CREATE TABLE zoo.readings (
    sensor_id integer NOT NULL,
    taken_at  timestamptz NOT NULL,
    value     double precision
) PARTITION BY HASH (sensor_id);
CREATE TABLE zoo.readings_h0 PARTITION OF zoo.readings FOR VALUES WITH (MODULUS 3, REMAINDER 0);
CREATE TABLE zoo.readings_h1 PARTITION OF zoo.readings FOR VALUES WITH (MODULUS 3, REMAINDER 1);
CREATE TABLE zoo.readings_h2 PARTITION OF zoo.readings FOR VALUES WITH (MODULUS 3, REMAINDER 2);

-- A foreign key from a partitioned table (cloned onto each partition), and one to a
-- partitioned table (kept once more per referenced partition).
CREATE TABLE zoo.sensors (
    id    integer PRIMARY KEY,
    label text NOT NULL
);
ALTER TABLE zoo.readings ADD CONSTRAINT readings_sensor_fkey
    FOREIGN KEY (sensor_id) REFERENCES zoo.sensors (id);
CREATE TABLE zoo.event_notes (
    id       integer PRIMARY KEY,
    event_id bigint NOT NULL,
    event_at timestamptz NOT NULL,
    note     text,
    CONSTRAINT event_notes_event_fkey
        FOREIGN KEY (event_id, event_at) REFERENCES zoo.events (id, created_at)
);

-- Inheritance, with a check the child does not inherit.
CREATE TABLE zoo.vehicles (
    id   integer PRIMARY KEY,
    name text NOT NULL,
    CONSTRAINT vehicles_id_small CHECK (id < 1000) NO INHERIT
);
CREATE TABLE zoo.cars (doors integer NOT NULL DEFAULT 4) INHERITS (zoo.vehicles);
ALTER TABLE zoo.cars ADD PRIMARY KEY (id);

-- Every kind of value.
CREATE TABLE zoo.typed (
    id          integer PRIMARY KEY,
    small       integer NOT NULL,
    positive    zoo.positive_int,
    mood        zoo.mood,
    tags        text[],
    scores      integer[],
    doc         jsonb,
    legacy_doc  json,
    markup      xml,
    spot        point,
    big_text    text,
    blob        bytea,
    amount      numeric,
    ratio       double precision,
    happened_at timestamptz,
    took        interval,
    span        tstzrange,
    label       text,
    label_len   integer GENERATED ALWAYS AS (char_length(label)) STORED,
    serial_no   bigint GENERATED ALWAYS AS IDENTITY,
    ticket      bigint GENERATED BY DEFAULT AS IDENTITY
);

-- Unique by partial and expression indexes; a NOT VALID check.
CREATE TABLE zoo.accounts (
    id      integer PRIMARY KEY,
    email   text NOT NULL,
    active  boolean NOT NULL,
    balance numeric(12, 2) NOT NULL
);
CREATE UNIQUE INDEX accounts_active_email_key ON zoo.accounts (email) WHERE active;
CREATE UNIQUE INDEX accounts_lower_email_key ON zoo.accounts (lower(email)) WHERE active;
ALTER TABLE zoo.accounts ADD CONSTRAINT accounts_balance_nonneg CHECK (balance >= 0) NOT VALID;

-- A deferrable foreign key, a NOT VALID one, and a MATCH FULL composite one.
CREATE TABLE zoo.orders (
    id         integer PRIMARY KEY,
    region     text NOT NULL,
    account_id integer NOT NULL
        REFERENCES zoo.accounts (id) DEFERRABLE INITIALLY DEFERRED,
    referrer   integer,
    placed_at  timestamptz NOT NULL,
    UNIQUE (id, region)
);
ALTER TABLE zoo.orders ADD CONSTRAINT orders_referrer_fkey
    FOREIGN KEY (referrer) REFERENCES zoo.accounts (id) NOT VALID;
CREATE TABLE zoo.order_items (
    id       integer PRIMARY KEY,
    order_id integer,
    region   text,
    quantity integer NOT NULL CHECK (quantity > 0),
    FOREIGN KEY (order_id, region) REFERENCES zoo.orders (id, region) MATCH FULL
);

-- An exclusion constraint.
CREATE TABLE zoo.bookings (
    id     integer PRIMARY KEY,
    during tstzrange NOT NULL,
    EXCLUDE USING gist (during WITH &&)
);

-- No primary key, duplicate rows allowed.
CREATE TABLE zoo.no_pk_log (
    at      timestamptz NOT NULL,
    level   text NOT NULL,
    message text
);

-- Never analysed: reltuples stays -1.
CREATE TABLE zoo.never_analyzed (
    id   bigint PRIMARY KEY,
    note text
) WITH (autovacuum_enabled = false);

-- Quoted mixed-case names.
CREATE TABLE "Zoo Schema"."MixedCase Table" (
    "Id"           integer PRIMARY KEY,
    "Display Name" text NOT NULL,
    "Weird ""Quoted"" Col" text
);
CREATE TABLE "Zoo Schema"."child Rows" (
    "Id"     integer PRIMARY KEY,
    "Parent" integer NOT NULL REFERENCES "Zoo Schema"."MixedCase Table" ("Id"),
    "Note"   text
);
"#;

const DATA: &str = r#"
INSERT INTO zoo.events (id, created_at, kind, payload)
SELECT g,
       CASE WHEN g <= 200 THEN timestamptz '2025-01-01 00:00:00+00' + g * interval '13 hours'
            WHEN g <= 400 THEN timestamptz '2025-07-01 00:00:00+00' + (g - 200) * interval '13 hours'
            ELSE timestamptz '2026-02-01 00:00:00+00' + (g - 400) * interval '5 hours' END,
       (ARRAY['login', 'logout', 'purchase', 'refund'])[1 + g % 4],
       jsonb_build_object('seq', g, 'ok', g % 3 <> 0, 'tags', jsonb_build_array('a', g % 7))
  FROM generate_series(1, 600) g;

INSERT INTO zoo.regions (country, code, name) VALUES
    ('DE', 'BY', 'Bayern'), ('DE', 'BE', 'Berlin'), ('FR', 'IDF', 'Île-de-France'),
    ('FR', 'OCC', 'Occitanie'), ('US', 'CA', 'California'), ('US', 'NY', 'New York'),
    ('US', 'TX', 'Texas'), ('JP', '13', '東京都'), ('BR', 'SP', 'São Paulo');

INSERT INTO zoo.sensors (id, label) SELECT s, 'sensor ' || s FROM generate_series(0, 29) s;

INSERT INTO zoo.readings (sensor_id, taken_at, value)
SELECT s, timestamptz '2025-03-01 00:00:00+00' + r * interval '1 minute', (s * 31 + r * 7) % 1000 / 10.0
  FROM generate_series(0, 29) s CROSS JOIN generate_series(1, 10) r
 ORDER BY s, r;

INSERT INTO zoo.event_notes (id, event_id, event_at, note)
SELECT row_number() OVER (ORDER BY e.id), e.id, e.created_at, 'about event ' || e.id
  FROM zoo.events e WHERE e.id % 4 = 1;

INSERT INTO zoo.vehicles (id, name) SELECT g, 'vehicle ' || g FROM generate_series(1, 40) g;
INSERT INTO zoo.cars (id, name, doors) SELECT 1000 + g, 'car ' || g, 2 + 2 * (g % 2) FROM generate_series(1, 20) g;

INSERT INTO zoo.typed (id, small, positive, mood, tags, scores, doc, legacy_doc, markup, spot,
                       big_text, blob, amount, ratio, happened_at, took, span, label)
SELECT g,
       g % 7,
       CASE WHEN g % 5 = 0 THEN NULL ELSE g END,
       (ARRAY['sad', 'ok', 'happy', 'ecstatic']::zoo.mood[])[1 + g % 4],
       ARRAY['t' || g % 3, 'ü' || g % 5],
       ARRAY[g, g * 2, -g],
       jsonb_build_object('n', g, 'nested', jsonb_build_object('pi', 3.14159, 'list', jsonb_build_array(g, NULL, true))),
       json_build_object('legacy', g, 'spaced', 'a  b'),
       xmlelement(name item, xmlattributes(g AS id), 'value ' || g),
       point(g * 1.5, -g / 3.0),
       CASE WHEN g % 10 = 0
            THEN (SELECT string_agg(md5((g * 1000 + i)::text), '') FROM generate_series(1, 400) i)
            ELSE 'short ' || g END,
       CASE WHEN g % 4 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') || '\x00ff'::bytea END,
       CASE g % 12 WHEN 0 THEN 'NaN'::numeric WHEN 1 THEN 'Infinity'::numeric
                   WHEN 2 THEN '-Infinity'::numeric ELSE (g * 12345.6789)::numeric END,
       CASE g % 9 WHEN 0 THEN '-0'::float8 WHEN 1 THEN 'Infinity'::float8
                  WHEN 2 THEN '-Infinity'::float8 WHEN 3 THEN 1e-310 ELSE g / 7.0 END,
       timestamptz '2024-02-29 23:59:59.999999+00' + g * interval '1 day 3 hours',
       make_interval(years => g % 3, months => g % 11, days => g % 29, secs => g * 1.5),
       tstzrange(timestamptz '2025-01-01 00:00:00+00' + g * interval '1 day',
                 timestamptz '2025-01-01 00:00:00+00' + g * interval '1 day' + interval '90 minutes'),
       (ARRAY['naïve café', 'Ελληνικά', '日本語テキスト', 'emoji 🦀', 'plain', E'tab\there', 'quote''s'])[1 + g % 7]
  FROM generate_series(1, 120) g;

INSERT INTO zoo.accounts (id, email, active, balance)
SELECT g,
       -- inactive accounts may repeat an active one's address (the unique indexes are partial)
       CASE WHEN g % 10 = 0 THEN 'user' || (g - 1) || '@example.com' ELSE 'user' || g || '@example.com' END,
       g % 10 <> 0,
       (g * 17 % 1000)::numeric / 4
  FROM generate_series(1, 100) g;

INSERT INTO zoo.orders (id, region, account_id, referrer, placed_at)
SELECT g, (ARRAY['eu', 'us', 'apac'])[1 + g % 3], 1 + g % 100,
       CASE WHEN g % 4 = 0 THEN 1 + (g * 7) % 100 END,
       timestamptz '2025-05-01 00:00:00+00' + g * interval '37 minutes'
  FROM generate_series(1, 300) g;

INSERT INTO zoo.order_items (id, order_id, region, quantity)
SELECT g,
       CASE WHEN g % 50 = 0 THEN NULL ELSE 1 + (g - 1) / 2 END,
       CASE WHEN g % 50 = 0 THEN NULL ELSE (ARRAY['eu', 'us', 'apac'])[1 + (1 + (g - 1) / 2) % 3] END,
       1 + g % 9
  FROM generate_series(1, 600) g;

INSERT INTO zoo.bookings (id, during)
SELECT g, tstzrange(timestamptz '2025-01-01 00:00:00+00' + g * interval '2 hours',
                    timestamptz '2025-01-01 00:00:00+00' + g * interval '2 hours' + interval '90 minutes')
  FROM generate_series(1, 50) g;

INSERT INTO zoo.no_pk_log (at, level, message)
SELECT timestamptz '2025-08-01 00:00:00+00' + (g / 2) * interval '1 second',
       (ARRAY['info', 'warn', 'error'])[1 + g % 3],
       CASE WHEN g % 2 = 0 THEN 'same message' ELSE 'message ' || g END
  FROM generate_series(1, 250) g;

INSERT INTO zoo.never_analyzed (id, note)
SELECT g * 1000, CASE WHEN g % 3 = 0 THEN NULL ELSE 'note ' || g END FROM generate_series(1, 400) g;

INSERT INTO "Zoo Schema"."MixedCase Table" ("Id", "Display Name", "Weird ""Quoted"" Col")
SELECT g, 'Name ' || g, CASE WHEN g % 2 = 0 THEN 'it''s "odd"' END FROM generate_series(1, 40) g;
INSERT INTO "Zoo Schema"."child Rows" ("Id", "Parent", "Note")
SELECT g, 1 + g % 40, 'child of ' || (1 + g % 40) FROM generate_series(1, 80) g;
"#;
