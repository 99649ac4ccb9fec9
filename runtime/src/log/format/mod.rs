//! The log's on-disk format, and the heap image's: fixed little-endian layouts with explicit
//! offsets, their encoders and their decoders. Pure: no I/O, no clock, no randomness.
//!
//! Everything is made of 4 KiB blocks ([`BLOCK_BYTES`]) at 4 KiB-aligned offsets, so that a
//! writer can use `O_DIRECT` and registered buffers without copying a page it logs:
//!
//! ```text
//! segment file  seg-NNNNNN.lego
//!   block 0              segment header
//!   then epochs, each:   page group block, its payload pages (one block each, in entry order)
//!                        page group block, its payload pages        (as many groups as needed)
//!                        commit block (kind COMMIT, or CHECKPOINT for a full image)
//! ```
//!
//! A page record is split in two: its 32-byte header (the *entry*: kind, epoch, page index,
//! payload length, CRC32C over the entry and the payload) sits in a page group block with up
//! to [`GROUP_ENTRIES_MAX`] others, and its payload is a whole block of its own right after
//! that group block. This costs one block per 126 pages (0.8%) instead of one per page (a
//! header sector in front of each payload would either misalign the payload for `O_DIRECT` or
//! double the bytes written), and a group with its payloads is one large contiguous write.
//!
//! Every block ends with a CRC32C of everything before it in the block ([`CRC_OFFSET`]), so
//! one flipped bit anywhere is detected, padding included. A page entry's own CRC covers its
//! first 24 bytes and its payload; the commit record carries the number of entries of the
//! epoch and a CRC32C over their CRCs in order, so replay can tell that it saw exactly the
//! records the writer committed. Every block also carries the log's random 64-bit id and its
//! epoch, so a block left over from another log or another epoch is never taken for a current
//! one. Kinds are four ASCII letters, readable in a hex dump; a block of zeros is never a
//! record (it is what a file reads as where nothing was written).
//!
//! The heap image that replay writes has a header block ([`ImageHeader`]) and page `i` of the
//! region at byte `BLOCK_BYTES + i * PAGE_SIZE`; pages never written (or all zeros) are holes,
//! and the file ends after its highest non-zero page (bytes past the end read as zeros).
//!
//! The records' layouts and their encoders and decoders are here; the little-endian field
//! access and the checks every decoder shares are in `fields`, the tests in `tests`.

use thiserror::Error;

use crate::PAGE_SIZE;

mod fields;
#[cfg(test)]
mod tests;

use fields::{
    bad_field, check_crc, check_kind, check_magic, check_page_size, check_version, check_zero,
    get_u32, get_u64, put_u32, put_u64, u32_of, unknown_kind, whole_block,
};

/// Size of every block of a segment (and of the image header), in bytes.
pub const BLOCK_BYTES: usize = 4096;

/// [`BLOCK_BYTES`] as a `u64`, for file offsets.
pub const BLOCK_BYTES_U64: u64 = BLOCK_BYTES as u64;

/// [`PAGE_SIZE`] as a `u64`, for byte arithmetic on regions.
pub const PAGE_BYTES: u64 = PAGE_SIZE as u64;

// A payload is exactly one block: that is what keeps payloads block-aligned.
const _: () = assert!(BLOCK_BYTES == PAGE_SIZE);

/// Where every block keeps the CRC32C of the bytes before it.
pub const CRC_OFFSET: usize = BLOCK_BYTES - 4;

/// Format version written in segment and image headers. Version 2 added the commit record's
/// and the image header's flags ([`COMMIT_FLAG_PROGRAM`], [`IMAGE_FLAG_PROGRAM`]) in bytes
/// that version 1 kept zero, so a version 1 log or image reads as all automatic epochs. The
/// number changed because a version 1 reader takes a non-zero reserved byte for damage: it
/// would silently recover less of a new log, where it now refuses it by its version.
pub const FORMAT_VERSION: u32 = 2;

/// Oldest format version a reader accepts.
pub const FORMAT_VERSION_MIN: u32 = 1;

/// Commit record flag: the program chose this epoch (`lego_checkpoint()`), so its heap holds
/// the program's invariants; other epochs are cut by a timer.
pub const COMMIT_FLAG_PROGRAM: u32 = 1;

/// Every commit record flag this version knows.
const COMMIT_FLAGS_KNOWN: u32 = COMMIT_FLAG_PROGRAM;

