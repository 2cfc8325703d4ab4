//! A store of the latest items, oldest dropped first, bounded by count
//! and by bytes: the order timeline's events and the recent spans, whose
//! size is mostly text that clients and other services choose.

use std::collections::VecDeque;

/// Items oldest first, at most `keep` of them and at most `keep_bytes`
/// of their sizes (as given to [`Bounded::push`]).
#[derive(Debug)]
pub struct Bounded<T> {
    items: VecDeque<(T, usize)>,
    bytes: usize,
    keep: usize,
    keep_bytes: usize,
}

impl<T> Bounded<T> {
    pub const fn new(keep: usize, keep_bytes: usize) -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            keep: if keep == 0 { 1 } else { keep },
            keep_bytes,
        }
    }

    /// Adds `item`, about `size` bytes, and returns the oldest items that
    /// made room for it (for the caller to free outside its lock).
    pub fn push(&mut self, item: T, size: usize) -> Vec<T> {
        let mut gone = Vec::new();
        while self.items.len() >= self.keep
            || (!self.items.is_empty() && self.bytes + size > self.keep_bytes)
        {
            let Some((oldest, bytes)) = self.items.pop_front() else {
                break;
            };
            self.bytes -= bytes;
            gone.push(oldest);
        }
        self.items.push_back((item, size));
        self.bytes += size;
        gone
    }

    /// Oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> {
        self.items.iter().map(|(item, _)| item)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The kept items' sizes, summed.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::Bounded;

    #[test]
    fn the_oldest_go_first_by_count_or_by_bytes() {
        let mut b = Bounded::new(3, 100);
        for i in 0..5 {
            b.push(i, 10);
        }
        assert_eq!(b.iter().copied().collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(b.bytes(), 30);
        // 2 goes for the count, 3 for the bytes.
        assert_eq!(b.push(5, 85), [2, 3]);
        assert_eq!(b.iter().copied().collect::<Vec<_>>(), [4, 5]);
        assert_eq!(b.bytes(), 95);
        // One item bigger than the budget is kept alone.
        assert_eq!(b.push(6, 500), [4, 5]);
        assert_eq!((b.len(), b.bytes()), (1, 500));
    }
}
