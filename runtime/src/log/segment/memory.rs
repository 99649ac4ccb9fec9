//! Segments in memory (tests only): [`MemoryStorage`] is the [`LogStorage`] the writer, replay
//! and compaction tests run against, shared between clones so a test reads what the writer
//! wrote and can damage it.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use super::LogStorage;
use crate::log::format::segment_file_name;
use crate::log::replay::SegmentSource;

/// Segments in memory, shared with whoever holds a clone (tests read what the writer wrote).
#[derive(Clone, Default)]
pub struct MemoryStorage {
    segments: Arc<Mutex<BTreeMap<u64, Vec<u8>>>>,
    current: Option<u64>,
}

impl MemoryStorage {
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }

    /// A copy of every segment, by sequence number.
    pub fn snapshot(&self) -> BTreeMap<u64, Vec<u8>> {
        self.segments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the bytes of segment `seq` (tests damage a log the writer still holds).
    pub(crate) fn replace_segment(&self, seq: u64, bytes: Vec<u8>) {
        self.segments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(seq, bytes);
    }
}

impl LogStorage for MemoryStorage {
    fn create_segment(&mut self, seq: u64) -> std::io::Result<()> {
        let mut segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        if segs.contains_key(&seq) {
            return Err(ErrorKind::AlreadyExists.into());
        }
        segs.insert(seq, Vec::new());
        self.current = Some(seq);
        Ok(())
    }

    fn append(&mut self, offset: u64, pieces: &[&[u8]]) -> std::io::Result<()> {
        let seq = self.current.ok_or(ErrorKind::NotFound)?;
        let mut segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        let seg = segs.get_mut(&seq).ok_or(ErrorKind::NotFound)?;
        let mut at = usize::try_from(offset).map_err(|_| ErrorKind::InvalidInput)?;
        for p in pieces {
            let end = at + p.len();
            if seg.len() < end {
                seg.resize(end, 0);
            }
            seg[at..end].copy_from_slice(p);
            at = end;
        }
        Ok(())
    }

    fn sync_segment(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn sync_dir(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn remove_segment(&mut self, seq: u64) -> std::io::Result<()> {
        let mut segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        segs.remove(&seq)
            .map(|_| ())
            .ok_or(ErrorKind::NotFound.into())
    }

    fn segments(&self) -> std::io::Result<Vec<u64>> {
        let segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(segs.keys().copied().collect())
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        PathBuf::from(format!("memory:{}", segment_file_name(seq)))
    }

    fn location(&self) -> PathBuf {
        PathBuf::from("memory:")
    }

    fn open_segment(&self, seq: u64) -> std::io::Result<Box<dyn SegmentSource>> {
        let segs = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = segs.get(&seq).ok_or(ErrorKind::NotFound)?.clone();
        Ok(Box::new(bytes))
    }

    /// Memory has no directory: the temporary image goes to the system's temporary directory,
    /// under a name of this storage's own (tests run side by side).
    fn scratch_image_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!(
            "lego-memory-compact-{}-{:p}.img",
            std::process::id(),
            Arc::as_ptr(&self.segments)
        ))
    }
}
