//! Where a work unit's suspects wait between the scan and their re-read: in memory
//! up to one batch, then in an anonymous temporary file (removed by the system when
//! closed, also when the process dies). Memory stays bounded by the batch size
//! whatever a chunk finds.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use sanare_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// A row that looks wrong in one snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Suspect {
    /// Which rule of the probe it breaks (the index of a fused probe's rule; 0 for
    /// the other probes).
    pub(crate) rule: u32,
    /// The row key (text forms), in key column order.
    pub(crate) key: Vec<String>,
    /// What the probe read besides the key; its probe turns them into the
    /// violation's details.
    pub(crate) facts: Facts,
}

/// The values a probe read of a suspect row, in the probe's own order (kept
/// compact: a unit may hold many suspects).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) enum Facts {
    /// Nothing besides the key.
    #[default]
    None,
    /// The referencing columns (orphans) or the unique key (duplicates).
    Values(Vec<Option<String>>),
    /// A checksum mismatch: the stored and the computed checksum, in hex.
    Checksum {
        stored: Option<String>,
        computed: String,
    },
}

impl Suspect {
    /// What must match between the first read and the re-read.
    pub(crate) fn identity(&self) -> (Vec<String>, u32) {
        (self.key.clone(), self.rule)
    }
}

/// A suspect and the probe (its index in the unit) that found it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Spilled {
    pub(crate) probe: u32,
    pub(crate) suspect: Suspect,
}

/// Where a probe puts what it finds.
#[derive(Debug)]
pub(crate) enum Collect {
    /// A scan: every suspect, spilled, tagged with the running probe.
    Spill { spill: Spill, probe: u32 },
    /// A re-read: the identities of the suspects found (one batch's worth).
    Identities(BTreeSet<(Vec<String>, u32)>),
}

impl Default for Collect {
    fn default() -> Self {
        Collect::Identities(BTreeSet::new())
    }
}

impl Collect {
    pub(crate) fn push(&mut self, suspect: Suspect) -> Result<()> {
        match self {
            Collect::Spill { spill, probe } => spill.push(Spilled {
                probe: *probe,
                suspect,
            }),
            Collect::Identities(set) => {
                set.insert(suspect.identity());
                Ok(())
            }
        }
    }
}

/// The suspects of one work unit, in the order found.
#[derive(Debug)]
pub(crate) struct Spill {
    batch: usize,
    dir: PathBuf,
    memory: Vec<Spilled>,
    file: Option<BufWriter<File>>,
    count: u64,
}

impl Spill {
    /// An empty spill keeping up to `batch` suspects in memory, then writing to a
    /// temporary file in `dir`.
    pub(crate) fn new(batch: usize, dir: &Path) -> Self {
        Self {
            batch: batch.max(1),
            dir: dir.to_owned(),
            memory: Vec::new(),
            file: None,
            count: 0,
        }
    }

    /// Suspects held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.count
    }

    fn push(&mut self, s: Spilled) -> Result<()> {
        self.count += 1;
        if self.file.is_none() && self.memory.len() < self.batch {
            self.memory.push(s);
            return Ok(());
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let f = tempfile::tempfile_in(&self.dir).map_err(|e| {
                    Error::io(
                        format!("creating a suspects file in {}", self.dir.display()),
                        e,
                    )
                })?;
                let mut w = BufWriter::new(f);
                for m in self.memory.drain(..) {
                    write_line(&mut w, &m)?;
                }
                self.file.insert(w)
            }
        };
        write_line(file, &s)
    }

    /// The suspects in batches of at most the batch size, each from one probe.
    pub(crate) fn batches(self) -> Result<Batches> {
        let source = match self.file {
            None => Source::Memory(self.memory.into_iter()),
            Some(w) => {
                let mut f = w
                    .into_inner()
                    .map_err(|e| Error::io("writing the suspects file", e.into_error()))?;
                f.rewind()
                    .map_err(|e| Error::io("reading the suspects file", e))?;
                Source::File(BufReader::new(f))
            }
        };
        Ok(Batches {
            batch: self.batch,
            source,
            next: None,
        })
    }
}

fn write_line(w: &mut BufWriter<File>, s: &Spilled) -> Result<()> {
    serde_json::to_writer(&mut *w, s).map_err(|e| Error::other("spilling a suspect", e))?;
    w.write_all(b"\n")
        .map_err(|e| Error::io("writing the suspects file", e))
}

#[derive(Debug)]
enum Source {
    Memory(std::vec::IntoIter<Spilled>),
    File(BufReader<File>),
}

/// Batches of spilled suspects.
#[derive(Debug)]
pub(crate) struct Batches {
    batch: usize,
    source: Source,
    next: Option<Spilled>,
}

impl Batches {
    fn read(&mut self) -> Result<Option<Spilled>> {
        if let Some(s) = self.next.take() {
            return Ok(Some(s));
        }
        match &mut self.source {
            Source::Memory(it) => Ok(it.next()),
            Source::File(r) => {
                let mut line = String::new();
                let n = r
                    .read_line(&mut line)
                    .map_err(|e| Error::io("reading the suspects file", e))?;
                if n == 0 {
                    return Ok(None);
                }
                serde_json::from_str(&line)
                    .map(Some)
                    .map_err(|e| Error::corrupt("suspects file", e.to_string()))
            }
        }
    }

    /// The next batch: the probe index and up to `batch` of its suspects.
    pub(crate) fn next_batch(&mut self) -> Result<Option<(u32, Vec<Suspect>)>> {
        let Some(first) = self.read()? else {
            return Ok(None);
        };
        let probe = first.probe;
        let mut out = vec![first.suspect];
        while out.len() < self.batch {
            match self.read()? {
                Some(s) if s.probe == probe => out.push(s.suspect),
                Some(s) => {
                    self.next = Some(s);
                    break;
                }
                None => break,
            }
        }
        Ok(Some((probe, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(rule: u32, key: &str) -> Suspect {
        Suspect {
            rule,
            key: vec![key.into()],
            facts: Facts::Values(vec![Some(key.to_owned()), None]),
        }
    }

    #[test]
    fn suspects_come_back_in_order_in_batches_of_one_probe() {
        let dir = tempfile::tempdir().unwrap();
        for batch in [2, 3, 100] {
            let mut c = Collect::Spill {
                spill: Spill::new(batch, dir.path()),
                probe: 0,
            };
            for i in 0..5 {
                c.push(s(i, &i.to_string())).unwrap();
            }
            let Collect::Spill { spill, .. } = &mut c else {
                unreachable!()
            };
            let mut spill = std::mem::replace(spill, Spill::new(1, dir.path()));
            spill
                .push(Spilled {
                    probe: 1,
                    suspect: s(0, "x"),
                })
                .unwrap();
            assert_eq!(spill.len(), 6);
            let mut b = spill.batches().unwrap();
            let mut seen = Vec::new();
            while let Some((probe, batch_of)) = b.next_batch().unwrap() {
                assert!(batch_of.len() <= batch);
                for x in batch_of {
                    seen.push((probe, x.key[0].clone()));
                }
            }
            let want: Vec<(u32, String)> = (0..5)
                .map(|i| (0, i.to_string()))
                .chain([(1, "x".to_owned())])
                .collect();
            assert_eq!(seen, want, "batch {batch}");
        }
        // Nothing is left behind in the folder: the file is anonymous.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
