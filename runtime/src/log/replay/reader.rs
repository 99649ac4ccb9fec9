//! The first pass's view of a segment: [`Reader`] hands out its blocks from a buffer of
//! [`READ_CHUNK_BYTES`], read on demand or by a reader thread that keeps
//! [`READ_AHEAD_CHUNKS`] chunks in flight while the scan checks the current one.
//!
//! Rules: the thread reads the chunks in order from offset 0 and stops at the end of the
//! segment (as of its length when opened) or at the first failed read; it lives in the
//! caller's thread scope and ends when its reader is dropped, so it never outlives a replay.
//! A scan that jumps drops the thread and reads on demand from then on.

use std::sync::mpsc;
use std::thread::Scope;

use super::{SegmentSource, READ_AHEAD_CHUNKS, READ_CHUNK_BYTES};
use crate::io::AlignedBuf;
use crate::log::format::{BLOCK_BYTES, BLOCK_BYTES_U64};

/// Reads a segment through a buffer of [`READ_CHUNK_BYTES`], either on demand or, made with
/// [`Reader::with_read_ahead`], from a thread that reads the chunks in order ahead of use.
pub(super) struct Reader<'a, S: SegmentSource + ?Sized> {
    src: &'a S,
    len: u64,
    buf: AlignedBuf,
    start: u64,
    filled: usize,
    // Bytes read from the source so far and handed to the scan (for progress).
    pub(super) read: u64,
    ahead: Option<ReadAhead>,
}

/// The scan's end of a reader thread: chunks come in order from offset 0 on `full`, and
/// buffers go back on `free`. Dropping it ends the thread (its next send or receive fails).
struct ReadAhead {
    full: mpsc::Receiver<Chunk>,
    free: mpsc::Sender<AlignedBuf>,
}

/// A chunk the reader thread read: `result` is the byte count or the read's error.
struct Chunk {
    start: u64,
    buf: AlignedBuf,
    result: std::io::Result<usize>,
}

/// Reads up to [`READ_CHUNK_BYTES`] at `start` into `buf` (whose length is a multiple of
/// [`BLOCK_BYTES`]): the bytes read, fewer only at the end of the segment (as of `len`).
fn read_chunk<S: SegmentSource + ?Sized>(
    src: &S,
    len: u64,
    start: u64,
    buf: &mut AlignedBuf,
) -> std::io::Result<usize> {
    let want = usize::try_from(len.saturating_sub(start))
        .unwrap_or(usize::MAX)
        .min(buf.len());
    // The request is rounded up to whole blocks so that it stays aligned for O_DIRECT; a file
    // that ends inside the last block simply gives fewer bytes.
    let ask = want.next_multiple_of(BLOCK_BYTES).min(buf.len());
    let bytes = buf.as_mut_slice();
    let mut filled = 0;
    while filled < want {
        let n = src.read_at(start + filled as u64, &mut bytes[filled..ask])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    // Bytes appended after the length was taken are not part of this replay.
    Ok(filled.min(want))
}

impl<'a, S: SegmentSource + ?Sized> Reader<'a, S> {
    pub(super) fn new(src: &'a S) -> Self {
        let len = src.size();
        // A small segment gets a small buffer: no need to zero 2 MiB for a few blocks.
        let buf_len = usize::try_from(len.next_multiple_of(BLOCK_BYTES_U64))
            .map_or(READ_CHUNK_BYTES, |l| l.clamp(BLOCK_BYTES, READ_CHUNK_BYTES));
        Reader {
            src,
            len,
            buf: AlignedBuf::new(buf_len),
            start: 0,
            filled: 0,
            read: 0,
            ahead: None,
        }
    }

    /// A reader whose chunks are read by a thread of `scope`, [`READ_AHEAD_CHUNKS`] ahead of
    /// the scan, when the segment holds more than one chunk.
    pub(super) fn with_read_ahead<'scope>(src: &'a S, scope: &'scope Scope<'scope, '_>) -> Self
    where
        'a: 'scope,
    {
        let mut reader = Reader::new(src);
        if reader.len <= READ_CHUNK_BYTES as u64 {
            return reader;
        }
        let (full_tx, full) = mpsc::channel::<Chunk>();
        let (free, free_rx) = mpsc::channel::<AlignedBuf>();
        for _ in 0..READ_AHEAD_CHUNKS {
            free.send(AlignedBuf::new(READ_CHUNK_BYTES))
                .expect("the receiver is alive");
        }
        let len = reader.len;
        scope.spawn(move || {
            let mut start = 0u64;
            while start < len {
                let Ok(mut buf) = free_rx.recv() else { return };
                let result = read_chunk(src, len, start, &mut buf);
                let last = !matches!(result, Ok(n) if n == READ_CHUNK_BYTES);
                if full_tx.send(Chunk { start, buf, result }).is_err() || last {
                    return;
                }
                start += READ_CHUNK_BYTES as u64;
            }
        });
        reader.ahead = Some(ReadAhead { full, free });
        reader
    }

    /// The block at `offset`: [`BLOCK_BYTES`] bytes, fewer at the end of the segment.
    pub(super) fn block(&mut self, offset: u64) -> std::io::Result<&[u8]> {
        let in_buffer =
            offset >= self.start && offset + BLOCK_BYTES_U64 <= self.start + self.filled as u64;
        if !in_buffer && !self.next_chunk(offset)? {
            self.fill(offset)?;
        }
        let from = usize::try_from(offset - self.start).expect("inside the buffer");
        let to = (from + BLOCK_BYTES).min(self.filled);
        Ok(&self.buf.as_slice()[from.min(to)..to])
    }

    /// Takes the reader thread's next chunk when it starts at `offset` (the scan goes on where
    /// the current chunk ends): `Ok(false)` when there is no thread or the scan jumped (then
    /// the thread is dropped and the reader reads on demand).
    fn next_chunk(&mut self, offset: u64) -> std::io::Result<bool> {
        let Some(ahead) = &self.ahead else {
            return Ok(false);
        };
        if offset != self.start + self.filled as u64 {
            self.ahead = None;
            return Ok(false);
        }
        let Ok(chunk) = ahead.full.recv() else {
            // The thread stopped after the last chunk: the segment ends here.
            self.start = offset;
            self.filled = 0;
            return Ok(true);
        };
        if chunk.start != offset {
            self.ahead = None;
            return Ok(false);
        }
        let old = std::mem::replace(&mut self.buf, chunk.buf);
        // A buffer of the first, on-demand read may be smaller; the thread needs full ones.
        if old.len() == READ_CHUNK_BYTES {
            let _ = ahead.free.send(old);
        }
        self.start = chunk.start;
        self.filled = 0;
        self.filled = chunk.result?;
        self.read += self.filled as u64;
        Ok(true)
    }

    fn fill(&mut self, offset: u64) -> std::io::Result<()> {
        self.start = offset;
        self.filled = 0;
        self.filled = read_chunk(self.src, self.len, offset, &mut self.buf)?;
        self.read += self.filled as u64;
        Ok(())
    }
}