/// Image header flag: the image's epoch is a program checkpoint (see [`COMMIT_FLAG_PROGRAM`]).
pub const IMAGE_FLAG_PROGRAM: u32 = 1;

/// Every image header flag this version knows.
const IMAGE_FLAGS_KNOWN: u32 = IMAGE_FLAG_PROGRAM;

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"LEGO-LOG";

/// First bytes of every heap image file.
pub const IMAGE_MAGIC: [u8; 8] = *b"LEGO-IMG";

/// Bytes of one page entry in a page group block.
pub const ENTRY_BYTES: usize = 32;

/// Where the entries of a page group block start.
const GROUP_ENTRIES_OFFSET: usize = 32;

/// Most page entries one page group block holds.
pub const GROUP_ENTRIES_MAX: usize = (CRC_OFFSET - GROUP_ENTRIES_OFFSET) / ENTRY_BYTES;

const _: () = assert!(GROUP_ENTRIES_MAX == 126);
const _: () = assert!(GROUP_ENTRIES_OFFSET + GROUP_ENTRIES_MAX * ENTRY_BYTES <= CRC_OFFSET);

/// Bytes of an entry that its CRC covers (the CRC itself and the reserved word follow).
const ENTRY_CRC_COVERS: usize = 24;

/// Segment header flag: the segment's first epoch is a checkpoint (a full image). Replay may
/// start such a segment after a gap in the epochs, because it does not need what came before.
pub const SEGMENT_FLAG_CHECKPOINT: u32 = 1;

/// Every segment header flag this version knows.
const SEGMENT_FLAGS_KNOWN: u32 = SEGMENT_FLAG_CHECKPOINT;

/// Kind of a page group block.
pub const KIND_PAGE_GROUP: u32 = u32::from_le_bytes(*b"PGRP");
/// Kind of a page entry whose payload follows its group block.
pub const KIND_PAGE: u32 = u32::from_le_bytes(*b"PAGE");
/// Kind of a page entry without payload: the page reads as zeros (freed, or all zeros).
pub const KIND_ZERO: u32 = u32::from_le_bytes(*b"ZERO");
/// Kind of the commit block that ends an epoch of changed pages.
pub const KIND_COMMIT: u32 = u32::from_le_bytes(*b"CMIT");
/// Kind of the commit block that ends a checkpoint: an epoch that holds every non-zero page
/// of the heap, so replay starts the image afresh from it.
pub const KIND_CHECKPOINT: u32 = u32::from_le_bytes(*b"CKPT");

/// Largest region a header may describe: the address range must fit in 57 bits (the user
/// address space with 5-level page tables).
pub const REGION_END_MAX: u64 = 1 << 57;

/// Largest epoch number a header may carry (an epoch a millisecond would take 146 million
/// years to get there): replay and the writer count epochs on from it without overflowing.
pub const EPOCH_MAX: u64 = 1 << 62;

/// One 4 KiB block, aligned for `O_DIRECT`.
#[repr(C, align(4096))]
#[derive(Clone, PartialEq, Eq)]
pub struct Block(pub [u8; BLOCK_BYTES]);

impl Block {
    /// A block of zeros, on the heap.
    pub fn zeroed() -> Box<Block> {
        Box::new(Block([0; BLOCK_BYTES]))
    }

    /// Computes the block's CRC over everything before [`CRC_OFFSET`] and stores it there.
    fn seal(&mut self) {
        let crc = crc32c::crc32c(&self.0[..CRC_OFFSET]);
        put_u32(&mut self.0, CRC_OFFSET, crc);
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Block(kind {:#010x})", get_u32(&self.0, 0))
    }
}

/// Which structure a format error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    SegmentHeader,
    PageGroup,
    PageEntry,
    Commit,
    ImageHeader,
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Record::SegmentHeader => "segment header",
            Record::PageGroup => "page group block",
            Record::PageEntry => "page record",
            Record::Commit => "commit record",
            Record::ImageHeader => "image header",
        })
    }
}

