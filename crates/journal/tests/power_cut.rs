//! The WAL on a simulated disk whose power is cut while writers are in flight:
//! every write not yet fsynced is kept, dropped or torn (by 512-byte sector), and
//! every directory entry not yet synced is kept or dropped, at random from a seed.
//!
//! A bounded number of seeds run by default; `SANARE_POWER_CUT_SEEDS=n` runs `n`.
//! A failure names its seed: `SANARE_POWER_CUT_FIRST_SEED=s SANARE_POWER_CUT_SEEDS=1`
//! replays it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use sanare_core::{Control, JournalPosition, JournalService};
use sanare_fs::Storage;
use sanare_fs::sim::SimDisk;
use sanare_journal::testing::WalFault;
use sanare_journal::{Journal, NewEntry, Query};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dir() -> &'static Path {
    Path::new("/data/journal")
}

async fn open(disk: &SimDisk) -> Journal {
    Journal::wal(dir())
        .storage(Arc::new(disk.clone()))
        .segment_size(8 * 1024)
        .handler("op", sanare_journal::NoopHandler)
        .build()
        .await
        .unwrap()
}

/// What one run left: the acknowledged entries (position → payload) and the
/// position the writers got before the cut.
struct Run {
    acked: BTreeMap<u64, String>,
    lost_anything: bool,
}

/// Holds every `fdatasync` from the `hold_at`-th on until the power is cut (then
/// fails them, as a dead machine would never answer): several group commits are
/// then written and not durable when the power goes.
#[derive(Clone, Default)]
struct Hold {
    state: Arc<(Mutex<(usize, bool)>, std::sync::Condvar)>,
}

impl Hold {
    /// The fault hook: blocks sync `n >= hold_at` until `release`.
    fn hook(
        &self,
        hold_at: u64,
    ) -> impl Fn(WalFault) -> std::io::Result<()> + Send + Sync + 'static {
        let state = self.state.clone();
        move |at| match at {
            WalFault::Sync { sync } if sync >= hold_at => {
                let (lock, cv) = &*state;
                let mut g = lock.lock().unwrap();
                g.0 += 1;
                cv.notify_all();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while !g.1 && std::time::Instant::now() < deadline {
                    g = cv
                        .wait_timeout(g, std::time::Duration::from_millis(50))
                        .unwrap()
                        .0;
                }
                Err(std::io::Error::other("the power is gone"))
            }
            _ => Ok(()),
        }
    }

    /// Waits until a sync is held, then until `n` are or none more comes for a
    /// moment (every writer may be waiting on a held group). Returns how many.
    fn wait_held(&self, n: usize) -> usize {
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while g.0 == 0 && std::time::Instant::now() < deadline {
            g = cv
                .wait_timeout(g, std::time::Duration::from_millis(50))
                .unwrap()
                .0;
        }
        while g.0 > 0 && g.0 < n {
            let before = g.0;
            g = cv
                .wait_timeout(g, std::time::Duration::from_millis(100))
                .unwrap()
                .0;
            if g.0 == before {
                break;
            }
        }
        g.0
    }

    fn release(&self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().1 = true;
        cv.notify_all();
    }
}

