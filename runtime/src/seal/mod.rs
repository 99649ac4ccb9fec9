//! Sealing pages that leave the machine (`LEGO_KEY_FILE`): every value lego sends to a pool
//! server is encrypted and authenticated with AES-256-GCM ([`Sealer`]), so that a server, or
//! anyone on the network between, can neither read a page nor hand back a forged, swapped or
//! stale one without it being detected.
//!
//! Rules:
//! - The key file holds exactly [`KEY_BYTES`] random bytes and is checked before anything
//!   is sealed (`key.rs`): a regular file of that length, owned by the user, readable by
//!   nobody else. The key never appears in a message, the stats or a log line (`SealKey`'s
//!   `Debug` prints no byte of it) and its bytes are zeroed when it is dropped.
//! - Each heap seals under a key of its own, derived from the file's key and the heap id
//!   with HKDF-SHA256, so that two heaps never share a (key, nonce) pair.
//! - The nonce is unique per seal: a random 32-bit incarnation per [`Sealer`] (a heap
//!   restored under the same id gets a new one) followed by a 64-bit counter. A counter that
//!   would wrap stops sealing ([`SealError::NoncesUsed`]) rather than reuse a nonce.
//! - The associated data binds a value to its heap, its page (or shard), its version and the
//!   CRC32C of its plaintext: a value of another page, of another heap, of an older version or
//!   of other content under a repeated version does not open. So an opened value is the very
//!   content its reader expects, and needs no checksum pass of its own (a reader knows the
//!   checksum it expects; the associated data is never sent). A parity
//!   value of an erasure-coded stripe ([`SealedParityAs`]) is bound to its heap, stripe, slot,
//!   code shape and the versions and checksums of the data values it was computed from; its
//!   associated data is longer than any page's, so neither kind opens as the other.
//! - A value that does not open is a lost copy, never an error of the program: the caller
//!   treats it like any other bad copy (another copy, the log, else `SIGBUS`).
//! - The plaintext's checksum never leaves the machine (it would let a server confirm a guess
//!   of a page's content); the tag is the value's check.
//!
//! Layout of a sealed value ([`SEALED_OVERHEAD_BYTES`] around the data):
//! `nonce (12) | ciphertext (data.len()) | tag (16)`.

use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use thiserror::Error;

mod key;

#[cfg(test)]
mod tests;

pub use key::{KeyError, SealKey, KEY_BYTES};

/// Bytes of a nonce at the head of a sealed value.
pub const NONCE_BYTES: usize = NONCE_LEN;
/// Bytes of the authentication tag at the end of a sealed value.
pub const TAG_BYTES: usize = 16;
/// Bytes a sealed value has beyond its data.
pub const SEALED_OVERHEAD_BYTES: usize = NONCE_BYTES + TAG_BYTES;

/// HKDF's context for the per-heap key; a new layout of sealed values gets a new one.
const HEAP_KEY_INFO: &[u8] = b"lego sealed page v2";

const _: () = assert!(NONCE_BYTES == 4 + 8, "incarnation (u32) + counter (u64)");

/// Why a value could not be sealed or opened.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealError {
    #[error(
        "the sealed value is {len} bytes long; a sealed value of {data} bytes of data is {want}"
    )]
    Length {
        len: usize,
        data: usize,
        want: usize,
    },
    #[error(
        "the value does not open with this key for this heap, page and version (changed, \
         swapped, stale or sealed under another key)"
    )]
    Forged,
    #[error("this heap has sealed 2^64 values under one incarnation; no nonce is left")]
    NoncesUsed,
}

/// What a value is bound to: the associated data of its seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedAs {
    /// The page's number in the heap.
    pub page: u64,
    /// The value's version (the store's version of the page).
    pub version: u32,
    /// The CRC32C of the value's plaintext (what the pager knows of the page's content).
    pub crc: u32,
    /// Which part of the page the value is (0 for a whole page; a shard's index).
    pub part: u8,
}

