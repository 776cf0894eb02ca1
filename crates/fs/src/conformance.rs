//! The checks every [`Storage`] implementation passes (feature `testing`).
//!
//! They cover what a running process can observe of the
//! [contract](crate#durability-contract): open modes, positional reads and
//! writes, lengths, listing, renames over an existing file, removal, errors, and
//! exclusive locks. What a power cut keeps is checked on `sim::SimDisk` itself
//! (feature `sim`), where a cut can be simulated.

#![allow(clippy::unwrap_used)]

use std::io::ErrorKind;
use std::path::Path;

use crate::{EntryKind, OpenMode, Storage, create_durable, read_file, write_atomic};

/// Runs every check on `storage` in `dir` (an existing, empty directory).
/// Panics with what failed.
pub fn run(storage: &dyn Storage, dir: &Path) {
    files(storage, dir);
    entries(storage, dir);
    listing_and_links(storage, dir);
    helpers(storage, dir);
    locks(storage, dir);
}

fn files(storage: &dyn Storage, dir: &Path) {
    let path = dir.join("a");
    assert_eq!(
        storage.open(&path, OpenMode::Read).err().map(|e| e.kind()),
        Some(ErrorKind::NotFound),
        "opening a missing file for reading"
    );
    assert_eq!(
        storage
            .open(&path, OpenMode::ReadWrite)
            .err()
            .map(|e| e.kind()),
        Some(ErrorKind::NotFound),
        "opening a missing file for writing"
    );
    let f = storage.open(&path, OpenMode::CreateNew).unwrap();
    assert_eq!(f.len().unwrap(), 0);
    assert!(f.is_empty().unwrap());
    assert_eq!(
        storage
            .open(&path, OpenMode::CreateNew)
            .err()
            .map(|e| e.kind()),
        Some(ErrorKind::AlreadyExists),
        "create-new of an existing name"
    );
    f.write_all_at(b"hello", 0).unwrap();
    f.write_all_at(b"world", 10).unwrap();
    assert_eq!(f.len().unwrap(), 15);
    let mut buf = [9u8; 20];
    let n = f.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"hello\0\0\0\0\0world", "a gap reads as zeros");
    assert_eq!(f.read_at(&mut buf, 15).unwrap(), 0, "reading at the end");
    assert_eq!(f.read_at(&mut buf, 100).unwrap(), 0, "reading past the end");
    // A second handle sees the same file, at once.
    let g = storage.open(&path, OpenMode::Create).unwrap();
    assert_eq!(g.len().unwrap(), 15, "create does not truncate");
    g.write_all_at(b"J", 0).unwrap();
    let mut one = [0u8; 1];
    f.read_at(&mut one, 0).unwrap();
    assert_eq!(
        &one, b"J",
        "a write through one handle is visible through another"
    );
    f.set_len(3).unwrap();
    assert_eq!(g.len().unwrap(), 3);
    f.set_len(6).unwrap();
    let mut six = [9u8; 6];
    g.read_at(&mut six, 0).unwrap();
    assert_eq!(&six, b"Jel\0\0\0", "extending fills with zeros");
    f.sync_data().unwrap();
    g.sync_all().unwrap();
    let r = storage.open(&path, OpenMode::Read).unwrap();
    assert!(
        r.write_all_at(b"x", 0).is_err(),
        "a read-only handle refuses writes"
    );
    assert!(r.set_len(0).is_err(), "a read-only handle refuses set_len");
}