/// Why bytes do not decode as the record they should be.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("the {record} is cut short: it needs {need} bytes and only {have} are there")]
    Truncated {
        record: Record,
        need: usize,
        have: usize,
    },
    #[error(
        "the {record} does not start with the magic \"{}\": it starts with \"{}\"",
        expected.escape_ascii(),
        found.escape_ascii()
    )]
    BadMagic {
        record: Record,
        expected: [u8; 8],
        found: [u8; 8],
    },
    #[error(
        "the {record} has format version {found}; this lego reads versions \
         {FORMAT_VERSION_MIN} to {supported}"
    )]
    UnsupportedVersion {
        record: Record,
        found: u32,
        supported: u32,
    },
    #[error(
        "the {record}'s CRC32C does not match its contents: stored {stored:#010x}, \
         computed {computed:#010x}"
    )]
    BadCrc {
        record: Record,
        stored: u32,
        computed: u32,
    },
    #[error("the block is all zeros: nothing was written there")]
    Unwritten,
    #[error(
        "the block holds the unknown record kind {kind:#010x} (\"{}\"); expected a page group, \
         a commit or a checkpoint",
        kind.to_le_bytes().escape_ascii()
    )]
    UnknownKind { kind: u32 },
    #[error("the {record}'s {field} is {value}; it must be {expected}")]
    BadField {
        record: Record,
        field: &'static str,
        value: u64,
        expected: &'static str,
    },
}

/// The region whose pages a log holds: its base address and length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    pub base: u64,
    pub len: u64,
}

impl RegionInfo {
    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_BYTES
    }

    /// Checks what every header requires of a region: page-aligned, not empty, inside the
    /// address space. `record` names the header for the error.
    pub fn check(&self, record: Record) -> Result<(), FormatError> {
        let bad = |field, value, expected| FormatError::BadField {
            record,
            field,
            value,
            expected,
        };
        if !self.base.is_multiple_of(PAGE_BYTES) {
            return Err(bad("region base", self.base, "a multiple of 4096"));
        }
        if self.len == 0 || !self.len.is_multiple_of(PAGE_BYTES) {
            return Err(bad(
                "region length",
                self.len,
                "a positive multiple of 4096",
            ));
        }
        if self
            .base
            .checked_add(self.len)
            .is_none_or(|end| end > REGION_END_MAX)
        {
            return Err(bad(
                "region length",
                self.len,
                "small enough that the region ends below 2^57",
            ));
        }
        Ok(())
    }
}

/// The first block of a segment file.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `LEGO-LOG` |
/// | 8 | 4 | format version (2; 1 is read too) |
/// | 12 | 4 | page size (4096) |
/// | 16 | 8 | segment sequence number (1, 2, ...; the file name says the same) |
/// | 24 | 8 | log id (random, the same in every block of the log) |
/// | 32 | 8 | region base address |
/// | 40 | 8 | region length in bytes |
/// | 48 | 8 | first epoch (the epoch of the segment's first record) |
/// | 56 | 4 | flags ([`SEGMENT_FLAG_CHECKPOINT`]) |
/// | 60..4092 | | zeros |
/// | 4092 | 4 | CRC32C of bytes 0..4092 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seq: u64,
    pub log_id: u64,
    pub region: RegionInfo,
    pub first_epoch: u64,
    pub flags: u32,
}

impl SegmentHeader {
    /// Whether the segment starts with a checkpoint epoch.
    pub fn starts_with_checkpoint(&self) -> bool {
        self.flags & SEGMENT_FLAG_CHECKPOINT != 0
    }

    pub fn encode(&self) -> Box<Block> {
        let mut b = Block::zeroed();
        b.0[0..8].copy_from_slice(&SEGMENT_MAGIC);
        put_u32(&mut b.0, 8, FORMAT_VERSION);
        put_u32(
            &mut b.0,
            12,
            u32::try_from(PAGE_SIZE).expect("4096 fits u32"),
        );
        put_u64(&mut b.0, 16, self.seq);
        put_u64(&mut b.0, 24, self.log_id);
        put_u64(&mut b.0, 32, self.region.base);
        put_u64(&mut b.0, 40, self.region.len);
        put_u64(&mut b.0, 48, self.first_epoch);
        put_u32(&mut b.0, 56, self.flags);
        b.seal();
        b
    }

