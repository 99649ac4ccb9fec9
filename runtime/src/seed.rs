//! Rebuilding a pool from the log: `lego replay LOG_DIR --to memcached://... -o POOL_IMAGE`.
//! The epoch is planned as for a heap image (`log/replay`), but the second pass hands its
//! pages to a [`PoolSink`] that stores every non-zero page in the pool (version 1, with its
//! CRC32C, as many copies as asked, every copy written before the page counts) under a new
//! random heap id; then the heap's lease becomes a seeded one (no time to live: garbage
//! collection keeps the heap until a run restores it), and a small local *pool image*
//! (`log/pool_image.rs`) records the header, the heap id, the servers and each page's
//! checksum, version and holders: what `LEGO_RESTORE` needs to bring the heap back from the
//! pool.
//!
//! Rules: zero pages are not stored; a page the pool does not take (after its own failover)
//! fails the whole seeding, whose pages are then left without a lease for the next collection
//! (a pool image is written only for a heap that is whole in the pool). No local disk the size
//! of the heap is needed: memory is the replay's page map plus 8 bytes per stored page.
//! This module sits above `log/` and `store/` (it uses both) and below the CLI.

use std::path::Path;

use thiserror::Error;

use crate::config::{PoolSettings, Replication};
use crate::log::format::BLOCK_BYTES_U64;
use crate::log::pool_image::{self, PoolImageError, PoolImageHeader, PoolPage};
use crate::log::replay::{
    check_strict, open_segments, plan, resolve_target, write_image, ImageSink, Progress,
    ReplayError, ReplayOptions, ReplayReport,
};
use crate::logging::error_chain;
use crate::seal::SealKey;
use crate::store::memcached::random_heap_id;
use crate::store::pool::PoolStore;
use crate::store::{open_memcached_pool_as, PageStore, PageWrite, StoreError};
use crate::PAGE_SIZE;

/// The version every seeded page is stored with (a restored run's next write of it is 2).
pub const SEEDED_VERSION: u32 = 1;

/// What `lego replay --to` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedOptions {
    /// Which epoch, and `--strict`.
    pub replay: ReplayOptions,
    /// The pool's servers, `HOST:PORT`.
    pub servers: Vec<String>,
    /// Copies of every page (`--replicas`), on distinct servers.
    pub replicas: usize,
    /// Bound on every connect, read and write, in milliseconds.
    pub timeout_ms: u64,
    /// The key file that seals the values (`--key-file`, as `LEGO_KEY_FILE` of the run that
    /// restores the heap).
    pub key_file: Option<std::path::PathBuf>,
}

/// What a seeding did.
#[derive(Debug)]
pub struct SeedReport {
    /// What the replay recovered (its `image_bytes` is the pool image's size).
    pub replay: ReplayReport,
    pub heap_id: u64,
    /// Pages stored in the pool.
    pub pages: u64,
    pub replicas: usize,
    pub servers: Vec<String>,
}

impl std::fmt::Display for SeedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.replay)?;
        writeln!(
            f,
            "stored {} pages ({} {} each) in memcached://{} as heap {:016x}, kept for its \
             restore (lego pool --heaps shows it seeded)",
            self.pages,
            self.replicas,
            if self.replicas == 1 { "copy" } else { "copies" },
            self.servers.join(","),
            self.heap_id
        )
    }
}