/// Sixteen writers record entries of varied sizes concurrently while a
/// maintenance task rotates and compacts; from the `hold_at`-th group commit on
/// the flushes hang, and once `DEPTH` of them do, the power is cut with `seed`.
async fn record_until_the_power_is_cut(disk: &SimDisk, seed: u64, hold_at: u64) -> Run {
    const DEPTH: usize = 4;
    let hold = Hold::default();
    let journal = Journal::wal(dir())
        .storage(Arc::new(disk.clone()))
        .segment_size(8 * 1024)
        .sync_pipeline_depth(DEPTH)
        .inject_wal_faults(hold.hook(hold_at))
        .build()
        .await
        .unwrap();
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16 {
        let (journal, acked) = (journal.clone(), acked.clone());
        tasks.spawn(async move {
            for i in 0.. {
                let payload = payload(w, i);
                match journal.record(NewEntry::new("op", &payload).unwrap()).await {
                    Ok(r) => {
                        acked.lock().unwrap().insert(r.position.0, payload);
                    }
                    Err(_) => return, // the flushes failed: the power is gone
                }
            }
        });
    }
    let maintenance = {
        let journal = journal.clone();
        tokio::spawn(async move {
            loop {
                if journal.rotate().await.is_err()
                    || journal.compact(&Control::detached()).await.is_err()
                {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
    };
    let held = {
        let hold = hold.clone();
        tokio::task::spawn_blocking(move || hold.wait_held(DEPTH))
            .await
            .unwrap()
    };
    assert!(held > 0, "seed {seed}: no flush was held");
    let report = disk.cut_power(seed);
    hold.release();
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    maintenance.await.unwrap();
    drop(journal);
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    Run {
        acked,
        lost_anything: report.lost_anything(),
    }
}

/// Writer `w`'s `i`-th payload: 40 to 1,000 bytes, so frames straddle sectors.
fn payload(w: u64, i: u64) -> String {
    let mut p = format!("w{w}-{i}-");
    let len = 40 + ((w * 7919 + i * 104_729) % 960) as usize;
    while p.len() < len {
        p.push(char::from(b'a' + (p.len() % 26) as u8));
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_entries_survive_a_power_cut_and_torn_groups_are_only_a_tail() {
    let first = env_u64("SANARE_POWER_CUT_FIRST_SEED", 1);
    let seeds = env_u64("SANARE_POWER_CUT_SEEDS", 12);
    let (mut lossy, mut tails) = (0, 0);
    for seed in first..first + seeds {
        let disk = SimDisk::new();
        let hold_at = 3 + seed * 7 % 40;
        let run = record_until_the_power_is_cut(&disk, seed, hold_at).await;
        lossy += u64::from(run.lost_anything);

        let journal = open(&disk).await;
        let report = journal.open_report().unwrap().clone();
        assert!(
            report.corrupt.is_empty(),
            "seed {seed}: a torn group must be a tail, not damage: {report:?}"
        );
        tails += u64::from(report.truncated_tail.is_some());
        let found: BTreeMap<u64, String> = journal
            .query(&Query::all())
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.position.0, e.payload_as::<String>().unwrap()))
            .collect();
        for (p, payload) in &run.acked {
            assert_eq!(
                found.get(p),
                Some(payload),
                "seed {seed}: acknowledged entry {p} lost"
            );
        }
        let head = journal.head().await.unwrap();
        assert_eq!(
            found.keys().copied().collect::<Vec<_>>(),
            (1..=head.0).collect::<Vec<_>>(),
            "seed {seed}: positions 1..=head, no hole"
        );
        let v = journal.validate(&Control::detached()).await.unwrap();
        assert!(v.is_ok(), "seed {seed}: {v:?}");
        // Recording goes on after the highest position ever acknowledged.
        let next = journal
            .record(NewEntry::new("op", &"after").unwrap())
            .await
            .unwrap();
        let highest = run.acked.keys().max().copied().unwrap_or(0);
        assert!(next.position > JournalPosition(highest.max(head.0)));
    }
    // The cuts did lose unsynced data, and tore groups that recovery cut off.
    assert!(lossy > 0, "no cut lost anything in {seeds} seeds");
    assert!(tails > 0, "no cut left a torn tail in {seeds} seeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_the_journal_creates_or_renames_is_durable_in_its_directory() {
    let disk = SimDisk::new();
    let journal = open(&disk).await;
    let quiet = || {
        let pending = disk.unsynced_entries();
        assert!(pending.is_empty(), "not synced: {pending:?}");
    };
    quiet();
    for i in 0..200 {
        journal
            .record(NewEntry::new("op", &format!("entry {i}")).unwrap())
            .await
            .unwrap();
    }
    journal.rotate().await.unwrap();
    // The index of a sealed segment is written off the writer's thread: reopening
    // waits for nothing, so look after a reopen, which writes any missing one.
    drop(journal);
    let journal = open(&disk).await;
    quiet();
    journal.compact(&Control::detached()).await.unwrap();
    quiet();
    journal
        .replay(
            sanare_core::ReplayRequest::new(sanare_core::ReplayRange::All),
            &Control::detached(),
        )
        .await
        .unwrap();
    quiet();
    journal.purge(JournalPosition(100)).await.unwrap();
    quiet();
    assert!(disk.exists(&dir().join("applied.marks")).unwrap());
}
