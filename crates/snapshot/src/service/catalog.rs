//! The repository this service opens and the catalog as a cache of it.
//!
//! The store is the truth about what snapshots exist: each has a manifest there,
//! naming its repository and the database it was captured from. The catalog in
//! the database records every snapshot with the repository it lives in, so a
//! process only ever verifies, restores, collects, lists as available or marks the
//! snapshots of the repository its store holds. When the store holds snapshots of
//! this database the catalog lacks (a catalog lost or restored from an older
//! dump), they are imported, once their manifests are authenticated.

use super::*;

/// The repository of this service's store, as opened.
#[derive(Clone, Debug)]
pub(super) struct Opened {
    /// Its identity.
    pub(super) config: RepositoryConfig,
    /// The id of this database's snapshot catalog (`None` without a catalog).
    pub(super) database: Option<uuid::Uuid>,
}

/// Where a listed snapshot is, seen from the repository this service opens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "where", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Availability {
    /// In the repository this service opens.
    Here,
    /// In another repository, not opened here: never verified, restored,
    /// collected or marked by this service.
    OtherRepository {
        /// That repository (`None`: taken before repositories had ids, in a
        /// store not opened since).
        repository: Option<RepositoryId>,
        /// Where that repository's store was last seen, if known.
        location: Option<String>,
    },
    /// In this repository's store but not in the catalog: another database's
    /// snapshot sharing the store, or one whose manifest cannot be authenticated.
    StoreOnly {
        /// Whether its manifest is signed with this service's key.
        authenticated: bool,
        /// The database it was captured from (the id in that database's catalog).
        database: Option<uuid::Uuid>,
    },
}

/// One snapshot of a [`RepositoryListing`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ListedSnapshot {
    /// What the catalog (or the manifest) says.
    #[serde(flatten)]
    pub info: SnapshotInfo,
    /// Where it is.
    pub availability: Availability,
}

/// Every snapshot the catalog or the store knows, and which repository is open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepositoryListing {
    /// The repository this service's store holds (`None`: it holds none yet).
    pub repository: Option<RepositoryConfig>,
    /// Where the store is.
    pub location: String,
    /// Whether the store keeps its objects inside the database it protects
    /// (losing the database then loses the snapshots too).
    pub inside_protected_database: bool,
    /// Whether a catalog was read (without one, only the store is listed).
    pub catalog: bool,
    /// Every snapshot, newest first.
    pub snapshots: Vec<ListedSnapshot>,
}

/// A pool that never connects, for a service without a catalog.
pub(super) fn no_database_pool() -> Result<Pool> {
    let manager = deadpool_postgres::Manager::from_config(
        tokio_postgres::Config::new(),
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig::default(),
    );
    Pool::builder(manager)
        .max_size(1)
        .build()
        .map_err(|e| Error::other("building a service without a catalog", e))
}

/// The repository a catalog names, when the store opened holds none.
struct Expected {
    repository: Option<RepositoryId>,
    location: Option<String>,
    snapshots: i64,
}

/// A manifest's snapshot as the catalog would describe it.
pub(super) fn info_from_manifest(m: &Manifest, status: SnapshotStatus) -> SnapshotInfo {
    let id = SnapshotId::from_uuid(uuid::Uuid::from_bytes(m.id));
    let mut info = SnapshotInfo::new(id, crate::repo::from_unix_us(m.created_at_us), status);
    info.label = m.label.clone();
    info.base = m
        .base
        .map(|b| SnapshotId::from_uuid(uuid::Uuid::from_bytes(b)));
    info.journal_cut = m.journal_cut.as_ref().map(|c| JournalCut {
        position: JournalPosition(c.position),
        db_snapshot: c.db_snapshot.clone(),
    });
    info.tables = m
        .tables
        .iter()
        .map(|(schema, name, rows)| TableRowCount {
            table: TableRef::new(schema, name),
            rows: *rows,
        })
        .collect();
    info.size_bytes = m.size_bytes;
    info.stored_bytes = m.stored_bytes;
    info.metadata = m.metadata.clone();
    info.repository = m
        .repository
        .map(|r| RepositoryId::from_uuid(uuid::Uuid::from_bytes(r)));
    info
}