    /// Decodes and checks a segment header: magic, version, CRC, then every field.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, FormatError> {
        const R: Record = Record::SegmentHeader;
        let b = whole_block(R, bytes)?;
        check_magic(R, b, SEGMENT_MAGIC)?;
        check_version(R, b)?;
        check_crc(R, b)?;
        check_page_size(R, get_u32(b, 12))?;
        let header = SegmentHeader {
            seq: get_u64(b, 16),
            log_id: get_u64(b, 24),
            region: RegionInfo {
                base: get_u64(b, 32),
                len: get_u64(b, 40),
            },
            first_epoch: get_u64(b, 48),
            flags: get_u32(b, 56),
        };
        header.region.check(R)?;
        if header.seq == 0 {
            return Err(bad_field(R, "sequence number", 0, "1 or more"));
        }
        if !(1..=EPOCH_MAX).contains(&header.first_epoch) {
            let value = header.first_epoch;
            return Err(bad_field(R, "first epoch", value, "from 1 to 2^62"));
        }
        if header.flags & !SEGMENT_FLAGS_KNOWN != 0 {
            return Err(bad_field(
                R,
                "flags",
                header.flags.into(),
                "0 or 1 (checkpoint)",
            ));
        }
        check_zero(R, b, 60..CRC_OFFSET)?;
        Ok(header)
    }
}

/// What a page entry says about its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// The page's content is the payload block that belongs to the entry.
    Page,
    /// The page reads as zeros; the entry has no payload.
    Zero,
}

impl EntryKind {
    fn code(self) -> u32 {
        match self {
            EntryKind::Page => KIND_PAGE,
            EntryKind::Zero => KIND_ZERO,
        }
    }

    /// Bytes of payload an entry of this kind has.
    pub fn payload_len(self) -> u32 {
        match self {
            EntryKind::Page => u32::try_from(PAGE_SIZE).expect("4096 fits u32"),
            EntryKind::Zero => 0,
        }
    }
}

/// The header of one page record (32 bytes inside a page group block).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | kind: `PAGE` (payload follows) or `ZERO` (no payload) |
/// | 4 | 4 | payload length: 4096 for `PAGE`, 0 for `ZERO` |
/// | 8 | 8 | epoch |
/// | 16 | 8 | page index in the region (address = region base + index * 4096) |
/// | 24 | 4 | CRC32C of bytes 0..24 followed by the payload |
/// | 28 | 4 | zero |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    pub kind: EntryKind,
    pub epoch: u64,
    pub page: u64,
    pub crc: u32,
}

impl PageEntry {
    /// The entry of a page whose content is `payload` (one page).
    ///
    /// # Panics
    /// If `payload` is not exactly one page: callers check their buffers first.
    pub fn data(epoch: u64, page: u64, payload: &[u8]) -> PageEntry {
        assert_eq!(payload.len(), PAGE_SIZE, "a page payload is one page");
        let mut e = PageEntry {
            kind: EntryKind::Page,
            epoch,
            page,
            crc: 0,
        };
        e.crc = e.compute_crc(payload);
        e
    }

    /// The entry of a page that reads as zeros.
    pub fn zero(epoch: u64, page: u64) -> PageEntry {
        let mut e = PageEntry {
            kind: EntryKind::Zero,
            epoch,
            page,
            crc: 0,
        };
        e.crc = e.compute_crc(&[]);
        e
    }

    fn covered_bytes(&self) -> [u8; ENTRY_CRC_COVERS] {
        let mut b = [0; ENTRY_CRC_COVERS];
        put_u32(&mut b, 0, self.kind.code());
        put_u32(&mut b, 4, self.kind.payload_len());
        put_u64(&mut b, 8, self.epoch);
        put_u64(&mut b, 16, self.page);
        b
    }

    fn compute_crc(&self, payload: &[u8]) -> u32 {
        crc32c::crc32c_append(crc32c::crc32c(&self.covered_bytes()), payload)
    }

