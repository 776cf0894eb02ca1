//! Sorted fixed-size records on local disk, so that sets as large as a repository's
//! blocks never have to fit in memory: [`Spill`] sorts records in memory up to a
//! bound and spills them to sorted run files, then merges the runs; a [`RunFile`] is
//! one sorted file searched by binary search over an in-memory fence of every
//! [`PAGE`]-th record and one read of a page.
//!
//! The files live in a temporary directory (`tempfile`, under `TMPDIR`) removed when
//! the value owning it is dropped; they are a process's working copy, never shared
//! and never read by another version. So they use `std::fs` directly, not the
//! crash-safe [`crate::FsStore`] path, and are never fsynced: everything in them is
//! derived (from the packs' tables of contents, or a capture's own blocks), and a
//! process that loses them to a crash or a power cut rebuilds them from the store.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use sanare_core::{Error, Result};

/// Records per page of a [`RunFile`]: one read finds a record once the fence has
/// narrowed the search to a page.
pub(crate) const PAGE: usize = 64;

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| {
        Error::io(
            format!(
                "{what} (a temporary file of the snapshot service; set TMPDIR to a disk with room)"
            ),
            e,
        )
    }
}

/// A temporary directory, created on first use and shared by the files in it.
#[derive(Debug, Default, Clone)]
pub(crate) struct TempDir {
    dir: Arc<std::sync::OnceLock<tempfile::TempDir>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl TempDir {
    /// A new file's path in the directory (created now if need be).
    fn new_path(&self, stem: &str) -> Result<PathBuf> {
        let dir = match self.dir.get() {
            Some(d) => d,
            None => {
                let d = tempfile::Builder::new()
                    .prefix("sanare-snapshot-")
                    .tempdir()
                    .map_err(io("creating a temporary directory"))?;
                // Another thread may have set it meanwhile: use whichever won.
                let _ = self.dir.set(d);
                self.dir.get().ok_or_else(|| {
                    Error::other(
                        "creating a temporary directory",
                        std::io::Error::other("lost"),
                    )
                })?
            }
        };
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(dir.path().join(format!("{stem}-{n}")))
    }
}

/// One sorted file of `N`-byte records, searchable with little memory.
#[derive(Debug)]
pub(crate) struct RunFile<const N: usize> {
    file: File,
    path: PathBuf,
    len: u64,
    /// The first `K` bytes (the key) of every `PAGE`-th record.
    fences: Vec<Vec<u8>>,
}

impl<const N: usize> Drop for RunFile<N> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes a [`RunFile`] record by record (records must come in order).
pub(crate) struct RunWriter<const N: usize> {
    out: BufWriter<File>,
    path: PathBuf,
    key: usize,
    len: u64,
    fences: Vec<Vec<u8>>,
}

impl<const N: usize> RunWriter<N> {
    /// A new file in `dir`; `key` is how many leading bytes of a record are its key
    /// (what [`RunFile::find`] looks up).
    pub(crate) fn new(dir: &TempDir, key: usize) -> Result<Self> {
        let path = dir.new_path("run")?;
        let file = File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("creating a sorted run file"))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 16, file),
            path,
            key: key.min(N),
            len: 0,
            fences: Vec::new(),
        })
    }

    /// Appends a record.
    pub(crate) fn push(&mut self, r: &[u8; N]) -> Result<()> {
        if self.len.is_multiple_of(PAGE as u64) {
            self.fences.push(r[..self.key].to_vec());
        }
        self.out
            .write_all(r)
            .map_err(io("writing a sorted run file"))?;
        self.len += 1;
        Ok(())
    }

    /// The finished file.
    pub(crate) fn finish(self) -> Result<RunFile<N>> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io("writing a sorted run file", e.into_error()))?;
        Ok(RunFile {
            file,
            path: self.path,
            len: self.len,
            fences: self.fences,
        })
    }
}

impl<const N: usize> RunFile<N> {
    /// Writes `records` (sorted) to a new file in `dir` (see [`RunWriter::new`]).
    pub(crate) fn write(
        dir: &TempDir,
        key: usize,
        records: impl IntoIterator<Item = [u8; N]>,
    ) -> Result<Self> {
        let mut w = RunWriter::new(dir, key)?;
        for r in records {
            w.push(&r)?;
        }
        w.finish()
    }

    /// Records in the file.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The first record whose leading bytes are `key`.
    pub(crate) fn find(&self, key: &[u8]) -> Result<Option<[u8; N]>> {
        // The last page whose first key is <= key holds it, if any does.
        let page = self.fences.partition_point(|f| f.as_slice() <= key);
        if page == 0 {
            return Ok(None);
        }
        let first = (page - 1) as u64 * PAGE as u64;
        let count = (self.len - first).min(PAGE as u64) as usize;
        let mut buf = vec![0u8; count * N];
        read_exact_at(&self.file, &mut buf, first * N as u64)
            .map_err(io("reading a sorted run file"))?;
        let recs = buf.chunks_exact(N);
        let at = recs
            .clone()
            .position(|r| &r[..key.len()] >= key)
            .filter(|&i| buf[i * N..i * N + key.len()] == *key);
        Ok(at.map(|i| {
            let mut out = [0u8; N];
            out.copy_from_slice(&buf[i * N..(i + 1) * N]);
            out
        }))
    }