impl Snapshots {
    /// Refuses work that needs the catalog in a service without one.
    pub(super) fn require_catalog(&self, what: &str) -> Result<()> {
        if self.inner.catalog {
            Ok(())
        } else {
            Err(Error::unavailable(format!(
                "{what} needs the database; this snapshot service reads the store alone"
            )))
        }
    }

    /// The repository this service's store holds, opened once: its identity read
    /// (a store written before repositories had ids is given one), recorded in the
    /// catalog, the catalog's snapshots taken before ids whose manifests this
    /// store holds adopted, and this database's snapshots in the store that the
    /// catalog lacks imported. `None` when the store holds no repository.
    pub(super) async fn repository(&self) -> Result<Option<Opened>> {
        let mut slot = self.inner.repo.lock().await;
        if let Some(opened) = &*slot {
            return Ok(Some(opened.clone()));
        }
        let store = &*self.inner.store;
        let config = match crate::repo::read_config(store).await? {
            Some(config) => config,
            None if self.store_holds_snapshots().await? => {
                crate::repo::create_config(store).await?
            }
            None => return Ok(None),
        };
        let opened = self.open(config).await?;
        *slot = Some(opened.clone());
        Ok(Some(opened))
    }

    /// The repository for a capture: created when the store holds none, unless
    /// the catalog's snapshots live in another repository (then refused, naming
    /// it, without [`SnapshotsBuilder::new_repository`]).
    pub(super) async fn repository_for_capture(&self) -> Result<Opened> {
        if let Some(opened) = self.repository().await? {
            return Ok(opened);
        }
        if !self.inner.new_repository
            && let Some(expected) = self.expected_repository().await?
        {
            let names = match (&expected.repository, &expected.location) {
                (Some(id), Some(location)) => format!("repository {id} at {location}"),
                (Some(id), None) => format!("repository {id}"),
                (None, _) => "a repository taken before repositories had ids".to_owned(),
            };
            return Err(Error::conflict(format!(
                "refusing to create a new snapshot repository in {}: this database's catalog expects {names}, which holds {} of its snapshots. Point sanare at that store (--data-dir or snapshots.storage), or start a new repository here on purpose (--new-repository; snapshots.new_repository = true)",
                self.inner.store.location(),
                expected.snapshots
            )));
        }
        let mut slot = self.inner.repo.lock().await;
        let config = crate::repo::create_config(&*self.inner.store).await?;
        let opened = self.open(config).await?;
        *slot = Some(opened.clone());
        Ok(opened)
    }

    /// The repository this service opens, described (`None`: its store holds none).
    pub async fn repository_config(&self) -> Result<Option<RepositoryConfig>> {
        Ok(self.repository().await?.map(|o| o.config))
    }

    /// Whether the store holds snapshot objects (a store written before
    /// repositories had ids, if it has no `config`).
    async fn store_holds_snapshots(&self) -> Result<bool> {
        for prefix in ["manifests/", "indexes/", "packs/", "blocks/"] {
            if !self.inner.store.list(prefix).await?.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn open(&self, config: RepositoryConfig) -> Result<Opened> {
        if !self.inner.catalog {
            return Ok(Opened {
                config,
                database: None,
            });
        }
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let database: uuid::Uuid = conn
            .query_one(&format!("SELECT id FROM {}", self.table("snapshot_database")), &[])
            .await
            .context("reading this database's snapshot catalog id (are the snapshot migrations applied?)")?
            .get(0);
        conn.execute(
            &format!(
                "INSERT INTO {} (id, location) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET location = EXCLUDED.location, last_seen = now()",
                self.table("snapshot_repositories")
            ),
            &[&config.id.as_uuid(), &self.inner.store.location()],
        )
        .await
        .context("recording the snapshot repository in the catalog")?;
        drop(conn);
        let opened = Opened {
            config,
            database: Some(database),
        };
        self.adopt_legacy(&opened).await?;
        self.import_from_store(&opened).await?;
        Ok(opened)
    }

    /// Which repository the catalog's snapshots live in (the one with the newest).
    async fn expected_repository(&self) -> Result<Option<Expected>> {
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT s.repository, r.location, count(*)
                       FROM {} s LEFT JOIN {} r ON r.id = s.repository
                      WHERE s.status NOT IN ('deleted', 'creating')
                      GROUP BY 1, 2 ORDER BY max(s.created_at) DESC LIMIT 1",
                    self.table("snapshots"),
                    self.table("snapshot_repositories")
                ),
                &[],
            )
            .await
            .context("reading which repository the catalog expects")?;
        Ok(row.map(|r| Expected {
            repository: r
                .get::<_, Option<uuid::Uuid>>(0)
                .map(RepositoryId::from_uuid),
            location: r.get(1),
            snapshots: r.get(2),
        }))
    }