impl SealedAs {
    fn encode(&self, heap_id: u64) -> [u8; PAGE_AAD_BYTES] {
        let mut a = [0u8; PAGE_AAD_BYTES];
        a[0..8].copy_from_slice(&heap_id.to_le_bytes());
        a[8..16].copy_from_slice(&self.page.to_le_bytes());
        a[16..20].copy_from_slice(&self.version.to_le_bytes());
        a[20..24].copy_from_slice(&self.crc.to_le_bytes());
        a[24] = self.part;
        a
    }
}

/// Bytes of a page's associated data ([`SealedAs`]).
const PAGE_AAD_BYTES: usize = 25;
/// Marks a parity value's associated data (after the heap id).
const PARITY_AAD_TAG: &[u8; 8] = b"parity\0\0";
/// Bytes of a parity value's associated data before its cover.
const PARITY_AAD_HEAD_BYTES: usize = 8 + PARITY_AAD_TAG.len() + 8 + 4;
/// Bytes of one cover entry: a version and a CRC32C (u32 LE each).
pub const PARITY_COVER_ENTRY_BYTES: usize = 8;
/// Data values a parity value may cover, at most (the largest code, rs:16+M).
pub const PARITY_COVER_ENTRIES_MAX: usize = 16;
const PARITY_AAD_BYTES_MAX: usize =
    PARITY_AAD_HEAD_BYTES + PARITY_COVER_ENTRY_BYTES * PARITY_COVER_ENTRIES_MAX;

// GCM authenticates the associated data's length: a parity value's, always longer than a
// page's, never opens as a page's value (nor the other way round).
const _: () = assert!(PARITY_AAD_HEAD_BYTES > PAGE_AAD_BYTES);

/// What a parity value of an erasure-coded stripe is bound to: the associated data of its
/// seal. A parity value computed from other data values (an old one) does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedParityAs<'a> {
    /// The stripe's number.
    pub stripe: u64,
    /// Which of the stripe's M parity values it is.
    pub slot: u8,
    /// K and M of the code.
    pub data: u8,
    pub parity: u8,
    /// The data values it was computed from: K entries of [`PARITY_COVER_ENTRY_BYTES`]
    /// (version u32 LE, CRC32C u32 LE), in stripe order.
    pub cover: &'a [u8],
}

impl SealedParityAs<'_> {
    /// The associated data, in `buf`; its length.
    fn encode(&self, heap_id: u64, buf: &mut [u8; PARITY_AAD_BYTES_MAX]) -> usize {
        assert_eq!(
            self.cover.len(),
            PARITY_COVER_ENTRY_BYTES * usize::from(self.data),
            "one cover entry per data value"
        );
        assert!(usize::from(self.data) <= PARITY_COVER_ENTRIES_MAX);
        buf[0..8].copy_from_slice(&heap_id.to_le_bytes());
        buf[8..16].copy_from_slice(PARITY_AAD_TAG);
        buf[16..24].copy_from_slice(&self.stripe.to_le_bytes());
        buf[24..28].copy_from_slice(&[self.data, self.parity, self.slot, 0]);
        let end = PARITY_AAD_HEAD_BYTES + self.cover.len();
        buf[PARITY_AAD_HEAD_BYTES..end].copy_from_slice(self.cover);
        end
    }
}

/// Seals and opens one heap's values.
pub struct Sealer {
    key: LessSafeKey,
    heap_id: u64,
    incarnation: u32,
    counter: AtomicU64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("heap_id", &format_args!("{:016x}", self.heap_id))
            .finish_non_exhaustive()
    }
}

/// HKDF's output length for an AES-256-GCM key.
struct AeadKeyLen;

impl hkdf::KeyType for AeadKeyLen {
    fn len(&self) -> usize {
        AES_256_GCM.key_len()
    }
}