fn entries(storage: &dyn Storage, dir: &Path) {
    let sub = dir.join("sub").join("deeper");
    storage.create_dir_all(&sub).unwrap();
    storage.create_dir_all(&sub).unwrap();
    assert!(storage.list(&sub).unwrap().is_empty());
    assert_eq!(
        storage.list(&dir.join("missing")).err().map(|e| e.kind()),
        Some(ErrorKind::NotFound)
    );
    let (x, y) = (sub.join("x"), sub.join("y"));
    create_durable(storage, &x, b"x-data").unwrap();
    create_durable(storage, &y, b"y-data").unwrap();
    let mut names = storage.list(&sub).unwrap();
    names.sort();
    assert_eq!(names, ["x", "y"], "listing names files only");
    assert!(
        !storage.list(dir).unwrap().contains(&"sub".to_owned()),
        "subdirectories are not listed"
    );
    storage.rename(&x, &y).unwrap();
    storage.sync_dir(&sub).unwrap();
    assert!(!storage.exists(&x).unwrap());
    assert_eq!(
        read_file(storage, &y, 100).unwrap(),
        b"x-data",
        "rename replaces the target"
    );
    assert_eq!(
        storage.rename(&x, &y).err().map(|e| e.kind()),
        Some(ErrorKind::NotFound)
    );
    storage.remove_file(&y).unwrap();
    storage.sync_dir(&sub).unwrap();
    assert!(!storage.exists(&y).unwrap());
    assert_eq!(
        storage.remove_file(&y).err().map(|e| e.kind()),
        Some(ErrorKind::NotFound)
    );
}

fn listing_and_links(storage: &dyn Storage, dir: &Path) {
    let top = dir.join("listed");
    storage.create_dir_all(&top.join("child")).unwrap();
    let file = top.join("f");
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    create_durable(storage, &file, b"four").unwrap();
    let mut got = storage.read_dir(&top).unwrap();
    got.sort_by(|a, b| a.name.cmp(&b.name));
    let seen: Vec<_> = got
        .iter()
        .map(|e| (e.name.as_str(), e.kind, e.len))
        .collect();
    assert_eq!(
        seen,
        [("child", EntryKind::Dir, 0), ("f", EntryKind::File, 4)],
        "read_dir lists files and subdirectories with their lengths"
    );
    assert!(got[1].modified >= before, "a new file's time is recent");
    assert_eq!(
        storage
            .read_dir(&dir.join("missing"))
            .err()
            .map(|e| e.kind()),
        Some(ErrorKind::NotFound)
    );
    let link = top.join("g");
    storage.hard_link(&file, &link).unwrap();
    storage.sync_dir(&top).unwrap();
    assert_eq!(read_file(storage, &link, 100).unwrap(), b"four");
    storage.remove_file(&file).unwrap();
    assert_eq!(
        read_file(storage, &link, 100).unwrap(),
        b"four",
        "a link outlives the other name"
    );
    create_durable(storage, &file, b"other").unwrap();
    assert_eq!(
        storage.hard_link(&file, &link).err().map(|e| e.kind()),
        Some(ErrorKind::AlreadyExists),
        "a link never replaces"
    );
    assert_eq!(read_file(storage, &link, 100).unwrap(), b"four");
}

fn helpers(storage: &dyn Storage, dir: &Path) {
    let path = dir.join("atomic");
    write_atomic(storage, &path, b"first").unwrap();
    write_atomic(storage, &path, b"second, longer").unwrap();
    assert_eq!(read_file(storage, &path, 100).unwrap(), b"second, longer");
    write_atomic(storage, &path, b"3").unwrap();
    assert_eq!(
        read_file(storage, &path, 100).unwrap(),
        b"3",
        "no stale tail"
    );
    assert!(
        !storage
            .list(dir)
            .unwrap()
            .iter()
            .any(|n| n.ends_with(".tmp")),
        "no temporary file is left"
    );
    assert_eq!(
        create_durable(storage, &path, b"x").err().map(|e| e.kind()),
        Some(ErrorKind::AlreadyExists)
    );
    let big = dir.join("big");
    create_durable(storage, &big, &[7u8; 4096]).unwrap();
    assert!(
        read_file(storage, &big, 4095).is_err(),
        "the read limit holds"
    );
    assert_eq!(read_file(storage, &big, 4096).unwrap().len(), 4096);
}

fn locks(storage: &dyn Storage, dir: &Path) {
    let path = dir.join("LOCK");
    let held = storage.try_lock(&path).unwrap();
    assert!(held.is_some(), "a free lock is taken");
    assert!(
        storage.try_lock(&path).unwrap().is_none(),
        "a held lock is refused"
    );
    assert!(storage.exists(&path).unwrap(), "the lock file exists");
    drop(held);
    assert!(
        storage.try_lock(&path).unwrap().is_some(),
        "a dropped lock is free again"
    );
}