    /// Gives the catalog's snapshots taken before repositories had ids to this
    /// repository when its store holds their manifest, byte for byte.
    async fn adopt_legacy(&self, repo: &Opened) -> Result<()> {
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT id, manifest_hash FROM {} WHERE repository IS NULL AND manifest_hash IS NOT NULL",
                    self.table("snapshots")
                ),
                &[],
            )
            .await
            .context("looking for snapshots taken before repositories had ids")?;
        for r in rows {
            let id = SnapshotId::from_uuid(r.get(0));
            let hash: Vec<u8> = r.get(1);
            let Some(bytes) = self.inner.store.get(&manifest_key(id)).await? else {
                continue;
            };
            if blake3::hash(&bytes).as_bytes()[..] != hash[..] {
                continue;
            }
            conn.execute(
                &format!(
                    "UPDATE {} SET repository = $2, database_id = $3 WHERE id = $1 AND repository IS NULL",
                    self.table("snapshots")
                ),
                &[&id.as_uuid(), &repo.config.id.as_uuid(), &repo.database],
            )
            .await
            .with_context(|| format!("recording the repository of snapshot {id}"))?;
            tracing::info!(%id, repository = %repo.config.id, "snapshot taken before repository ids adopted");
        }
        Ok(())
    }

    /// Imports into the catalog the snapshots of this database whose manifests
    /// are in the store, signed with this service's key, but not in the catalog.
    async fn import_from_store(&self, repo: &Opened) -> Result<()> {
        if self.inner.key.is_none() {
            return Ok(());
        }
        let ids = self.manifest_ids().await?;
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let uuids: Vec<uuid::Uuid> = ids.iter().map(SnapshotId::as_uuid).collect();
        let known: BTreeSet<uuid::Uuid> = conn
            .query(
                &format!(
                    "SELECT id FROM {} WHERE id = ANY($1)",
                    self.table("snapshots")
                ),
                &[&uuids],
            )
            .await
            .context("comparing the store's snapshots with the catalog")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        drop(conn);
        for id in ids.into_iter().filter(|id| !known.contains(&id.as_uuid())) {
            let Some((m, bytes)) = self.stored_manifest(id).await? else {
                continue;
            };
            if !self.signed(&bytes) || m.database.map(uuid::Uuid::from_bytes) != repo.database {
                continue;
            }
            self.insert_imported(repo, &m, &bytes).await?;
            tracing::info!(%id, "snapshot found in the store imported into the catalog");
        }
        Ok(())
    }

    /// The manifest of `id` in the store with its bytes, if it is there and intact
    /// (authentic or not).
    async fn stored_manifest(&self, id: SnapshotId) -> Result<Option<(Manifest, Bytes)>> {
        let Some(bytes) = self.inner.store.get(&manifest_key(id)).await? else {
            return Ok(None);
        };
        Ok(Manifest::decode(&bytes).ok().map(|m| (m, bytes)))
    }

    /// Whether the manifest `bytes` is signed with this service's key.
    fn signed(&self, bytes: &[u8]) -> bool {
        self.inner.key.as_ref().is_some_and(|k| {
            crate::format::Manifest::authenticate(bytes, k) == crate::format::ManifestAuth::Valid
        })
    }

    /// The ids of every manifest in the store.
    pub(super) async fn manifest_ids(&self) -> Result<Vec<SnapshotId>> {
        Ok(self
            .inner
            .store
            .list("manifests/")
            .await?
            .iter()
            .filter_map(|o| o.key.strip_prefix("manifests/")?.parse().ok())
            .collect())
    }

    /// A catalog row for the authenticated manifest `m` (status ready).
    async fn insert_imported(&self, repo: &Opened, m: &Manifest, bytes: &[u8]) -> Result<()> {
        let mut info = info_from_manifest(m, SnapshotStatus::Ready);
        info.repository = Some(repo.config.id);
        let json =
            serde_json::to_value(&info).map_err(|e| Error::other("encoding snapshot info", e))?;
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        conn.execute(
            &format!(
                "INSERT INTO {} (id, status, created_at, finished_at, label, base_id, journal_position,
                                 size_bytes, stored_bytes, manifest_hash, info, repository, database_id,
                                 status_at, status_by)
                 VALUES ($1, 'ready', $2, now(), $3, $4, $5, $6, $7, $8, $9, $10, $11, now(), $12)
                 ON CONFLICT (id) DO NOTHING",
                self.table("snapshots")
            ),
            &[
                &info.id.as_uuid(),
                &info.created_at,
                &info.label,
                &info.base.map(|b| b.as_uuid()),
                &info.journal_cut.as_ref().map(|c| i64::try_from(c.position.0).unwrap_or(i64::MAX)),
                &i64::try_from(info.size_bytes).unwrap_or(i64::MAX),
                &i64::try_from(info.stored_bytes).unwrap_or(i64::MAX),
                &blake3::hash(bytes).as_bytes().to_vec(),
                &json,
                &repo.config.id.as_uuid(),
                &m.database.map(uuid::Uuid::from_bytes),
                &format!("import from the store by {}", crate::repo::holder()),
            ],
        )
        .await
        .with_context(|| format!("importing snapshot {} into the catalog", info.id))?;
        Ok(())
    }

    /// The row of a capture just begun (`creating`), in the opened repository.
    pub(super) async fn insert_creating(
        &self,
        id: SnapshotId,
        label: &Option<String>,
    ) -> Result<()> {
        let repo = self.repository_for_capture().await?;
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        conn.execute(
            &format!(
                "INSERT INTO {} (id, status, created_at, label, repository, database_id, status_at, status_by)
                 VALUES ($1, 'creating', now(), $2, $3, $4, now(), $5)",
                self.table("snapshots")
            ),
            &[
                &id.as_uuid(),
                label,
                &repo.config.id.as_uuid(),
                &repo.database,
                &crate::repo::holder(),
            ],
        )
        .await
        .context("recording a new snapshot")?;
        Ok(())
    }

    /// The repository and database a new manifest records.
    pub(super) async fn manifest_origin(&self) -> Result<(Option<[u8; 16]>, Option<[u8; 16]>)> {
        let repo = self.repository_for_capture().await?;
        Ok((
            Some(*repo.config.id.as_uuid().as_bytes()),
            repo.database.map(|d| *d.as_bytes()),
        ))
    }

    /// Changes the status of `id`, recording who did it and why (and, for a
    /// snapshot marked corrupted, the evidence) in the row and in the status log.
    pub(super) async fn change_status(
        &self,
        id: SnapshotId,
        status: SnapshotStatus,
        error: Option<&str>,
        evidence: Option<&serde_json::Value>,
    ) -> Result<()> {
        if !self.inner.catalog {
            return Ok(());
        }
        let by = crate::repo::holder();
        let repo = self
            .inner
            .repo
            .lock()
            .await
            .as_ref()
            .map(|o| o.config.id.as_uuid());
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let tx = conn
            .transaction()
            .await
            .context("changing a snapshot's status")?;
        let before = tx
            .query_opt(
                &format!(
                    "SELECT status FROM {} WHERE id = $1 FOR UPDATE",
                    self.table("snapshots")
                ),
                &[&id.as_uuid()],
            )
            .await
            .with_context(|| format!("reading the status of snapshot {id}"))?
            .map(|r| r.get::<_, String>(0));
        tx.execute(
            &format!(
                "UPDATE {} SET status = $2, error = coalesce($3, error), status_at = now(),
                               status_by = $4, status_evidence = $5
                  WHERE id = $1",
                self.table("snapshots")
            ),
            &[&id.as_uuid(), &status_str(status), &error, &by, &evidence],
        )
        .await
        .with_context(|| format!("marking snapshot {id} {}", status_str(status)))?;
        tx.execute(
            &format!(
                "INSERT INTO {} (snapshot_id, from_status, to_status, by, repository, reason, evidence)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                self.table("snapshot_status_log")
            ),
            &[&id.as_uuid(), &before, &status_str(status), &by, &repo, &error, &evidence],
        )
        .await
        .with_context(|| format!("logging the status of snapshot {id}"))?;
        tx.commit()
            .await
            .with_context(|| format!("marking snapshot {id} {}", status_str(status)))?;
        Ok(())
    }

    /// Checks the manifest `bytes` of snapshot `id` (decoded as `m`) before
    /// anything is built from it: signed with this service's key, or what the
    /// catalog recorded; of this snapshot; of the repository opened.
    pub(super) async fn authenticate_manifest(
        &self,
        id: SnapshotId,
        m: &Manifest,
        bytes: &[u8],
    ) -> Result<()> {
        let bad = |why: String| Error::corrupt(format!("snapshot {id}"), why);
        if m.id != *id.as_uuid().as_bytes() {
            return Err(bad("its manifest is another snapshot's".into()));
        }
        if let (Some(of), Some(repo)) = (m.repository, self.repository().await?)
            && of != *repo.config.id.as_uuid().as_bytes()
        {
            return Err(bad(format!(
                "its manifest belongs to repository {}, not {}",
                uuid::Uuid::from_bytes(of),
                repo.config.id
            )));
        }
        let signed = match &self.inner.key {
            Some(key) => crate::format::Manifest::authenticate(bytes, key),
            None => crate::format::ManifestAuth::Unsigned,
        };
        match signed {
            crate::format::ManifestAuth::Valid => return Ok(()),
            crate::format::ManifestAuth::Invalid => {
                return Err(bad(
                    "its manifest claims this service's key but its keyed hash does not match (forged or damaged)"
                        .into(),
                ));
            }
            _ if !self.inner.catalog => return Ok(()),
            _ => {}
        }
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let recorded: Option<Vec<u8>> = conn
            .query_opt(
                &format!(
                    "SELECT manifest_hash FROM {} WHERE id = $1",
                    self.table("snapshots")
                ),
                &[&id.as_uuid()],
            )
            .await
            .with_context(|| format!("reading the manifest hash of snapshot {id}"))?
            .and_then(|r| r.get(0));
        match recorded {
            Some(h) if h[..] == blake3::hash(bytes).as_bytes()[..] => Ok(()),
            Some(_) => Err(bad(
                "its manifest is not the one the catalog recorded, and it is not signed with this service's key".into(),
            )),
            None => Err(bad(format!(
                "its manifest cannot be authenticated: {}, and the catalog holds no hash of it",
                match (&self.inner.key, signed) {
                    (None, _) => "this service has no repository key".to_owned(),
                    (Some(_), crate::format::ManifestAuth::OtherKey(k)) => format!(
                        "it is signed with another key ({})",
                        k.iter().map(|b| format!("{b:02x}")).collect::<String>()
                    ),
                    _ => "it is not signed".to_owned(),
                }
            ))),
        }
    }

    /// The catalog entry of `id` if it is in the repository opened here; else an
    /// error saying where it is (it is never touched from here).
    pub(super) async fn here(&self, id: SnapshotId) -> Result<(SnapshotInfo, Opened)> {
        let info = self.get(id).await?;
        let repo = self.repository().await?;
        match (&repo, info.repository) {
            (Some(repo), Some(of)) if repo.config.id == of => return Ok((info, repo.clone())),
            (Some(repo), None) if !self.inner.catalog => return Ok((info, repo.clone())),
            _ => {}
        }
        let opened = match &repo {
            Some(r) => format!(
                "repository {} at {}",
                r.config.id,
                self.inner.store.location()
            ),
            None => format!("{}, which holds no repository", self.inner.store.location()),
        };
        let theirs = match info.repository {
            Some(of) => {
                let location = self.repository_location(of).await?;
                format!(
                    "repository {of}{}",
                    location.map(|l| format!(" at {l}")).unwrap_or_default()
                )
            }
            None => "a store not opened since repositories had ids".to_owned(),
        };
        Err(Error::conflict(format!(
            "snapshot {id} is in {theirs} (not opened here); this process opens {opened}. Use that store to verify or restore it"
        )))
    }

    /// Where the catalog last saw repository `id`.
    async fn repository_location(&self, id: RepositoryId) -> Result<Option<String>> {
        if !self.inner.catalog {
            return Ok(None);
        }
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        Ok(conn
            .query_opt(
                &format!(
                    "SELECT location FROM {} WHERE id = $1",
                    self.table("snapshot_repositories")
                ),
                &[&id.as_uuid()],
            )
            .await
            .context("reading where a repository is")?
            .map(|r| r.get(0)))
    }

    /// [`Snapshots::here`] for a restore: a snapshot the catalog lacks but the
    /// store holds, with a manifest signed by this service's key, is imported
    /// first. If the catalog holds no snapshot at all (a database restored from
    /// the store alone), this database takes on the identity of the one the
    /// snapshot was captured from, and that database's other snapshots in the
    /// store are imported too.
    pub(super) async fn restorable_here(&self, id: SnapshotId) -> Result<()> {
        match self.get(id).await {
            Err(Error::NotFound { .. }) => {}
            Ok(_) => return self.here(id).await.map(drop),
            Err(e) => return Err(e),
        }
        let Some(repo) = self.repository().await? else {
            return Err(Error::not_found(format!(
                "snapshot {id} (the catalog does not know it and {} holds no repository)",
                self.inner.store.location()
            )));
        };
        let bytes = self
            .inner
            .store
            .get(&manifest_key(id))
            .await?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "snapshot {id} in the catalog or in {}",
                    self.inner.store.location()
                ))
            })?;
        let m = Manifest::decode(&bytes)
            .map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))?;
        self.authenticate_manifest(id, &m, &bytes).await?;
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let empty: bool = conn
            .query_one(
                &format!(
                    "SELECT NOT EXISTS (SELECT 1 FROM {})",
                    self.table("snapshots")
                ),
                &[],
            )
            .await
            .context("reading whether the catalog is empty")?
            .get(0);
        let mut repo = repo;
        if empty && let Some(origin) = m.database.map(uuid::Uuid::from_bytes) {
            conn.execute(
                &format!(
                    "UPDATE {} SET id = $1, adopted_at = now(), adopted_from = $2",
                    self.table("snapshot_database")
                ),
                &[&origin, &self.inner.store.location()],
            )
            .await
            .context("taking on the identity of the database the snapshot was captured from")?;
            tracing::info!(database = %origin, "an empty catalog takes on the identity of the database its first restore comes from");
            repo.database = Some(origin);
            *self.inner.repo.lock().await = Some(repo.clone());
        }
        drop(conn);
        self.insert_imported(&repo, &m, &bytes).await?;
        self.import_from_store(&repo).await
    }

    /// What the manifest of `id` in the store says (for a service without a
    /// catalog).
    pub(super) async fn store_info(&self, id: SnapshotId) -> Result<SnapshotInfo> {
        let bytes = self
            .inner
            .store
            .get(&manifest_key(id))
            .await?
            .ok_or_else(|| {
                Error::not_found(format!("snapshot {id} in {}", self.inner.store.location()))
            })?;
        let m = Manifest::decode(&bytes)
            .map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))?;
        let mut info = info_from_manifest(&m, SnapshotStatus::Ready);
        if info.repository.is_none() {
            info.repository = self.repository().await?.map(|r| r.config.id);
        }
        Ok(info)
    }

    /// The newest snapshot in the store taken at or before `before` whose manifest
    /// is intact (for a disaster restore into an empty catalog, or a service
    /// without one). Refused when the store holds snapshots of several databases
    /// and none of them is this one: then name the snapshot.
    pub async fn latest_in_store(
        &self,
        before: Option<OffsetDateTime>,
    ) -> Result<Option<SnapshotInfo>> {
        let mut found: Vec<(SnapshotInfo, Option<[u8; 16]>, bool)> = Vec::new();
        for id in self.manifest_ids().await? {
            let Some((m, bytes)) = self.stored_manifest(id).await? else {
                continue;
            };
            let signed = self.signed(&bytes);
            let info = info_from_manifest(&m, SnapshotStatus::Ready);
            if before.is_none_or(|b| info.created_at <= b) {
                found.push((info, m.database, signed));
            }
        }
        // With a catalog, only what can be authenticated can be restored.
        if self.inner.catalog {
            found.retain(|f| f.2);
        }
        let databases: BTreeSet<Option<[u8; 16]>> = found.iter().map(|f| f.1).collect();
        if databases.len() > 1 {
            return Err(Error::conflict(format!(
                "{} holds snapshots of {} databases; name the snapshot to use (`sanare snapshot list` shows them)",
                self.inner.store.location(),
                databases.len()
            )));
        }
        Ok(found
            .into_iter()
            .map(|f| f.0)
            .max_by_key(|i| (i.created_at, i.id)))
    }

    /// Every snapshot the catalog or the store knows, newest first, with where
    /// each is: in the repository opened here, in another one (not opened here),
    /// or in the store only.
    pub async fn list_all(&self) -> Result<RepositoryListing> {
        let repo = self.repository().await?;
        let mut snapshots: Vec<ListedSnapshot> = Vec::new();
        let mut known: BTreeSet<SnapshotId> = BTreeSet::new();
        if self.inner.catalog {
            let conn = sanare_pg::get_conn(&self.inner.pool).await?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT s.id, s.status, s.created_at, s.info, s.repository, r.location
                           FROM {} s LEFT JOIN {} r ON r.id = s.repository
                          ORDER BY s.created_at DESC, s.id DESC",
                        self.table("snapshots"),
                        self.table("snapshot_repositories")
                    ),
                    &[],
                )
                .await
                .context("listing snapshots")?;
            for r in &rows {
                let info = row_info(r)?;
                known.insert(info.id);
                let availability = match (&repo, info.repository) {
                    (Some(repo), Some(of)) if repo.config.id == of => Availability::Here,
                    (_, of) => Availability::OtherRepository {
                        repository: of,
                        location: r.get(5),
                    },
                };
                snapshots.push(ListedSnapshot { info, availability });
            }
        }
        if repo.is_some() {
            for id in self.manifest_ids().await? {
                if known.contains(&id) {
                    continue;
                }
                let Some((m, bytes)) = self.stored_manifest(id).await? else {
                    continue;
                };
                let authenticated = self.signed(&bytes);
                let mut info = info_from_manifest(&m, SnapshotStatus::Ready);
                info.repository = info.repository.or(repo.as_ref().map(|r| r.config.id));
                let availability = if self.inner.catalog {
                    Availability::StoreOnly {
                        authenticated,
                        database: m.database.map(uuid::Uuid::from_bytes),
                    }
                } else {
                    Availability::Here
                };
                snapshots.push(ListedSnapshot { info, availability });
            }
        }
        snapshots.sort_by_key(|s| std::cmp::Reverse((s.info.created_at, s.info.id)));
        Ok(RepositoryListing {
            repository: repo.map(|r| r.config),
            location: self.inner.store.location(),
            inside_protected_database: self.inner.store.inside_protected_database(),
            catalog: self.inner.catalog,
            snapshots,
        })
    }
}