/// Why a seeding failed (nothing usable is left: no pool image is written).
#[derive(Debug, Error)]
pub enum SeedError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    PoolImage(#[from] PoolImageError),
    #[error("storing the heap's pages in the pool failed; nothing was seeded (the pages stored so far are freed by the next lego pool gc)")]
    Store(#[source] StoreError),
    #[error("--key-file cannot be used")]
    Key(#[source] crate::seal::KeyError),
    #[error(
        "--replicas {replicas} asks for more copies than the pool has servers ({servers}): \
         give at most {servers}"
    )]
    Replicas { replicas: usize, servers: usize },
    #[error(
        "{short} of the {pages} pages got fewer than the {replicas} copies --replicas asks for \
         (page {page} has {copies}): a server was full (memcached -m) or did not answer; \
         nothing was seeded (the pages stored are freed by the next lego pool gc): give the \
         servers room, or ask for fewer copies"
    )]
    TooFewCopies {
        short: u64,
        pages: u64,
        replicas: usize,
        page: u64,
        copies: u32,
    },
    #[error("setting the seeded heap's lease on the servers failed; nothing was seeded (the pages stored are freed by the next lego pool gc)")]
    Seal(#[source] StoreError),
    #[error(
        "{path} is the pool image of heap {heap_id:016x}, which is still seeded on {server} \
         (awaiting its restore): replacing the file would leave that heap with no pool image; \
         restore it, free it with lego pool gc --heap {heap_id:016x} memcached://{servers}, or \
         choose another -o"
    )]
    StillSeeded {
        path: String,
        heap_id: u64,
        server: String,
        servers: String,
    },
}

/// Refuses to replace the pool image at `path` while its heap is still seeded on a server
/// of its pool (the servers that do not answer are passed over: the file is only replaced).
fn check_not_seeded(path: &Path, timeout_ms: u64) -> Result<(), SeedError> {
    let Ok(old) = pool_image::PoolImage::open(path) else {
        return Ok(()); // Not a pool image (or not there): check_replaceable decides.
    };
    let h = old.header();
    for server in &h.servers {
        let Ok(conn) = crate::store::memcached::connection::Connection::new(server, timeout_ms)
        else {
            continue;
        };
        if let Ok(Some(read)) = crate::store::memcached::lease::read(&conn, h.heap_id) {
            if read.holder.seeded {
                return Err(SeedError::StillSeeded {
                    path: path.display().to_string(),
                    heap_id: h.heap_id,
                    server: server.clone(),
                    servers: h.servers.join(","),
                });
            }
        }
    }
    Ok(())
}

/// The second pass's sink when the heap goes to a pool: pages are stored as they come; the
/// header (offset 0) and the image's length mean nothing here.
struct PoolSink<'p> {
    pool: &'p PoolStore,
    /// Pages stored (in the order they came).
    stored: Vec<u64>,
    /// The first store failure; nothing is stored after it.
    error: Option<StoreError>,
}

