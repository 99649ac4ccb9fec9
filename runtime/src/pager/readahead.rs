//! Read-ahead for evicted pages: how many pages one fault fetches.
//!
//! A small table of access streams, in the spirit of Leap's trend detection but for the
//! pattern that matters most here (sequential sweeps, one per thread): a fault that lands
//! where a stream expects its next fault (at or near the end of what the stream last fetched)
//! doubles that stream's window, up to [`WINDOW_PAGES_MAX`]; any other fault starts a new
//! stream (replacing the least recently used one) with a window of one page. So random access
//! fetches one page per fault and wastes neither I/O nor cache room, while a sweep quickly
//! fetches large runs with one fault and one read each.

/// Largest read-ahead window in pages (fetched in chunks, see `fault::fetch_in_chunks`).
pub(crate) const WINDOW_PAGES_MAX: usize = super::FETCH_RUN_PAGES_MAX;
/// Streams followed at once (a few per CPU: each thread of a sweep is one).
const STREAMS: usize = 16;

#[derive(Clone, Copy, Default)]
struct Stream {
    /// The page the stream's next fault is expected at.
    next: usize,
    /// Pages the stream fetches on its next hit.
    window: usize,
    /// Logical time of the last hit (for replacement).
    used: u64,
}

/// The stream table. Not thread-safe by itself: the pager keeps it under the cache lock.
pub(crate) struct Readahead {
    streams: [Stream; STREAMS],
    clock: u64,
}

impl Readahead {
    pub(crate) fn new() -> Readahead {
        Readahead {
            streams: [Stream::default(); STREAMS],
            clock: 0,
        }
    }

    /// The number of pages (at least 1, at most [`WINDOW_PAGES_MAX`]) to fetch for a fault at
    /// `page`, and the stream it belongs to; call [`Readahead::fetched`] with the pages really
    /// claimed.
    pub(crate) fn window(&mut self, page: usize) -> (usize, usize) {
        self.clock += 1;
        for (i, s) in self.streams.iter_mut().enumerate() {
            // A hit: at the expected page, or inside the last window's span (another thread of
            // the same sweep, or a fault that raced the fetch).
            if s.window > 0 && page + s.window >= s.next && page <= s.next + s.window {
                s.window = (s.window * 2).min(WINDOW_PAGES_MAX);
                s.used = self.clock;
                return (s.window, i);
            }
        }
        let lru = (0..STREAMS)
            .min_by_key(|&i| self.streams[i].used)
            .expect("the table has streams");
        self.streams[lru] = Stream {
            next: page + 1,
            window: 1,
            used: self.clock,
        };
        (1, lru)
    }

    /// Records that stream `stream` fetched `n` pages starting at `page`.
    pub(crate) fn fetched(&mut self, stream: usize, page: usize, n: usize) {
        let s = &mut self.streams[stream];
        s.next = s.next.max(page + n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_ramps_up_to_the_maximum() {
        let mut ra = Readahead::new();
        let mut page = 1000;
        let mut windows = Vec::new();
        for _ in 0..14 {
            let (w, s) = ra.window(page);
            windows.push(w);
            ra.fetched(s, page, w);
            page += w;
        }
        assert_eq!(windows[..8], [1, 2, 4, 8, 16, 32, 64, 128]);
        assert_eq!(windows[13], WINDOW_PAGES_MAX);
        assert!(windows
            .windows(2)
            .all(|w| w[1] == (w[0] * 2).min(WINDOW_PAGES_MAX)));
    }

    #[test]
    fn random_faults_fetch_one_page() {
        let mut ra = Readahead::new();
        let mut x: u64 = 12345;
        let mut big = 0;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let page = (x >> 20) as usize % 10_000_000;
            let (w, s) = ra.window(page);
            ra.fetched(s, page, w);
            if w > 1 {
                big += 1;
            }
        }
        assert!(big < 10, "{big} random faults got a read-ahead window");
    }

    #[test]
    fn interleaved_sweeps_each_keep_their_stream() {
        let mut ra = Readahead::new();
        let mut pages = [0usize, 1_000_000, 2_000_000];
        let mut last = [0usize; 3];
        for _ in 0..10 {
            for (k, page) in pages.iter_mut().enumerate() {
                let (w, s) = ra.window(*page);
                ra.fetched(s, *page, w);
                last[k] = w;
                *page += w;
            }
        }
        assert_eq!(last, [WINDOW_PAGES_MAX; 3]);
    }
}
