//! The statements of a parallel restore: each restored table gets a shadow table in
//! its schema, loaded on its own connection; the shadows are swapped in for the live
//! tables with one short transaction (see [`ShadowPlan`]).
//!
//! A shadow is created `LIKE` its table (columns, defaults, generated and identity
//! columns, storage, compression, column comments), in the same tablespace and
//! persistence, with the same owner, options and column settings. After its rows are
//! loaded (`COPY … FREEZE`) its keys and indexes are built under temporary names, its
//! check constraints added (`NOT VALID` ones as `NOT VALID`), and it is analysed.
//! Once every shadow is loaded, the foreign keys among them (and to tables outside
//! the restore) are added, each checked over all rows, several at once.
//!
//! The swap, in one transaction: lock the live tables, rename each away and its
//! shadow into its place, recreate the views over them (their definitions name the
//! tables, which now are the shadows), drop the old tables, give keys, indexes and
//! identity sequences their names back, move serial sequences to the new tables,
//! recreate triggers (in their state) and extended statistics, and apply the
//! tables' grants, replica identity and cluster mark. Every step is catalog work;
//! dropping the old tables frees their files at the commit.
//!
//! What a swap cannot carry over is refused before anything is done, naming each
//! obstacle, so that the caller restores in one transaction instead: partitioned,
//! partition, inheritance and typed tables, invalid indexes, row-level security,
//! publications, column privileges, foreign keys of tables outside the restore
//! that reference a restored table, and objects other than views that depend on a
//! restored table or its row type (materialized views, rules, functions).

use std::collections::BTreeMap;

use sanare_core::{Error, Result, TableRef};
use sanare_pg::{PgResultExt, quote_ident, quote_literal};
use tokio_postgres::GenericClient;

use super::keys::{ForeignKey, foreign_keys};

/// One restored table's shadow.
#[derive(Clone, Debug, Default)]
pub(crate) struct Shadow {
    /// The live table, as `regclass` prints it.
    pub(crate) live: String,
    /// The shadow, schema-qualified and quoted.
    pub(crate) shadow: String,
    /// Creates the shadow (and sets its owner, options and column settings).
    pub(crate) create: Vec<String>,
    /// The `COPY … FREEZE` into it, for the captured columns.
    pub(crate) copy: String,
    /// After the load, in its transaction: keys, indexes, checks, analyse.
    pub(crate) build: Vec<String>,
    /// In the swap, before the renames.
    pub(crate) detach: Vec<String>,
    /// In the swap: the live table renamed away, the shadow into its place.
    pub(crate) rename: Vec<String>,
    /// The live table's name once renamed away (dropped in the swap).
    pub(crate) old: String,
    /// In the swap, after the old table is dropped.
    pub(crate) attach: Vec<String>,
    /// Identity columns whose new sequence takes the old one's name: (column's
    /// name, old sequence's bare quoted name).
    pub(crate) identity: Vec<(String, String)>,
}

/// Everything a parallel restore runs.
#[derive(Clone, Debug, Default)]
pub(crate) struct ShadowPlan {
    /// The shadows, in the order of the tables asked for.
    pub(crate) tables: Vec<Shadow>,
    /// Foreign keys to add once every shadow is loaded (each its own transaction).
    pub(crate) keys: Vec<(String, String)>,
    /// The live tables, each `LOCK`ed at the start of the swap.
    pub(crate) lock: String,
    /// Views over the restored tables, recreated in the swap after the renames.
    pub(crate) views: Vec<String>,
}