    /// Checks the entry's CRC against its payload (empty for a `ZERO` entry).
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), FormatError> {
        let payload_len = usize::try_from(self.kind.payload_len()).expect("u32 fits usize");
        if payload.len() != payload_len {
            return Err(FormatError::Truncated {
                record: Record::PageEntry,
                need: payload_len,
                have: payload.len(),
            });
        }
        let computed = self.compute_crc(payload);
        if computed == self.crc {
            Ok(())
        } else {
            Err(FormatError::BadCrc {
                record: Record::PageEntry,
                stored: self.crc,
                computed,
            })
        }
    }

    fn encode_into(&self, out: &mut [u8]) {
        out[..ENTRY_CRC_COVERS].copy_from_slice(&self.covered_bytes());
        put_u32(out, 24, self.crc);
        put_u32(out, 28, 0);
    }

    fn decode(b: &[u8], group_epoch: u64) -> Result<PageEntry, FormatError> {
        const R: Record = Record::PageEntry;
        let kind = match get_u32(b, 0) {
            KIND_PAGE => EntryKind::Page,
            KIND_ZERO => EntryKind::Zero,
            other => return Err(bad_field(R, "kind", other.into(), "PAGE or ZERO")),
        };
        let payload_len = get_u32(b, 4);
        if payload_len != kind.payload_len() {
            return Err(bad_field(
                R,
                "payload length",
                payload_len.into(),
                "4096 for a PAGE entry, 0 for a ZERO entry",
            ));
        }
        let epoch = get_u64(b, 8);
        if epoch != group_epoch {
            return Err(bad_field(R, "epoch", epoch, "its page group's epoch"));
        }
        check_zero(R, b, 28..ENTRY_BYTES)?;
        Ok(PageEntry {
            kind,
            epoch,
            page: get_u64(b, 16),
            crc: get_u32(b, 24),
        })
    }
}

/// A page group block: up to [`GROUP_ENTRIES_MAX`] page entries of one epoch. The payloads of
/// its `PAGE` entries follow it, one block each, in entry order.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | kind `PGRP` |
/// | 4 | 4 | entries in this block (1..=126) |
/// | 8 | 8 | epoch |
/// | 16 | 8 | log id |
/// | 24 | 4 | index of this group within its epoch (0, 1, ...) |
/// | 28 | 4 | payload blocks that follow (the number of `PAGE` entries) |
/// | 32 | 32 each | the entries ([`PageEntry`]) |
/// | ..4092 | | zeros |
/// | 4092 | 4 | CRC32C of bytes 0..4092 |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageGroup {
    pub epoch: u64,
    pub log_id: u64,
    pub index: u32,
    pub entries: Vec<PageEntry>,
}

impl PageGroup {
    /// Payload blocks that follow the group block.
    pub fn payload_blocks(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::Page)
            .count()
    }

    /// # Panics
    /// If the group holds no entry or more than [`GROUP_ENTRIES_MAX`].
    pub fn encode(&self) -> Box<Block> {
        assert!(
            (1..=GROUP_ENTRIES_MAX).contains(&self.entries.len()),
            "a page group holds 1 to GROUP_ENTRIES_MAX entries"
        );
        let mut b = Block::zeroed();
        put_u32(&mut b.0, 0, KIND_PAGE_GROUP);
        put_u32(&mut b.0, 4, u32_of(self.entries.len()));
        put_u64(&mut b.0, 8, self.epoch);
        put_u64(&mut b.0, 16, self.log_id);
        put_u32(&mut b.0, 24, self.index);
        put_u32(&mut b.0, 28, u32_of(self.payload_blocks()));
        for (i, e) in self.entries.iter().enumerate() {
            let at = GROUP_ENTRIES_OFFSET + i * ENTRY_BYTES;
            e.encode_into(&mut b.0[at..at + ENTRY_BYTES]);
        }
        b.seal();
        b
    }

    /// Decodes and checks a page group block (kind, CRC, counts, every entry's fields). The
    /// entries' payload CRCs are checked by the caller, which reads the payloads.
    pub fn decode(bytes: &[u8]) -> Result<PageGroup, FormatError> {
        const R: Record = Record::PageGroup;
        let b = whole_block(R, bytes)?;
        check_kind(R, b, KIND_PAGE_GROUP)?;
        check_crc(R, b)?;
        let count = get_u32(b, 4);
        let count_usize = usize::try_from(count).unwrap_or(usize::MAX);
        if !(1..=GROUP_ENTRIES_MAX).contains(&count_usize) {
            return Err(bad_field(
                R,
                "entry count",
                count.into(),
                "between 1 and 126",
            ));
        }
        let epoch = get_u64(b, 8);
        let entries = (0..count_usize)
            .map(|i| {
                let at = GROUP_ENTRIES_OFFSET + i * ENTRY_BYTES;
                PageEntry::decode(&b[at..at + ENTRY_BYTES], epoch)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let group = PageGroup {
            epoch,
            log_id: get_u64(b, 16),
            index: get_u32(b, 24),
            entries,
        };
        let payloads = get_u32(b, 28);
        if usize::try_from(payloads).ok() != Some(group.payload_blocks()) {
            return Err(bad_field(
                R,
                "payload block count",
                payloads.into(),
                "the number of its PAGE entries",
            ));
        }
        check_zero(
            R,
            b,
            GROUP_ENTRIES_OFFSET + count_usize * ENTRY_BYTES..CRC_OFFSET,
        )?;
        Ok(group)
    }
}

/// Who chose the moment of an epoch: a timer or the pager's own reasons ([`Automatic`]), or
/// the program, by calling `lego_checkpoint()` ([`Program`]). `lego replay --checkpoint`
/// recovers the newest program epoch, where the program's invariants hold.
///
/// [`Automatic`]: EpochOrigin::Automatic
/// [`Program`]: EpochOrigin::Program
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EpochOrigin {
    /// Cut by the flusher (every `LEGO_FLUSH_MS`, or when enough pages are dirty), or a
    /// checkpoint of such an epoch.
    #[default]
    Automatic,
    /// Cut for `lego_checkpoint()`, or a checkpoint of such an epoch.
    Program,
}

impl EpochOrigin {
    /// The origin a commit record's (or image header's) program flag says.
    pub fn from_program_flag(program: bool) -> EpochOrigin {
        if program {
            EpochOrigin::Program
        } else {
            EpochOrigin::Automatic
        }
    }

    pub fn is_program(self) -> bool {
        self == EpochOrigin::Program
    }
}

/// How a commit record ends its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitKind {
    /// The epoch holds the pages that changed since the previous epoch.
    Delta,
    /// The epoch holds every non-zero page of the heap: the image restarts from it, and
    /// segments before the one it starts in hold nothing current.
    Checkpoint,
}