impl Sealer {
    /// A sealer for heap `heap_id` under `key`, with a random incarnation.
    pub fn new(key: &SealKey, heap_id: u64) -> Sealer {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &heap_id.to_le_bytes());
        let prk = salt.extract(key.bytes());
        let info = [HEAP_KEY_INFO];
        let okm = prk
            .expand(&info, AeadKeyLen)
            .expect("32 bytes is within HKDF-SHA256's output limit");
        let mut heap_key = [0u8; KEY_BYTES];
        okm.fill(&mut heap_key)
            .expect("the buffer is the length asked for");
        let unbound = UnboundKey::new(&AES_256_GCM, &heap_key).expect("a 32-byte AES-256 key");
        heap_key.fill(0);
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        Sealer {
            key: LessSafeKey::new(unbound),
            heap_id,
            incarnation: key::random_u32(),
            counter: AtomicU64::new(0),
        }
    }

    /// The heap this sealer is for.
    pub fn heap_id(&self) -> u64 {
        self.heap_id
    }

    /// Appends the sealed value of `data`, bound to `what`, to `out`. Allocates nothing when
    /// `out` has room for `data.len() + SEALED_OVERHEAD_BYTES` more bytes.
    pub fn seal_into(
        &self,
        what: SealedAs,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        self.seal_with(&what.encode(self.heap_id), data, out)
    }

    /// Opens `value` (sealed by [`Sealer::seal_into`] for `what`) into `dst`, which must be
    /// as long as the sealed data. On any failure `dst` holds no plaintext (it is zeroed).
    pub fn open_into(&self, what: SealedAs, value: &[u8], dst: &mut [u8]) -> Result<(), SealError> {
        self.open_with(&what.encode(self.heap_id), value, dst)
    }

    /// [`Sealer::seal_into`] for a parity value.
    pub fn seal_parity_into(
        &self,
        what: &SealedParityAs<'_>,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let mut aad = [0u8; PARITY_AAD_BYTES_MAX];
        let len = what.encode(self.heap_id, &mut aad);
        self.seal_with(&aad[..len], data, out)
    }

    /// [`Sealer::open_into`] for a parity value.
    pub fn open_parity_into(
        &self,
        what: &SealedParityAs<'_>,
        value: &[u8],
        dst: &mut [u8],
    ) -> Result<(), SealError> {
        let mut aad = [0u8; PARITY_AAD_BYTES_MAX];
        let len = what.encode(self.heap_id, &mut aad);
        self.open_with(&aad[..len], value, dst)
    }

    fn seal_with(&self, aad: &[u8], data: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        if n == u64::MAX {
            self.counter.store(u64::MAX, Ordering::Relaxed);
            return Err(SealError::NoncesUsed);
        }
        let mut nonce = [0u8; NONCE_BYTES];
        nonce[0..4].copy_from_slice(&self.incarnation.to_le_bytes());
        nonce[4..12].copy_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(data);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[start..],
            )
            .expect("AES-GCM seals any length below 64 GiB");
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    fn open_with(&self, aad: &[u8], value: &[u8], dst: &mut [u8]) -> Result<(), SealError> {
        let want = dst.len() + SEALED_OVERHEAD_BYTES;
        if value.len() != want {
            return Err(SealError::Length {
                len: value.len(),
                data: dst.len(),
                want,
            });
        }
        let (nonce, rest) = value.split_at(NONCE_BYTES);
        let (ciphertext, tag) = rest.split_at(dst.len());
        dst.copy_from_slice(ciphertext);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().expect("split at NONCE_BYTES");
        let tag: [u8; TAG_BYTES] = tag.try_into().expect("the rest is TAG_BYTES");
        let opened = self.key.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            Tag::from(tag),
            dst,
            0..,
        );
        if opened.is_err() {
            // ring leaves the buffer unspecified on failure: never let it be read.
            dst.fill(0);
            return Err(SealError::Forged);
        }
        Ok(())
    }
}