    /// Every record, in order.
    pub(crate) fn iter(&self) -> Result<impl Iterator<Item = Result<[u8; N]>> + '_> {
        // Its own handle: its own position in the file.
        let file = File::open(&self.path).map_err(io("reading a sorted run file"))?;
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let mut left = self.len;
        Ok(std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            let mut r = [0u8; N];
            Some(
                reader
                    .read_exact(&mut r)
                    .map(|()| r)
                    .map_err(io("reading a sorted run file")),
            )
        }))
    }
}

/// Merges sorted `sources` into one order through `f` (duplicates kept, the
/// earlier source's first).
pub(crate) fn merge<'a, const N: usize>(
    mut sources: Vec<Box<dyn Iterator<Item = Result<[u8; N]>> + 'a>>,
    mut f: impl FnMut([u8; N]) -> Result<()>,
) -> Result<()> {
    let mut heads: Vec<Option<[u8; N]>> = Vec::with_capacity(sources.len());
    for s in &mut sources {
        heads.push(s.next().transpose()?);
    }
    // Few sources: a linear scan for the smallest head is as fast as a heap.
    while let Some((i, r)) = heads
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.map(|r| (i, r)))
        .min_by(|a, b| a.1.cmp(&b.1))
    {
        f(r)?;
        heads[i] = sources[i].next().transpose()?;
    }
    Ok(())
}

/// Merges run files into one new run file in `dir` keyed like them.
pub(crate) fn merge_runs<const N: usize>(
    dir: &TempDir,
    key: usize,
    runs: &[RunFile<N>],
) -> Result<RunFile<N>> {
    let mut sources: Vec<Box<dyn Iterator<Item = Result<[u8; N]>> + '_>> = Vec::new();
    for r in runs {
        sources.push(Box::new(r.iter()?));
    }
    let mut w = RunWriter::new(dir, key)?;
    merge(sources, |r| w.push(&r))?;
    w.finish()
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_read(file, buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Records sorted in memory up to `max` at a time, spilled to sorted runs beyond,
/// then read back merged in order.
#[derive(Debug)]
pub(crate) struct Spill<const N: usize> {
    dir: TempDir,
    buf: Vec<[u8; N]>,
    max: usize,
    runs: Vec<RunFile<N>>,
}

impl<const N: usize> Spill<N> {
    /// Keeps at most `max` records in memory; spills to files in `dir`.
    pub(crate) fn new(dir: TempDir, max: usize) -> Self {
        Self {
            dir,
            buf: Vec::new(),
            max: max.max(1),
            runs: Vec::new(),
        }
    }

    /// Adds a record.
    pub(crate) fn push(&mut self, r: [u8; N]) -> Result<()> {
        self.buf.push(r);
        if self.buf.len() >= self.max {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.sort_unstable();
        self.runs.push(RunFile::write(&self.dir, N, buf)?);
        Ok(())
    }

    /// Every record pushed, in order (duplicates kept), through `f`.
    pub(crate) fn merge(mut self, f: impl FnMut([u8; N]) -> Result<()>) -> Result<()> {
        self.buf.sort_unstable();
        let mut sources: Vec<Box<dyn Iterator<Item = Result<[u8; N]>> + '_>> = Vec::new();
        for r in &self.runs {
            sources.push(Box::new(r.iter()?));
        }
        let buf = std::mem::take(&mut self.buf);
        sources.push(Box::new(buf.into_iter().map(Ok)));
        merge(sources, f)
    }

    /// How many distinct records were pushed.
    pub(crate) fn count_distinct(self) -> Result<u64> {
        let mut last: Option<[u8; N]> = None;
        let mut n = 0u64;
        self.merge(|r| {
            if last != Some(r) {
                n += 1;
                last = Some(r);
            }
            Ok(())
        })?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32) -> [u8; 8] {
        let mut r = [0u8; 8];
        r[..4].copy_from_slice(&i.to_be_bytes());
        r[4..].copy_from_slice(&(i * 3).to_le_bytes());
        r
    }

    #[test]
    fn spilled_records_merge_in_order_and_count_distinct() {
        let dir = TempDir::default();
        let mut s = Spill::<8>::new(dir.clone(), 100);
        let order: Vec<u32> = (0..1000u32).map(|i| (i * 7919) % 1000).collect();
        for &i in order.iter().chain(&order[..250]) {
            s.push(rec(i)).unwrap();
        }
        assert!(s.runs.len() >= 10, "{} runs", s.runs.len());
        assert_eq!(s.count_distinct().unwrap(), 1000);
        let mut s = Spill::<8>::new(dir, 64);
        for &i in &order {
            s.push(rec(i)).unwrap();
        }
        let mut got = Vec::new();
        s.merge(|r| {
            got.push(r);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, (0..1000).map(rec).collect::<Vec<_>>());
    }

    #[test]
    fn a_run_file_finds_each_key_with_one_page_read() {
        let dir = TempDir::default();
        let run = RunFile::write(&dir, 4, (0..1000u32).map(|i| rec(i * 2))).unwrap();
        assert_eq!(run.len(), 1000);
        assert_eq!(run.fences.len(), 1000usize.div_ceil(PAGE));
        for i in [0u32, 1, 63, 64, 65, 998, 999, 1000, 1998, 1999, 5000] {
            let found = run.find(&(i).to_be_bytes()).unwrap();
            if i % 2 == 0 && i < 2000 {
                assert_eq!(found, Some(rec(i)), "{i}");
            } else {
                assert_eq!(found, None, "{i}");
            }
        }
        let path = run.path.clone();
        drop(run);
        assert!(!path.exists(), "a run file is removed with it");
    }
}