impl CommitKind {
    fn code(self) -> u32 {
        match self {
            CommitKind::Delta => KIND_COMMIT,
            CommitKind::Checkpoint => KIND_CHECKPOINT,
        }
    }
}

/// The block that ends an epoch; an epoch without one is never applied.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | kind `CMIT`, or `CKPT` for a checkpoint |
/// | 4 | 4 | page group blocks in the epoch |
/// | 8 | 8 | epoch |
/// | 16 | 8 | log id |
/// | 24 | 8 | page entries in the epoch (`PAGE` and `ZERO`) |
/// | 32 | 8 | bytes of the epoch before this block (groups and payloads) |
/// | 40 | 4 | batch CRC: CRC32C over the entries' CRCs (4 bytes each, little-endian) in order |
/// | 44 | 4 | flags: [`COMMIT_FLAG_PROGRAM`] (zero in version 1) |
/// | 48..4092 | | zeros |
/// | 4092 | 4 | CRC32C of bytes 0..4092 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub kind: CommitKind,
    pub epoch: u64,
    pub log_id: u64,
    pub groups: u32,
    pub pages: u64,
    pub body_bytes: u64,
    pub batch_crc: u32,
    pub origin: EpochOrigin,
}

impl Commit {
    pub fn encode(&self) -> Box<Block> {
        let mut b = Block::zeroed();
        put_u32(&mut b.0, 0, self.kind.code());
        put_u32(&mut b.0, 4, self.groups);
        put_u64(&mut b.0, 8, self.epoch);
        put_u64(&mut b.0, 16, self.log_id);
        put_u64(&mut b.0, 24, self.pages);
        put_u64(&mut b.0, 32, self.body_bytes);
        put_u32(&mut b.0, 40, self.batch_crc);
        if self.origin.is_program() {
            put_u32(&mut b.0, 44, COMMIT_FLAG_PROGRAM);
        }
        b.seal();
        b
    }

    /// Decodes and checks a commit or checkpoint record. Whether it matches the records
    /// before it is for the caller to check.
    pub fn decode(bytes: &[u8]) -> Result<Commit, FormatError> {
        const R: Record = Record::Commit;
        let b = whole_block(R, bytes)?;
        let kind = match get_u32(b, 0) {
            KIND_COMMIT => CommitKind::Delta,
            KIND_CHECKPOINT => CommitKind::Checkpoint,
            other => return Err(unknown_kind(b, other)),
        };
        check_crc(R, b)?;
        let flags = get_u32(b, 44);
        if flags & !COMMIT_FLAGS_KNOWN != 0 {
            return Err(bad_field(R, "flags", flags.into(), "0 or 1 (program)"));
        }
        check_zero(R, b, 48..CRC_OFFSET)?;
        Ok(Commit {
            origin: EpochOrigin::from_program_flag(flags & COMMIT_FLAG_PROGRAM != 0),
            kind,
            groups: get_u32(b, 4),
            epoch: get_u64(b, 8),
            log_id: get_u64(b, 16),
            pages: get_u64(b, 24),
            body_bytes: get_u64(b, 32),
            batch_crc: get_u32(b, 40),
        })
    }
}