impl ImageSink for PoolSink<'_> {
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        if self.error.is_some() {
            return Err(std::io::Error::other("the pool refused a page"));
        }
        if offset < BLOCK_BYTES_U64 {
            return Ok(()); // The image header: the pool image has its own.
        }
        debug_assert!((offset - BLOCK_BYTES_U64).is_multiple_of(PAGE_SIZE as u64));
        let first = (offset - BLOCK_BYTES_U64) / PAGE_SIZE as u64;
        let mut batch: Vec<PageWrite<'_>> = bytes
            .chunks(PAGE_SIZE)
            .zip(first..)
            .filter(|(p, _)| p.iter().any(|&b| b != 0))
            .map(|(p, page)| PageWrite::new(page, p, SEEDED_VERSION))
            .collect();
        if let Err(e) = self.pool.store(&mut batch) {
            let message = error_chain(&e);
            self.error = Some(e);
            return Err(std::io::Error::other(message));
        }
        self.stored.extend(batch.iter().map(|w| w.page));
        Ok(())
    }

    fn set_len(&mut self, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// Checks that every page of `stored` (in order, each once) has `replicas` copies in `pool`'s
/// records.
fn check_copies(pool: &PoolStore, stored: &[u64], replicas: usize) -> Result<(), SeedError> {
    let mut short = 0u64;
    let mut first = None;
    for &page in stored {
        let copies = pool.stored_copy(page).holders.count_ones();
        if (copies as usize) < replicas {
            short += 1;
            first.get_or_insert((page, copies));
        }
    }
    match first {
        None => Ok(()),
        Some((page, copies)) => Err(SeedError::TooFewCopies {
            short,
            pages: stored.len() as u64,
            replicas,
            page,
            copies,
        }),
    }
}

/// `lego replay LOG_DIR --to memcached://... -o POOL_IMAGE`: see the module documentation.
pub fn replay_to_pool(
    dir: &Path,
    pool_image_path: &Path,
    options: &SeedOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<SeedReport, SeedError> {
    if options.replicas == 0 || options.replicas > options.servers.len() {
        return Err(SeedError::Replicas {
            replicas: options.replicas,
            servers: options.servers.len(),
        });
    }
    // Before anything is stored: what is at the pool image's path may be replaced, and the
    // key is good.
    pool_image::check_replaceable(pool_image_path)?;
    check_not_seeded(pool_image_path, options.timeout_ms)?;
    let key = match &options.key_file {
        Some(path) => Some(SealKey::load(path).map_err(SeedError::Key)?),
        None => None,
    };
    let (segments, _) = open_segments(dir)?;
    let target = resolve_target(dir, &segments, options.replay.target)?;
    let mut plan = plan(dir, &segments, target, progress)?;
    if options.replay.strict {
        check_strict(dir, &segments, &plan.report)?;
    }
    let settings = PoolSettings {
        replicas: options.replicas,
        // Every copy is written before a page counts: a seeded heap has no process keeping
        // a queue of copies still to write.
        replication: Replication::Pessimistic,
        timeout_ms: options.timeout_ms,
        ..PoolSettings::default()
    };
    let heap_id = random_heap_id();
    let pool = open_memcached_pool_as(
        &options.servers,
        &settings,
        plan.report.region.len,
        heap_id,
        key.as_ref(),
    )
    .map_err(SeedError::Store)?;
    drop(key);
    let mut sink = PoolSink {
        pool: &pool,
        stored: Vec::new(),
        error: None,
    };
    let written = write_image(&mut plan, &segments, &mut sink, pool_image_path, progress);
    let (mut stored, failure) = (std::mem::take(&mut sink.stored), sink.error.take());
    stored.sort_unstable();
    stored.dedup();
    let result = match (written, failure) {
        (_, Some(e)) => Err(SeedError::Store(e)),
        (Err(e), None) => Err(SeedError::Replay(e)),
        // Every page with all its copies, or nothing seeded: the pool has no thread to add
        // missing copies once sealed (nobody runs the heap).
        (Ok(()), None) => check_copies(&pool, &stored, options.replicas),
    };
    if let Err(e) = result {
        // Released: the pages stored so far are an orphaned heap, freed by the next gc.
        pool.at_exit();
        return Err(e);
    }
    let pages = stored;
    let header = PoolImageHeader {
        region: plan.report.region,
        epoch: plan.report.epoch,
        log_id: plan.report.log_id,
        origin: plan.report.origin,
        pages: pages.len() as u64,
        heap_id,
        replicas: u32::try_from(options.replicas).expect("at most the servers"),
        servers: pool.servers(),
        sealed: options.key_file.is_some(),
    };
    let entries = pages.iter().map(|&page| {
        let copy = pool.stored_copy(page);
        PoolPage {
            page,
            holders: copy.holders,
            crc: copy.crc,
            version: copy.version,
        }
    });
    // Sealed once the pool image is durable under its temporary name, renamed after: a crash
    // before the seal leaves an orphan for gc, one after the rename a whole pool image.
    let mut seal_error = None;
    let written =
        pool_image::write_pool_image_then(pool_image_path, &header, entries, || {
            match pool.seal_as_seeded() {
                Ok(()) => true,
                Err(e) => {
                    seal_error = Some(e);
                    false
                }
            }
        });
    let failed = match (written, seal_error) {
        (Ok(true), _) => None,
        (_, Some(e)) => Some(SeedError::Seal(e)),
        (Err(e), None) => Some(e.into()),
        (Ok(false), None) => unreachable!("the pool image is dropped only when sealing failed"),
    };
    if let Some(e) = failed {
        // Released, sealed or not: the pages are an orphaned heap, freed by the next gc.
        pool.at_exit();
        return Err(e);
    }
    let mut replay = plan.report;
    replay.image_bytes = header.file_bytes();
    Ok(SeedReport {
        replay,
        heap_id,
        pages: header.pages,
        replicas: options.replicas,
        servers: header.servers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::{EpochPage, RegionInfo};
    use crate::log::pool_image::PoolImage;
    use crate::log::test_support::page;
    use crate::log::{LogWriter, WriterOptions};
    use crate::store::memcached::test_server::TestServer;
    use crate::store::{open_restored_pool, PageRead};
    use crate::test_support::TestDir;

    /// A log of two epochs (one page rewritten, one zeroed) seeds two servers with two copies;
    /// the pool image lists the final non-zero pages, a restored pool serves exactly them, and
    /// a second restore of the same heap is refused while the first holds its lease.
    /// A page that got fewer copies than asked (a server down or full while seeding) stops
    /// the seeding before the lease is sealed, with the count.
    #[test]
    fn a_page_short_of_its_copies_is_refused() {
        use crate::config::Replication;
        use crate::store::pool::member::test_member::TestMember;
        use crate::store::pool::member::Member;
        use crate::store::PageWrite;

        let heap_bytes = 64 * 4096;
        let a = TestMember::new("a:1", heap_bytes);
        let b = TestMember::new("b:1", heap_bytes);
        let members: Vec<Box<dyn Member>> = vec![Box::new(a), Box::new(b)];
        let settings = PoolSettings {
            replicas: 2,
            replication: Replication::Pessimistic,
            ..PoolSettings::default()
        };
        let pool = PoolStore::new("test".into(), members, heap_bytes, settings).expect("a pool");
        let mut buf = crate::io::AlignedBuf::new(4096);
        buf.as_mut_slice().copy_from_slice(&page(7));
        let data = buf.as_mut_slice().to_vec();
        let mut batch = [PageWrite::new(1, buf.as_mut_slice(), SEEDED_VERSION)];
        pool.store(&mut batch).expect("two copies");
        check_copies(&pool, &[1], 2).expect("every page has its copies");
        // What the records say after a server refused pages 2 and 3 (full, or down while
        // seeding: the store was still Ok, one copy being stored).
        let one_copy = |page| {
            (
                page,
                crate::store::pool::records::Copy {
                    crc: crc32c::crc32c(&data),
                    version: SEEDED_VERSION,
                    holders: 0b01,
                },
            )
        };
        pool.adopt([one_copy(2), one_copy(3)]).expect("adopting");
        let e = check_copies(&pool, &[1, 2, 3], 2).expect_err("short pages");
        assert!(
            matches!(
                e,
                SeedError::TooFewCopies {
                    short: 2,
                    pages: 3,
                    replicas: 2,
                    page: 2,
                    copies: 1
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("2 of the 3 pages"), "{e}");
    }

    #[test]
    fn a_log_seeds_a_pool_that_a_restore_reads_back() {
        seed_and_restore(false);
    }

    /// The same with `--key-file`: the pool image says the values are sealed, a restore
    /// with the key reads them back, one under another key gets no page.
    #[test]
    fn a_log_seeds_a_sealed_pool_that_a_restore_with_the_key_reads_back() {
        seed_and_restore(true);
    }

    /// Adopts the pages a pool image lists, as a restore does.
    fn adopt_listed(pool: &crate::store::pool::PoolStore, listed: &[PoolPage]) {
        pool.adopt(listed.iter().map(|p| {
            (
                p.page,
                crate::store::pool::records::Copy {
                    crc: p.crc,
                    version: p.version,
                    holders: p.holders,
                },
            )
        }))
        .expect("adopting");
    }

    fn seed_and_restore(keyed: bool) {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = TestDir::new("seed");
        let logs = dir.0.join("heap");
        let region = RegionInfo {
            base: 0x7c00_0000_0000,
            len: 64 * 4096,
        };
        let mut w = LogWriter::create(&logs, region, WriterOptions::default()).expect("creating");
        let (p1, p2, p3) = (page(1), page(2), page(3));
        let first = [
            EpochPage {
                page: 3,
                data: Some(&p1),
            },
            EpochPage {
                page: 4,
                data: Some(&p2),
            },
            EpochPage {
                page: 40,
                data: Some(&p2),
            },
        ];
        w.append_epoch(&first).expect("appending");
        let second = [
            EpochPage {
                page: 3,
                data: Some(&p3),
            },
            EpochPage {
                page: 4,
                data: None,
            },
        ];
        w.append_epoch(&second).expect("appending");
        drop(w);

        let key_path = dir.0.join("key");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .expect("the key file");
        std::io::Write::write_all(&mut f, &[0x33; crate::seal::KEY_BYTES]).expect("the key");
        drop(f);
        let key = keyed.then(|| SealKey::load(&key_path).expect("a good key file"));

        let servers = [TestServer::start(16, false), TestServer::start(16, false)];
        let names: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        let options = SeedOptions {
            replay: ReplayOptions::default(),
            servers: names.clone(),
            replicas: 2,
            timeout_ms: 2000,
            key_file: keyed.then(|| key_path.clone()),
        };
        let image = dir.0.join("heap.pool");
        let report = replay_to_pool(&logs, &image, &options, &mut |_| {}).expect("seeding");
        // Seeding again over a pool image whose heap is still seeded is refused.
        let again = replay_to_pool(&logs, &image, &options, &mut |_| {}).expect_err("seeded");
        assert!(
            again
                .to_string()
                .contains(&format!("lego pool gc --heap {:016x}", report.heap_id)),
            "{again}"
        );
        assert_eq!((report.replay.epoch, report.pages), (2, 2), "{report}");
        assert_eq!(
            PoolImage::open(&image).expect("image").header().sealed,
            keyed
        );

        let img = PoolImage::open(&image).expect("the pool image");
        let h = img.header().clone();
        assert_eq!(
            (h.heap_id, h.servers.clone(), h.epoch),
            (report.heap_id, names.clone(), 2)
        );
        let mut listed = Vec::new();
        img.for_each_page(|p| listed.push(p)).expect("reading");
        assert_eq!(listed.iter().map(|p| p.page).collect::<Vec<_>>(), [3, 40]);
        assert!(listed
            .iter()
            .all(|p| p.holders == 0b11 && p.version == SEEDED_VERSION));

        let settings = PoolSettings {
            replicas: 2,
            ..PoolSettings::default()
        };
        if keyed {
            // Under another key: restored, but no page opens (each is lost, never wrong).
            let wrong = SealKey::from_bytes([0x34; crate::seal::KEY_BYTES]);
            let restored =
                open_restored_pool(&names, &settings, region.len, h.heap_id, Some(&wrong))
                    .expect("restore");
            let pool = restored.pool();
            adopt_listed(pool, &listed);
            let mut buf = crate::io::AlignedBuf::new(4096);
            let mut reads = [PageRead::new(3, buf.as_mut_slice(), listed[0].crc, 1)];
            assert!(pool.fetch(&mut reads).is_err());
            assert_eq!(
                reads[0].outcome,
                crate::store::Outcome::Failed(crate::store::FailureKind::Lost)
            );
            // Dropped before its take-over, as a failed start is: the heap is given back.
            drop(restored);
        }
        let mut restored =
            open_restored_pool(&names, &settings, region.len, h.heap_id, key.as_ref())
                .expect("restore");
        restored.take_over().expect("taking the heap over");
        let pool = restored.pool();
        adopt_listed(pool, &listed);
        let mut bufs = [
            crate::io::AlignedBuf::new(4096),
            crate::io::AlignedBuf::new(4096),
        ];
        let [a, b] = &mut bufs;
        let mut reads = [
            PageRead::new(3, a.as_mut_slice(), listed[0].crc, 1),
            PageRead::new(40, b.as_mut_slice(), listed[1].crc, 1),
        ];
        pool.fetch(&mut reads).expect("the seeded pages come back");
        assert_eq!(bufs[0].as_mut_slice(), &p3[..]);
        assert_eq!(bufs[1].as_mut_slice(), &p2[..]);

        let err = open_restored_pool(&names, &settings, region.len, h.heap_id, key.as_ref())
            .err()
            .expect("a heap is restored once");
        assert!(
            crate::logging::error_chain(&err).contains("already running"),
            "{err}"
        );
        // Too many copies for the servers: refused before anything is read.
        let err = replay_to_pool(
            &logs,
            &dir.0.join("other.pool"),
            &SeedOptions {
                replicas: 3,
                ..options
            },
            &mut |_| {},
        )
        .expect_err("three copies on two servers");
        assert!(err.to_string().contains("--replicas 3"), "{err}");
    }
}

#[cfg(test)]
mod equality {
    use std::collections::BTreeMap;

    use super::*;
    use crate::log::format::{ImageHeader, RegionInfo};
    use crate::log::pool_image::PoolImage;
    use crate::log::replay::replay_dir;
    use crate::log::test_support::{epoch_pages, seeded_changes};
    use crate::log::{LogWriter, WriterOptions};
    use crate::store::memcached::test_server::TestServer;
    use crate::store::pool::records::Copy;
    use crate::store::{open_restored_pool, PageRead};
    use crate::test_support::{Rng, TestDir};

    /// Random epochs (pages written, rewritten, zeroed, written as zeros) over many segments:
    /// every page of the region read back from the seeded pool equals the same page of the
    /// heap image `lego replay` writes from the same log, byte for byte.
    #[test]
    fn the_pool_holds_exactly_the_image_of_the_log() {
        let dir = TestDir::new("seed-equal");
        let logs = dir.0.join("heap");
        let pages = 600u64;
        let region = RegionInfo {
            base: 0x7d00_0000_0000,
            len: pages * 4096,
        };
        let options = WriterOptions {
            segment_bytes_target: 256 << 10,
            ..WriterOptions::default()
        };
        let mut w = LogWriter::create(&logs, region, options).expect("creating");
        let mut rng = Rng::new(0x5eed_1234);
        for _ in 0..12 {
            let mut seeds = BTreeMap::new();
            for _ in 0..80 {
                seeds.insert(rng.next() % pages, rng.next() % 50);
            }
            w.append_epoch(&epoch_pages(&seeded_changes(&seeds)))
                .expect("appending");
        }
        drop(w);
        let image = dir.0.join("heap.img");
        replay_dir(&logs, &image, None, &mut |_| {}).expect("replaying to an image");
        let image = std::fs::read(&image).expect("the image");

        let servers = [
            TestServer::start(16, false),
            TestServer::start(16, false),
            TestServer::start(16, false),
        ];
        let names: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        let pool_image = dir.0.join("heap.pool");
        let options = SeedOptions {
            replay: ReplayOptions::default(),
            servers: names.clone(),
            replicas: 2,
            timeout_ms: 2000,
            key_file: None,
        };
        replay_to_pool(&logs, &pool_image, &options, &mut |_| {}).expect("seeding");
        let img = PoolImage::open(&pool_image).expect("the pool image");
        let mut listed = BTreeMap::new();
        img.for_each_page(|p| {
            listed.insert(p.page, p);
        })
        .expect("reading");
        let restored = open_restored_pool(
            &names,
            &PoolSettings::default(),
            region.len,
            img.header().heap_id,
            None,
        )
        .expect("restoring");
        let pool = restored.pool();
        pool.adopt(listed.values().map(|p| {
            (
                p.page,
                Copy {
                    crc: p.crc,
                    version: p.version,
                    holders: p.holders,
                },
            )
        }))
        .expect("adopting");
        let zero = vec![0u8; PAGE_SIZE];
        let mut buf = crate::io::AlignedBuf::new(PAGE_SIZE);
        for page in 0..pages {
            let at = usize::try_from(ImageHeader::page_offset(page)).expect("small");
            let want = image.get(at..at + PAGE_SIZE).unwrap_or(&zero);
            match listed.get(&page) {
                Some(p) => {
                    let mut read = [PageRead::new(page, buf.as_mut_slice(), p.crc, p.version)];
                    pool.fetch(&mut read).expect("a seeded page");
                    assert_eq!(buf.as_mut_slice(), want, "page {page}");
                }
                None => assert_eq!(want, &zero[..], "page {page} is not zero but not seeded"),
            }
        }
        assert_eq!(
            listed.len() as u64,
            ImageHeader::decode(&image[..PAGE_SIZE])
                .expect("header")
                .pages
        );
    }
}
