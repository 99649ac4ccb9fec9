//! The pager's side of `LEGO_RESTORE`: a heap started from an image that `lego replay`
//! wrote. At start every data page of the image is marked `Evicted` + `IMAGE` (its content
//! is in the image and nowhere else, with no checksum in the table: replay checked the log's
//! when it wrote the image); a fault on such a page reads it from the image (`fetch.rs`
//! asks [`read_image_pages`] for the runs of `IMAGE` pages it fetches). Once installed, or
//! discarded, a page loses `IMAGE` and lives as any other.
//!
//! The rest of the restore path lives elsewhere: the image format and reader are
//! `log/image.rs`, writing it is `log/replay.rs`, reserving the region at the image's address
//! and opening the heap in it is the preload library's `lego_init`, and a log resumed from
//! the image is `LogWriter::resume` (called by `start.rs`).
//!
//! Rules: pages are marked only at start, before any thread runs and before the heap is
//! opened (its header faults in from the image); the image is only read after that, from any
//! handler thread at once.

use crate::cache::{PageState, Table, IMAGE};
use crate::log::image::ImageReader;

/// The image being restored.
pub(super) struct Restore {
    image: ImageReader,
}

impl Restore {
    pub(super) fn new(image: ImageReader) -> Restore {
        Restore { image }
    }

    /// Marks the image's data runs (`SEEK_DATA`/`SEEK_HOLE`) that are still `Absent` as
    /// `Evicted` + `IMAGE`: they are read from the image when touched. The log already has
    /// them (a resumed log starts with the image). The cache lock is held (`t`).
    pub(super) fn mark_image_pages(&self, t: &mut Table) {
        let img = &self.image;
        let mut count = 0u64;
        img.for_each_data_run(|first, n| {
            for p in first..first + n {
                let p = p as usize;
                if t.state(p) == PageState::Absent {
                    t.set_state(p, PageState::Evicted);
                    t.set_flag(p, IMAGE, true);
                    t.note_used(p);
                    count += 1;
                }
            }
        });
        log::info!(
            "restoring {count} pages of epoch {} from {}",
            img.header().epoch,
            img.path().display()
        );
    }
}

/// Reads pages `first..first + bufs.len()`, all marked `IMAGE`, from the restore image.
pub(super) fn read_image_pages(
    restore: Option<&Restore>,
    first: usize,
    bufs: &mut [&mut [u8]],
) -> Result<(), String> {
    let Some(r) = restore else {
        return Err("the page is marked as in the restore image, but none is open".into());
    };
    r.image
        .read_pages(first as u64, bufs)
        .map_err(|e| crate::logging::error_chain(&e))
}