/// Plans the shadows of `tables` (with their captured columns); `token` makes the
/// shadows' names unique. Refuses with every obstacle named when one table cannot
/// be swapped.
pub(crate) async fn plan(
    client: &impl GenericClient,
    tables: &[(TableRef, Vec<String>)],
    token: &str,
) -> Result<ShadowPlan> {
    let mut out = ShadowPlan::default();
    let mut obstacles = Vec::new();
    let mut oids = Vec::new();
    let mut shadow_of: BTreeMap<u32, String> = BTreeMap::new();
    let mut views: BTreeMap<u32, String> = BTreeMap::new();
    for (n, (table, columns)) in tables.iter().enumerate() {
        let (oid, shadow) =
            table_plan(client, table, columns, token, n, &mut obstacles, &mut views).await?;
        oids.push(oid);
        shadow_of.insert(oid, shadow.shadow.clone());
        out.tables.push(shadow);
    }
    let (keys, hashjoin) = foreign_keys(client, &oids, &oids).await?;
    for k in keys {
        if !k.inside {
            obstacles.push(format!(
                "{} is referenced by foreign key {} of {}, which is not restored",
                k.parent_name, k.name, k.table
            ));
            continue;
        }
        let Some(child) = out.tables.iter().find(|s| s.live == k.table) else {
            continue;
        };
        let (live, child) = (child.live.clone(), child.shadow.clone());
        let mut def = k.def.clone();
        if let Some(parent) = shadow_of.get(&k.parent) {
            let from = format!(" REFERENCES {}(", k.parent_name);
            if !def.contains(&from) {
                obstacles.push(format!(
                    "foreign key {} of {} could not be read",
                    k.name, k.table
                ));
                continue;
            }
            def = def.replacen(&from, &format!(" REFERENCES {parent}("), 1);
        }
        let shadow_key = ForeignKey {
            table: child,
            def,
            ..k
        };
        out.keys.push((
            format!("checking foreign key {} of {}", shadow_key.name, live),
            shadow_key.rebuild_sql(&hashjoin),
        ));
    }
    if !obstacles.is_empty() {
        return Err(Error::conflict(format!(
            "a parallel restore cannot swap these tables in: {}; restore them in one \
             transaction (the default mode) instead",
            obstacles.join("; ")
        )));
    }
    out.lock = format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        out.tables
            .iter()
            .map(|s| s.live.clone())
            .collect::<Vec<_>>()
            .join(", ")
    );
    out.views = views.into_values().collect();
    Ok(out)
}

/// Plans one table's shadow; pushes what prevents it to `obstacles`, and the
/// views over it (by oid: a view over two restored tables is recreated once).
async fn table_plan(
    client: &impl GenericClient,
    table: &TableRef,
    columns: &[String],
    token: &str,
    n: usize,
    obstacles: &mut Vec<String>,
    views: &mut BTreeMap<u32, String>,
) -> Result<(u32, Shadow)> {
    let f = TableFacts::read(client, table).await?;
    f.obstacles(obstacles);
    let (nsp, rel, live) = (&f.nsp, &f.rel, &f.live);
    let shadow_bare = format!("sanare_shadow_{token}_{n}");
    let shadow = format!("{nsp}.{shadow_bare}");
    let old_bare = format!("sanare_old_{token}_{n}");
    let mut s = Shadow {
        live: live.clone(),
        shadow: shadow.clone(),
        old: format!("{nsp}.{old_bare}"),
        ..Shadow::default()
    };
    f.create_statements(&mut s, columns);
    columns_plan(client, f.oid, live, &mut s).await?;
    let renames = keys_and_indexes(client, f.oid, nsp, rel, &mut s, obstacles).await?;
    dependents(client, f.oid, live, obstacles, views).await?;
    // The swap.
    s.rename
        .push(format!("ALTER TABLE {live} RENAME TO {old_bare}"));
    s.rename
        .push(format!("ALTER TABLE {shadow} RENAME TO {rel}"));
    let new = format!("{nsp}.{rel}");
    // Names first: what follows (replica identity, cluster mark) names indexes.
    let named: Vec<String> = renames
        .into_iter()
        .map(|(tmp, orig, is_key)| {
            if is_key {
                format!("ALTER TABLE {new} RENAME CONSTRAINT {tmp} TO {orig}")
            } else {
                format!("ALTER INDEX {nsp}.{tmp} RENAME TO {orig}")
            }
        })
        .collect();
    s.attach.splice(0..0, named);
    f.attach_statements(client, &new, &mut s).await?;
    Ok((f.oid, s))
}