/// The kind of the record a block of an epoch holds, from its first four bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    PageGroup,
    Commit,
}

impl BlockKind {
    /// Tells a page group from a commit (or checkpoint) block; anything else is an error
    /// (all zeros: [`FormatError::Unwritten`]).
    pub fn of(bytes: &[u8]) -> Result<BlockKind, FormatError> {
        let b = whole_block(Record::PageGroup, bytes)?;
        match get_u32(b, 0) {
            KIND_PAGE_GROUP => Ok(BlockKind::PageGroup),
            KIND_COMMIT | KIND_CHECKPOINT => Ok(BlockKind::Commit),
            other => Err(unknown_kind(b, other)),
        }
    }
}

/// Accumulates the batch CRC of a commit record: CRC32C over the entries' CRCs in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCrc(u32);

impl BatchCrc {
    pub fn push(&mut self, entry_crc: u32) {
        self.0 = crc32c::crc32c_append(self.0, &entry_crc.to_le_bytes());
    }

    pub fn value(self) -> u32 {
        self.0
    }
}

/// One page of an epoch, as the writer gets it.
#[derive(Debug, Clone, Copy)]
pub struct EpochPage<'a> {
    /// Index of the page in the region.
    pub page: u64,
    /// The page's content (one page), or `None` when the page reads as zeros (freed).
    pub data: Option<&'a [u8]>,
}

/// A piece of an encoded epoch: a block the encoder made, or a page payload borrowed from the
/// caller (never copied).
#[derive(Debug)]
pub enum Piece<'a> {
    Block(Box<Block>),
    Payload(&'a [u8]),
}

impl Piece<'_> {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Piece::Block(b) => &b.0,
            Piece::Payload(p) => p,
        }
    }
}

/// One epoch laid out for appending: `body` (page groups and payloads, in file order), then
/// `commit`, which a writer appends only once the body is durable.
#[derive(Debug)]
pub struct EncodedEpoch<'a> {
    pub body: Vec<Piece<'a>>,
    pub commit: Box<Block>,
    /// Bytes of `body`.
    pub body_bytes: u64,
}

impl EncodedEpoch<'_> {
    /// Bytes of the whole epoch, commit included.
    pub fn bytes(&self) -> u64 {
        self.body_bytes + BLOCK_BYTES_U64
    }
}

/// Lays out one epoch of `pages` (in the given order) for the log `log_id`.
///
/// # Panics
/// If a page's data is not exactly one page long: callers check their buffers first.
pub fn encode_epoch<'a>(
    epoch: u64,
    log_id: u64,
    kind: CommitKind,
    origin: EpochOrigin,
    pages: &[EpochPage<'a>],
) -> EncodedEpoch<'a> {
    let mut body = Vec::new();
    let mut batch = BatchCrc::default();
    let mut groups = 0u32;
    for chunk in pages.chunks(GROUP_ENTRIES_MAX) {
        let entries: Vec<PageEntry> = chunk
            .iter()
            .map(|p| match p.data {
                Some(d) => PageEntry::data(epoch, p.page, d),
                None => PageEntry::zero(epoch, p.page),
            })
            .collect();
        for e in &entries {
            batch.push(e.crc);
        }
        let group = PageGroup {
            epoch,
            log_id,
            index: groups,
            entries,
        };
        body.push(Piece::Block(group.encode()));
        body.extend(chunk.iter().filter_map(|p| p.data.map(Piece::Payload)));
        groups += 1;
    }
    let body_bytes = body.iter().map(|p| p.bytes().len() as u64).sum();
    let commit = Commit {
        kind,
        epoch,
        log_id,
        groups,
        pages: pages.len() as u64,
        body_bytes,
        batch_crc: batch.value(),
        origin,
    }
    .encode();
    EncodedEpoch {
        body,
        commit,
        body_bytes,
    }
}

