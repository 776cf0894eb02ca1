//! The S3-compatible block store (feature `s3`).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sanare_core::{Error, Result};
use time::OffsetDateTime;

use crate::store::{check_key, short_object};
use crate::{BlockStore, ObjectMeta};

/// Objects in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Garage, …) through
/// the `object_store` crate, optionally under a key prefix.
///
/// S3 makes every `PUT` atomic (a reader sees the old object, nothing, or the whole
/// new one) and durable when it is acknowledged, which is what [`BlockStore`] asks.
/// Any other [`ObjectStore`] can be used through [`S3Store::from_object_store`].
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    /// The bucket and endpoint, for [`BlockStore::location`].
    place: String,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("store", &self.inner.to_string())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl S3Store {
    /// A store from a configured builder, e.g.
    /// `AmazonS3Builder::from_env().with_bucket_name("backups")` or, for a
    /// self-hosted server, `.with_endpoint("http://127.0.0.1:9000").with_allow_http(true)`.
    pub fn new(builder: AmazonS3Builder) -> Result<Self> {
        let bucket = builder
            .get_config_value(&AmazonS3ConfigKey::Bucket)
            .unwrap_or_default();
        let place = match builder.get_config_value(&AmazonS3ConfigKey::Endpoint) {
            Some(endpoint) => format!("S3 bucket {bucket} at {endpoint}"),
            None => {
                let region = builder
                    .get_config_value(&AmazonS3ConfigKey::Region)
                    .unwrap_or_default();
                format!("S3 bucket {bucket} (AWS {region})")
            }
        };
        let store = builder.build().map_err(|e| {
            Error::config(
                "snapshot.s3",
                format!("the S3 block store cannot be configured ({e}); check bucket, region, endpoint and credentials"),
            )
        })?;
        let mut out = Self::from_object_store(Arc::new(store));
        out.place = place;
        Ok(out)
    }

    /// A store for `bucket` with credentials from the environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, …), optionally at a non-AWS
    /// `endpoint` (plain `http://` allowed for it) and in `region`, under `prefix`.
    pub fn from_settings(
        bucket: &str,
        prefix: Option<&str>,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> Result<Self> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = region {
            builder = builder.with_region(region);
        }
        let store = Self::new(builder)?;
        match prefix {
            Some(p) => store.with_prefix(p),
            None => Ok(store),
        }
    }

    /// A store over any [`ObjectStore`].
    pub fn from_object_store(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            place: store.to_string(),
            inner: store,
            prefix: String::new(),
        }
    }

    /// Keeps every object under `prefix/` (e.g. one prefix per service in a shared
    /// bucket). The prefix follows the key rules: ASCII letters, digits, `-_./`.
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self> {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            self.prefix.clear();
        } else {
            check_key(prefix)?;
            self.prefix = format!("{prefix}/");
        }
        Ok(self)
    }

    fn object_path(&self, key: &str) -> Result<Path> {
        check_key(key)?;
        Path::parse(format!("{}{key}", self.prefix))
            .map_err(|e| Error::invalid_input(format!("`{key}` is not a valid object path: {e}")))
    }
}

fn s3_error(what: String, e: object_store::Error) -> Error {
    Error::storage(
        format!(
            "{what} in the S3 block store (check that the endpoint is reachable and the credentials may read and write the bucket)"
        ),
        e,
    )
}

#[async_trait]
impl BlockStore for S3Store {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let location = self.object_path(key)?;
        self.inner
            .put(&location, PutPayload::from_bytes(data))
            .await
            .map_err(|e| s3_error(format!("storing {key}"), e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let location = self.object_path(key)?;
        let result = match self.inner.get(&location).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(s3_error(format!("reading {key}"), e)),
        };
        result
            .bytes()
            .await
            .map(Some)
            .map_err(|e| s3_error(format!("reading {key}"), e))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        let location = self.object_path(key)?;
        if range.start > range.end {
            return Err(short_object(key, 0, &range));
        }
        if range.is_empty() {
            // An empty range is not a valid HTTP range; ask whether the object is there.
            return Ok(self.contains(key).await?.then(Bytes::new));
        }
        let bytes = match self.inner.get_range(&location, range.clone()).await {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(s3_error(format!("reading part of {key}"), e)),
        };
        if bytes.len() as u64 != range.end - range.start {
            return Err(short_object(key, range.start + bytes.len() as u64, &range));
        }
        Ok(Some(bytes))
    }

    async fn put_new(&self, key: &str, data: Bytes) -> Result<bool> {
        let location = self.object_path(key)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&location, PutPayload::from_bytes(data.clone()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            // A server without conditional puts: check, then put.
            Err(object_store::Error::NotImplemented { .. }) => {
                if self.contains(key).await? {
                    return Ok(false);
                }
                self.put(key, data).await?;
                Ok(true)
            }
            Err(e) => Err(s3_error(format!("creating {key}"), e)),
        }
    }

    fn location(&self) -> String {
        match self.prefix.trim_end_matches('/') {
            "" => self.place.clone(),
            p => format!("{} under prefix {p}/", self.place),
        }
    }

    async fn contains(&self, key: &str) -> Result<bool> {
        let location = self.object_path(key)?;
        match self.inner.head(&location).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(s3_error(format!("looking up {key}"), e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let location = self.object_path(key)?;
        match self.inner.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error(format!("deleting {key}"), e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        // object_store lists whole path segments; list the directory holding the
        // prefix and filter by the string prefix.
        let full = format!("{}{prefix}", self.prefix);
        let dir = full.rfind('/').map(|i| Path::from(&full[..i]));
        let metas: Vec<object_store::ObjectMeta> = self
            .inner
            .list(dir.as_ref())
            .try_collect()
            .await
            .map_err(|e| s3_error(format!("listing `{prefix}`"), e))?;
        let mut out: Vec<ObjectMeta> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(self.prefix.as_str())?;
                if !key.starts_with(prefix) {
                    return None;
                }
                let modified = OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(m.last_modified.timestamp()) * 1_000_000_000
                        + i128::from(m.last_modified.timestamp_subsec_nanos()),
                )
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                Some(ObjectMeta {
                    key: key.to_owned(),
                    size: m.size,
                    modified,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}