/// What the catalog says of one table that its shadow must repeat or that
/// prevents a swap.
struct TableFacts {
    oid: u32,
    /// A plain table: not partitioned, a partition, in an inheritance tree or typed.
    simple: bool,
    unlogged: bool,
    tablespace: Option<String>,
    options: Option<String>,
    /// Row-level security on, forced, or policies defined.
    rls: bool,
    /// Quoted.
    owner: String,
    comment: Option<String>,
    replident: String,
    /// Its schema and name, quoted.
    nsp: String,
    rel: String,
    /// As `regclass` prints it.
    live: String,
    published: bool,
    column_acl: bool,
    /// No grants recorded: the owner's defaults.
    default_acl: bool,
}

impl TableFacts {
    async fn read(client: &impl GenericClient, table: &TableRef) -> Result<Self> {
        let r = client
            .query_opt(
                "SELECT c.oid, c.relkind = 'r' AND NOT c.relispartition AND NOT c.relhassubclass
                          AND NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = c.oid)
                          AND c.reloftype = 0,
                        c.relpersistence = 'u', (SELECT spcname FROM pg_tablespace WHERE oid = c.reltablespace),
                        array_to_string(c.reloptions, ', '), c.relrowsecurity OR c.relforcerowsecurity
                          OR EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = c.oid),
                        quote_ident(pg_get_userbyid(c.relowner)), obj_description(c.oid, 'pg_class'),
                        c.relreplident::text, quote_ident(n.nspname), quote_ident(c.relname),
                        c.oid::regclass::text,
                        EXISTS (SELECT 1 FROM pg_publication_rel WHERE prrelid = c.oid),
                        EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = c.oid AND attacl IS NOT NULL),
                        c.relacl IS NULL
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&table.schema, &table.name],
            )
            .await
            .with_context(|| format!("reading the catalog entry of {table} for a parallel restore"))?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "table {table} in the live database (restore it into a scratch schema with \
                     `--into`, or create it first)"
                ))
            })?;
        Ok(Self {
            oid: r.get(0),
            simple: r.get(1),
            unlogged: r.get(2),
            tablespace: r.get(3),
            options: r.get(4),
            rls: r.get(5),
            owner: r.get(6),
            comment: r.get(7),
            replident: r.get(8),
            nsp: r.get(9),
            rel: r.get(10),
            live: r.get(11),
            published: r.get(12),
            column_acl: r.get(13),
            default_acl: r.get(14),
        })
    }

    /// Pushes to `obstacles` what of this table a swap cannot carry over.
    fn obstacles(&self, obstacles: &mut Vec<String>) {
        for (bad, what) in [
            (
                !self.simple,
                "is partitioned, a partition, or part of an inheritance tree or a typed table",
            ),
            (self.rls, "has row-level security"),
            (self.published, "is in a publication"),
            (self.column_acl, "has column privileges"),
        ] {
            if bad {
                obstacles.push(format!("{} {what}", self.live));
            }
        }
    }

    /// The statements that create the shadow `s` (owner, comment) and load the
    /// captured `columns` into it.
    fn create_statements(&self, s: &mut Shadow, columns: &[String]) {
        let (live, shadow) = (&self.live, &s.shadow);
        s.create.push(format!(
            "CREATE {}TABLE {shadow} (LIKE {live} INCLUDING DEFAULTS INCLUDING GENERATED \
             INCLUDING IDENTITY INCLUDING STORAGE INCLUDING COMPRESSION INCLUDING COMMENTS){}{}",
            if self.unlogged { "UNLOGGED " } else { "" },
            self.options
                .as_ref()
                .filter(|o| !o.is_empty())
                .map(|o| format!(" WITH ({o})"))
                .unwrap_or_default(),
            self.tablespace
                .as_ref()
                .map(|t| format!(" TABLESPACE {}", quote_ident(t)))
                .unwrap_or_default(),
        ));
        s.create
            .push(format!("ALTER TABLE {shadow} OWNER TO {}", self.owner));
        if let Some(c) = &self.comment {
            s.create
                .push(format!("COMMENT ON TABLE {shadow} IS {}", quote_literal(c)));
        }
        let quoted_cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        s.copy = format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary, FREEZE)",
            s.shadow,
            quoted_cols.join(", ")
        );
    }

    /// The swap's statements after the old table is dropped, on the table now
    /// named `new`: its triggers (in their state), extended statistics, grants
    /// and replica identity.
    async fn attach_statements(
        &self,
        client: &impl GenericClient,
        new: &str,
        s: &mut Shadow,
    ) -> Result<()> {
        let ctx = || {
            format!(
                "reading the catalog entry of {} for a parallel restore",
                self.live
            )
        };
        let oid = self.oid;
        let triggers = client
            .query(
                "SELECT pg_get_triggerdef(oid), quote_ident(tgname), tgenabled::text FROM pg_trigger
                  WHERE tgrelid = $1 AND NOT tgisinternal ORDER BY tgname",
                &[&oid],
            )
            .await
            .with_context(ctx)?;
        for t in &triggers {
            let (def, name, state): (String, String, String) = (t.get(0), t.get(1), t.get(2));
            s.attach.push(def);
            let state = match state.as_str() {
                "D" => "DISABLE",
                "R" => "ENABLE REPLICA",
                "A" => "ENABLE ALWAYS",
                _ => continue,
            };
            s.attach
                .push(format!("ALTER TABLE {new} {state} TRIGGER {name}"));
        }
        let stats = client
            .query(
                "SELECT pg_get_statisticsobjdef(oid) FROM pg_statistic_ext WHERE stxrelid = $1 ORDER BY oid",
                &[&oid],
            )
            .await
            .with_context(ctx)?;
        s.attach.extend(stats.iter().map(|r| r.get::<_, String>(0)));
        // Grants: the new table's (its creator's defaults) replaced by the old one's.
        if !self.default_acl {
            let grants = client
                .query(
                    "SELECT format('GRANT %s ON %s TO %s%s', a.privilege_type, $2::text,
                                   CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                                   CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
                       FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = $1",
                    &[&oid, &new],
                )
                .await
                .with_context(ctx)?;
            s.attach
                .push(format!("REVOKE ALL ON {new} FROM PUBLIC, {}", self.owner));
            s.attach
                .extend(grants.iter().map(|r| r.get::<_, String>(0)));
        }
        match self.replident.as_str() {
            "f" => s
                .attach
                .push(format!("ALTER TABLE {new} REPLICA IDENTITY FULL")),
            "n" => s
                .attach
                .push(format!("ALTER TABLE {new} REPLICA IDENTITY NOTHING")),
            _ => {}
        }
        Ok(())
    }
}
/// sequences to rename.
async fn columns_plan(
    client: &impl GenericClient,
    oid: u32,
    live: &str,
    s: &mut Shadow,
) -> Result<()> {
    let rows = client
        .query(
            "SELECT quote_ident(a.attname), a.attidentity <> '', coalesce(a.attstattarget, -1)::int4,
                    a.attname::text,
                    array_to_string(a.attoptions, ', '),
                    pg_get_serial_sequence($2, a.attname),
                    (SELECT quote_ident(sc.relname) FROM pg_class sc
                      WHERE sc.oid = pg_get_serial_sequence($2, a.attname)::regclass)
               FROM pg_attribute a
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&oid, &live],
        )
        .await
        .with_context(|| format!("reading the columns of {live}"))?;
    for r in &rows {
        let (col, identity, stat, raw, opts): (String, bool, i32, String, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let (seq, seq_bare): (Option<String>, Option<String>) = (r.get(5), r.get(6));
        if stat >= 0 {
            s.create.push(format!(
                "ALTER TABLE {} ALTER COLUMN {col} SET STATISTICS {stat}",
                s.shadow
            ));
        }
        if let Some(o) = opts.filter(|o| !o.is_empty()) {
            s.create.push(format!(
                "ALTER TABLE {} ALTER COLUMN {col} SET ({o})",
                s.shadow
            ));
        }
        match (seq, seq_bare, identity) {
            (Some(_), Some(bare), true) => s.identity.push((raw, bare)),
            (Some(seq), _, false) => {
                // Owned by the live table's column: moved to the new table before
                // the old one is dropped (which would drop it).
                s.detach.push(format!("ALTER SEQUENCE {seq} OWNED BY NONE"));
                s.attach
                    .push(format!("ALTER SEQUENCE {seq} OWNED BY {}.{col}", s.live));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Keys, check constraints and indexes of the shadow, built after its load under
/// temporary names; returns the renames for the swap: (temporary, original, is a
/// constraint).
async fn keys_and_indexes(
    client: &impl GenericClient,
    oid: u32,
    nsp: &str,
    rel: &str,
    s: &mut Shadow,
    obstacles: &mut Vec<String>,
) -> Result<Vec<(String, String, bool)>> {
    let default: String = client
        .query_one("SELECT current_setting('default_tablespace')", &[])
        .await
        .with_context(|| format!("reading the keys and indexes of {}", s.live))?
        .get(0);
    let place = Tablespaces { default };
    let new = format!("{nsp}.{rel}");
    let mut renames = constraints_plan(client, oid, nsp, &new, &place, s).await?;
    renames.extend(indexes_plan(client, oid, (nsp, rel), &new, &place, s, obstacles).await?);
    s.build.push(format!("ANALYZE {}", s.shadow));
    Ok(renames)
}

/// Builds an index in its own tablespace, the session's default around it.
struct Tablespaces {
    default: String,
}

impl Tablespaces {
    fn wrap(&self, ts: &Option<String>, sql: String) -> String {
        match ts {
            Some(ts) => format!(
                "SET LOCAL default_tablespace = {}; {sql}; SET LOCAL default_tablespace = {}",
                quote_literal(ts),
                quote_literal(&self.default)
            ),
            None => sql,
        }
    }
}

/// The shadow's key, exclusion and check constraints (`new`: the table's name
/// after the swap); returns the renames of the keys.
async fn constraints_plan(
    client: &impl GenericClient,
    oid: u32,
    nsp: &str,
    new: &str,
    place: &Tablespaces,
    s: &mut Shadow,
) -> Result<Vec<(String, String, bool)>> {
    let rows = client
        .query(
            "SELECT quote_ident(c.conname), pg_get_constraintdef(c.oid), c.contype::text,
                    obj_description(c.oid, 'pg_constraint'), obj_description(c.conindid, 'pg_class'),
                    (SELECT spcname FROM pg_tablespace t JOIN pg_class ic ON ic.reltablespace = t.oid
                      WHERE ic.oid = c.conindid),
                    coalesce(i.indisreplident, false), coalesce(i.indisclustered, false)
               FROM pg_constraint c LEFT JOIN pg_index i ON i.indexrelid = c.conindid
              WHERE c.conrelid = $1 AND c.contype IN ('p', 'u', 'x', 'c')
              ORDER BY c.contype = 'c', c.oid",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading the keys of {}", s.live))?;
    let mut renames = Vec::new();
    for (k, r) in rows.iter().enumerate() {
        let (name, def, kind): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let (comment, index_comment, ts): (Option<String>, Option<String>, Option<String>) =
            (r.get(3), r.get(4), r.get(5));
        let shadow = &s.shadow;
        if kind == "c" {
            // Per-table names: the original one at once. A valid check is there
            // before the load, so a row that breaks it is named; a NOT VALID one
            // comes after it, unchecked.
            let to = if def.ends_with(" NOT VALID") {
                &mut s.build
            } else {
                &mut s.create
            };
            to.push(format!("ALTER TABLE {shadow} ADD CONSTRAINT {name} {def}"));
            if let Some(c) = comment {
                to.push(format!(
                    "COMMENT ON CONSTRAINT {name} ON {shadow} IS {}",
                    quote_literal(&c)
                ));
            }
            continue;
        }
        // Key names are index names, unique in the schema: temporary until the swap.
        let tmp = format!("sanare_shadow_{}_k{k}", s.shadow_suffix());
        s.build.push(place.wrap(
            &ts,
            format!("ALTER TABLE {shadow} ADD CONSTRAINT {tmp} {def}"),
        ));
        if let Some(c) = comment {
            s.build.push(format!(
                "COMMENT ON CONSTRAINT {tmp} ON {shadow} IS {}",
                quote_literal(&c)
            ));
        }
        if let Some(c) = index_comment {
            s.build.push(format!(
                "COMMENT ON INDEX {nsp}.{tmp} IS {}",
                quote_literal(&c)
            ));
        }
        s.index_marks(new, &name, r.get(6), r.get(7));
        renames.push((tmp, name, true));
    }
    Ok(renames)
}

/// The shadow's indexes that back no constraint (`(nsp, rel)`: the table's
/// quoted schema and name; `new`: its name after the swap); an invalid one is an
/// obstacle. Returns their renames.
async fn indexes_plan(
    client: &impl GenericClient,
    oid: u32,
    (nsp, rel): (&str, &str),
    new: &str,
    place: &Tablespaces,
    s: &mut Shadow,
    obstacles: &mut Vec<String>,
) -> Result<Vec<(String, String, bool)>> {
    let rows = client
        .query(
            "SELECT quote_ident(ic.relname), pg_get_indexdef(i.indexrelid), i.indisunique,
                    i.indisvalid AND i.indisready AND i.indislive,
                    obj_description(i.indexrelid, 'pg_class'),
                    (SELECT spcname FROM pg_tablespace WHERE oid = ic.reltablespace),
                    i.indisreplident, i.indisclustered,
                    ARRAY(SELECT format('%s %s', a.attnum, a.attstattarget) FROM pg_attribute a
                           WHERE a.attrelid = i.indexrelid AND a.attstattarget >= 0 ORDER BY a.attnum)
               FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
              WHERE i.indrelid = $1
                AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid
                                   AND c.contype IN ('p', 'u', 'x'))
              ORDER BY i.indexrelid",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading the indexes of {}", s.live))?;
    let mut renames = Vec::new();
    for (k, r) in rows.iter().enumerate() {
        let (name, def, unique, valid): (String, String, bool, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let (comment, ts): (Option<String>, Option<String>) = (r.get(4), r.get(5));
        let stats: Vec<String> = r.get(8);
        if !valid {
            obstacles.push(format!(
                "index {nsp}.{name} of {} is invalid (a shadow cannot have it so)",
                s.live
            ));
            continue;
        }
        let unique = if unique { "UNIQUE " } else { "" };
        let prefix = format!("CREATE {unique}INDEX {name} ON {nsp}.{rel} USING ");
        let Some(rest) = def.strip_prefix(&prefix) else {
            obstacles.push(format!(
                "index {nsp}.{name} of {} could not be read",
                s.live
            ));
            continue;
        };
        let tmp = format!("sanare_shadow_{}_i{k}", s.shadow_suffix());
        s.build.push(place.wrap(
            &ts,
            format!("CREATE {unique}INDEX {tmp} ON {} USING {rest}", s.shadow),
        ));
        if let Some(c) = comment {
            s.build.push(format!(
                "COMMENT ON INDEX {nsp}.{tmp} IS {}",
                quote_literal(&c)
            ));
        }
        for st in &stats {
            if let Some((col, target)) = st.split_once(' ') {
                s.build.push(format!(
                    "ALTER INDEX {nsp}.{tmp} ALTER COLUMN {col} SET STATISTICS {target}"
                ));
            }
        }
        s.index_marks(new, &name, r.get(6), r.get(7));
        renames.push((tmp, name, false));
    }
    Ok(renames)
}

impl Shadow {
    /// In the swap, on the table named `new`: the replica identity and the
    /// cluster mark that index `name` carried.
    fn index_marks(&mut self, new: &str, name: &str, replident: bool, clustered: bool) {
        if replident {
            self.attach.push(format!(
                "ALTER TABLE {new} REPLICA IDENTITY USING INDEX {name}"
            ));
        }
        if clustered {
            self.attach
                .push(format!("ALTER TABLE {new} CLUSTER ON {name}"));
        }
    }

    /// The `<token>_<n>` part of the shadow's name.
    fn shadow_suffix(&self) -> &str {
        self.shadow
            .rsplit_once("sanare_shadow_")
            .map_or("", |(_, s)| s)
    }
}

/// What depends on the table: views are recreated in the swap (their definitions
/// read now), anything else is an obstacle.
async fn dependents(
    client: &impl GenericClient,
    oid: u32,
    live: &str,
    obstacles: &mut Vec<String>,
    views: &mut BTreeMap<u32, String>,
) -> Result<()> {
    let rows = client
        .query(
            "SELECT DISTINCT v.relkind = 'v' AND v.oid <> $1, v.oid,
                    pg_describe_object(d.classid, d.objid, d.objsubid),
                    CASE WHEN v.relkind = 'v' THEN format('CREATE OR REPLACE VIEW %s%s AS %s',
                         v.oid::regclass,
                         CASE WHEN v.reloptions IS NOT NULL
                              THEN ' WITH (' || array_to_string(v.reloptions, ', ') || ')' ELSE '' END,
                         pg_get_viewdef(v.oid)) END
               FROM pg_depend d
               LEFT JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
               LEFT JOIN pg_class v ON v.oid = r.ev_class
              WHERE ((d.refclassid = 'pg_class'::regclass AND d.refobjid = $1)
                     OR (d.refclassid = 'pg_type'::regclass
                         AND d.refobjid = (SELECT reltype FROM pg_class WHERE oid = $1)))
                AND d.deptype = 'n'
                -- Foreign keys are planned apart; the table's own defaults, triggers,
                -- statistics and indexes come with it.
                AND d.classid <> 'pg_constraint'::regclass
                AND NOT (d.classid = 'pg_attrdef'::regclass
                         AND d.objid IN (SELECT oid FROM pg_attrdef WHERE adrelid = $1))
                AND NOT (d.classid = 'pg_trigger'::regclass
                         AND d.objid IN (SELECT oid FROM pg_trigger WHERE tgrelid = $1))
                AND NOT (d.classid = 'pg_statistic_ext'::regclass
                         AND d.objid IN (SELECT oid FROM pg_statistic_ext WHERE stxrelid = $1))
                AND NOT (d.classid = 'pg_class'::regclass
                         AND (d.objid = $1 OR d.objid IN (SELECT indexrelid FROM pg_index WHERE indrelid = $1)))",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading what depends on {live}"))?;
    for r in &rows {
        let (is_view, view, what, def): (Option<bool>, Option<u32>, String, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        match (is_view, view, def) {
            (Some(true), Some(v), Some(def)) => {
                views.insert(v, def);
            }
            _ => obstacles.push(format!("{what} depends on {live}")),
        }
    }
    Ok(())
}
