//! Size classes of small objects and the shape of the spans that hold them.
//!
//! Classes go in 16-byte steps up to 128 bytes, then four classes per power of two up to
//! [`SMALL_MAX_BYTES`]; every class size is a multiple of 16, so every small object is 16-byte
//! aligned, and every power of two from 16 up is a class, so an object of a class whose size
//! is a multiple of `align` (<= page size) is `align`-aligned within its page-aligned span.
//! The table is computed at compile time: it is code, never heap state, and a change to it
//! changes the heap image format (bump `HEAP_VERSION`).

use crate::PAGE_SIZE;

/// Number of small size classes.
pub(crate) const CLASS_COUNT: usize = 40;
/// Largest size served from a size class; larger requests are page runs.
pub(crate) const SMALL_MAX_BYTES: usize = 32 * 1024;
/// Most objects one span holds: the span descriptor keeps one liveness bit per object.
pub(crate) const SPAN_OBJECTS_MAX: usize = 256;
/// Longest span of a size class, in pages.
pub(crate) const SPAN_PAGES_MAX: usize = 32;
/// A span aims to hold this many objects, so that a thread does not go to the page heap on
/// every allocation of a big class...
const SPAN_TARGET_OBJECTS: usize = 8;
/// ...but a span is never made longer than this just to reach that target (small classes
/// then live in a single page, which keeps them dense: every touched page costs a fault).
const SPAN_TARGET_BYTES_MAX: usize = 64 * 1024;
/// Tail waste of a span (bytes not fitting a whole object) is at most 1/this of the span.
const SPAN_WASTE_DIVISOR: usize = 8;

/// Size in bytes of class `c`.
const fn class_size(c: usize) -> usize {
    if c < 8 {
        (c + 1) * 16
    } else {
        let lg = 7 + (c - 8) / 4;
        let sub = (c - 8) % 4;
        (1 << lg) + (sub + 1) * (1 << (lg - 2))
    }
}

/// Class of a request of `size` bytes (`size <= SMALL_MAX_BYTES`); `0` maps to the smallest
/// class so that `malloc(0)` gets a unique object.
#[inline]
pub(crate) const fn class_of(size: usize) -> usize {
    if size <= 128 {
        let s = if size == 0 { 1 } else { size };
        s.div_ceil(16) - 1
    } else {
        let m = size - 1;
        let lg = (usize::BITS - 1 - m.leading_zeros()) as usize;
        let sub = (m - (1 << lg)) >> (lg - 2);
        8 + (lg - 7) * 4 + sub
    }
}

/// Pages of a span of objects of `size` bytes; 0 if no span shape fits the rules (checked at
/// compile time below).
const fn span_pages(size: usize) -> usize {
    let target = if size * SPAN_TARGET_OBJECTS < SPAN_TARGET_BYTES_MAX {
        size * SPAN_TARGET_OBJECTS
    } else {
        SPAN_TARGET_BYTES_MAX
    };
    let mut pages = 1;
    while pages <= SPAN_PAGES_MAX {
        let bytes = pages * PAGE_SIZE;
        let objects = bytes / size;
        let waste = bytes - objects * size;
        if bytes >= target
            && objects >= 1
            && objects <= SPAN_OBJECTS_MAX
            && waste * SPAN_WASTE_DIVISOR <= bytes
        {
            return pages;
        }
        pages += 1;
    }
    0
}

/// Everything the allocator needs to know about one class.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClassInfo {
    /// Object size in bytes.
    pub size: u32,
    /// Pages per span.
    pub pages: u32,
    /// Objects per span.
    pub objects: u32,
    /// `ceil(2^64 / size)`: `offset / size == (offset * magic) >> 64` exactly for any 32-bit
    /// offset (Lemire's fastdiv), which keeps a division off the free path.
    pub div_magic: u64,
}

impl ClassInfo {
    /// Index of the object at byte `offset` of its span, if `offset` is an object start.
    #[inline]
    pub fn object_at(&self, offset: usize) -> Option<usize> {
        debug_assert!(offset < SPAN_PAGES_MAX * PAGE_SIZE);
        let idx = ((offset as u128 * self.div_magic as u128) >> 64) as usize;
        (idx * self.size as usize == offset).then_some(idx)
    }
}

const fn build_classes() -> [ClassInfo; CLASS_COUNT] {
    let mut table = [ClassInfo {
        size: 0,
        pages: 0,
        objects: 0,
        div_magic: 0,
    }; CLASS_COUNT];
    let mut c = 0;
    while c < CLASS_COUNT {
        let size = class_size(c);
        let pages = span_pages(size);
        assert!(pages >= 1, "a size class has no valid span shape");
        table[c] = ClassInfo {
            size: size as u32,
            pages: pages as u32,
            objects: (pages * PAGE_SIZE / size) as u32,
            div_magic: u64::MAX / size as u64 + 1,
        };
        c += 1;
    }
    table
}

/// The class table, indexed by class.
pub(crate) static CLASSES: [ClassInfo; CLASS_COUNT] = build_classes();

const _: () = assert!(class_size(CLASS_COUNT - 1) == SMALL_MAX_BYTES);
const _: () = assert!(class_of(SMALL_MAX_BYTES) == CLASS_COUNT - 1);
const _: () = assert!(SPAN_OBJECTS_MAX <= u16::MAX as usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_increasing_and_16_byte_granular() {
        for c in 0..CLASS_COUNT {
            let info = CLASSES[c];
            assert_eq!(info.size % 16, 0, "class {c}");
            if c > 0 {
                assert!(info.size > CLASSES[c - 1].size, "class {c}");
            }
            assert_eq!(
                class_of(info.size as usize),
                c,
                "class {c} size {}",
                info.size
            );
        }
    }

    #[test]
    fn class_of_is_tightest_fit() {
        assert_eq!(class_of(0), 0);
        for size in 1..=SMALL_MAX_BYTES {
            let c = class_of(size);
            assert!(CLASSES[c].size as usize >= size, "size {size}");
            if c > 0 {
                assert!((CLASSES[c - 1].size as usize) < size, "size {size}");
            }
        }
    }

    #[test]
    fn spans_are_dense_and_bounded() {
        for (c, info) in CLASSES.iter().enumerate() {
            let bytes = info.pages as usize * PAGE_SIZE;
            assert!(
                info.objects >= 1 && info.objects as usize <= SPAN_OBJECTS_MAX,
                "class {c}"
            );
            assert!(info.pages as usize <= SPAN_PAGES_MAX, "class {c}");
            let waste = bytes - info.objects as usize * info.size as usize;
            assert!(waste * SPAN_WASTE_DIVISOR <= bytes, "class {c}");
            if info.size <= 512 {
                assert_eq!(info.pages, 1, "class {c} should live in one page");
            }
        }
    }

    #[test]
    fn powers_of_two_are_classes() {
        let mut p = 16;
        while p <= SMALL_MAX_BYTES {
            assert_eq!(CLASSES[class_of(p)].size as usize, p);
            p *= 2;
        }
    }

    #[test]
    fn fastdiv_matches_division() {
        for info in CLASSES.iter() {
            let size = info.size as usize;
            for off in 0..info.pages as usize * PAGE_SIZE {
                let expect = (off % size == 0).then_some(off / size);
                assert_eq!(info.object_at(off), expect, "size {size} off {off}");
            }
        }
    }
}