/// The first block of a heap image file.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `LEGO-IMG` |
/// | 8 | 4 | format version (2; 1 is read too) |
/// | 12 | 4 | page size (4096) |
/// | 16 | 8 | region base address |
/// | 24 | 8 | region length in bytes |
/// | 32 | 8 | epoch the image holds |
/// | 40 | 8 | log id of the log it was replayed from |
/// | 48 | 8 | non-zero pages in the image |
/// | 56 | 4 | flags: [`IMAGE_FLAG_PROGRAM`] (zero in version 1) |
/// | 60..4092 | | zeros |
/// | 4092 | 4 | CRC32C of bytes 0..4092 |
///
/// Page `i` of the region is at byte `4096 + i * 4096`; holes and bytes past the end of the
/// file are zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub region: RegionInfo,
    pub epoch: u64,
    pub log_id: u64,
    pub pages: u64,
    /// Whether `epoch` is a program checkpoint.
    pub origin: EpochOrigin,
}

impl ImageHeader {
    /// Byte offset of page `page` in an image file.
    pub fn page_offset(page: u64) -> u64 {
        BLOCK_BYTES_U64 + page * PAGE_BYTES
    }

    pub fn encode(&self) -> Box<Block> {
        let mut b = Block::zeroed();
        b.0[0..8].copy_from_slice(&IMAGE_MAGIC);
        put_u32(&mut b.0, 8, FORMAT_VERSION);
        put_u32(
            &mut b.0,
            12,
            u32::try_from(PAGE_SIZE).expect("4096 fits u32"),
        );
        put_u64(&mut b.0, 16, self.region.base);
        put_u64(&mut b.0, 24, self.region.len);
        put_u64(&mut b.0, 32, self.epoch);
        put_u64(&mut b.0, 40, self.log_id);
        put_u64(&mut b.0, 48, self.pages);
        if self.origin.is_program() {
            put_u32(&mut b.0, 56, IMAGE_FLAG_PROGRAM);
        }
        b.seal();
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<ImageHeader, FormatError> {
        const R: Record = Record::ImageHeader;
        let b = whole_block(R, bytes)?;
        check_magic(R, b, IMAGE_MAGIC)?;
        check_version(R, b)?;
        check_crc(R, b)?;
        check_page_size(R, get_u32(b, 12))?;
        let header = ImageHeader {
            region: RegionInfo {
                base: get_u64(b, 16),
                len: get_u64(b, 24),
            },
            epoch: get_u64(b, 32),
            log_id: get_u64(b, 40),
            pages: get_u64(b, 48),
            origin: EpochOrigin::from_program_flag(get_u32(b, 56) & IMAGE_FLAG_PROGRAM != 0),
        };
        header.region.check(R)?;
        if header.epoch > EPOCH_MAX {
            return Err(bad_field(R, "epoch", header.epoch, "at most 2^62"));
        }
        if header.pages > header.region.pages() {
            return Err(bad_field(
                R,
                "page count",
                header.pages,
                "at most the region's pages",
            ));
        }
        let flags = get_u32(b, 56);
        if flags & !IMAGE_FLAGS_KNOWN != 0 {
            return Err(bad_field(R, "flags", flags.into(), "0 or 1 (program)"));
        }
        check_zero(R, b, 60..CRC_OFFSET)?;
        Ok(header)
    }

    /// Whether `bytes` start like an image file (the magic only: enough to tell an image that
    /// may be replaced from a file that must not be).
    pub fn has_magic(bytes: &[u8]) -> bool {
        bytes.get(..8) == Some(&IMAGE_MAGIC[..])
    }
}

/// Digits of the sequence number in a segment file name, at least.
const SEGMENT_NAME_DIGITS: usize = 6;

/// The file name of segment `seq`: `seg-000001.lego` (more digits past 999999).
pub fn segment_file_name(seq: u64) -> String {
    format!("seg-{seq:0SEGMENT_NAME_DIGITS$}.lego")
}

/// The sequence number in a segment file name, if `name` is exactly what
/// [`segment_file_name`] makes for some number.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".lego")?;
    if digits.len() < SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: u64 = digits.parse().ok()?;
    (seq > 0 && segment_file_name(seq) == name).then_some(seq)
}
