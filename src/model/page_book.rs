//! The bookkeeping of a pool of KV pages, whatever holds their bytes (the
//! host's vectors, `host_pages`; the tensor path's tensors, `kv_pages`):
//! which pages are free, how many sequences hold each, and which hold a
//! cached prefix.
//!
//! Prefix caching: a page full of positions is keyed by the chain of its
//! tokens, hash(previous page's key, its own tokens), so two sequences whose
//! prompts agree on a whole page's worth of tokens from the start have the
//! same keys and values there. A full page a sequence has written is
//! registered under its key; a new sequence takes the longest run of
//! registered pages that its prompt's chain matches, holding them read-only.
//! A page nobody holds stays registered, idle, until a page is needed and no
//! free one is left: then the idle page used longest ago is taken back
//! (evicted). The tokens of a registered page are kept beside it and
//! compared on every match, so a hash collision can cost a miss, never a
//! wrong answer.
//!
//! Past its whole pages, a prompt usually goes on within a page some earlier
//! sequence wrote: the last, partial page of a finished sequence (kept,
//! idle, as a "tail"), or a full page where the two diverge mid-way (a chat's
//! next turn re-renders the last reply). The rows the two agree on are
//! copied into a page of the new sequence's own, so a chat's next turn
//! prefills only its new tokens, as a token-granular cache would.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Positions per page: few enough that a sequence wastes little of its last
/// page, many enough that the page lists stay short.
pub const PAGE_POSITIONS: usize = 64;

/// The key of a full page of `tokens` that follows the page keyed `previous`.
pub fn chain_key(previous: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    previous.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The keys of every full page of `tokens`, in order.
pub fn chain_keys(tokens: &[u32]) -> Vec<u64> {
    let mut previous = 0;
    tokens
        .chunks_exact(PAGE_POSITIONS)
        .map(|page| {
            previous = chain_key(previous, page);
            previous
        })
        .collect()
}

/// A page registered under its prefix: a full page under its own key, or a
/// finished sequence's partial tail page (fewer tokens, not in `by_key`).
struct Registered {
    key: u64,
    /// The key of the page before it (0 for a first page).
    previous: u64,
    tokens: Vec<u32>,
}

impl Registered {
    fn is_full(&self) -> bool {
        self.tokens.len() == PAGE_POSITIONS
    }
}

/// Counters and sizes of a prefix cache, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up, and of them those found cached (ever).
    pub queried_tokens: u64,
    pub hit_tokens: u64,
    /// Pages registered under a prefix (held or idle), and their bytes.
    pub cached_pages: u64,
    pub cached_bytes: u64,
    /// Idle cached pages taken back for new positions (ever).
    pub evictions: u64,
    /// Bytes of the whole pool, in use or not.
    pub pool_bytes: u64,
    /// Bytes of the pages some sequence holds.
    pub held_bytes: u64,
}

pub struct PageBook {
    /// Pages the storage holds.
    pages: usize,
    /// Pages the storage grows to at most by doubling (more only when one
    /// step needs more): the KV budget in pages, plus one a sequence.
    capacity: usize,
    /// Pages holding nothing, to take first.
    free: Vec<u32>,
    /// Per page: how many sequences hold it.
    holders: Vec<u32>,
    /// Per page: its prefix, when it is registered.
    registered: Vec<Option<Registered>>,
    /// Prefix key → its full page.
    by_key: HashMap<u64, u32>,
    /// The key of a prefix → the registered pages (full or tail) that follow it.
    by_previous: HashMap<u64, Vec<u32>>,
    /// Pages registered, full or tail (what `by_previous` lists).
    cached: usize,
    /// Registered pages nobody holds, by when they were last let go (oldest first).
    idle: BTreeMap<u64, u32>,
    /// Per page: its place in `idle`.
    idle_since: Vec<u64>,
    clock: u64,
    /// Idle pages taken back for new positions, ever.
    pub evictions: u64,
    /// Prompt tokens looked up in the cache, and of them those found (ever).
    queried_tokens: u64,
    hit_tokens: u64,
}

impl PageBook {
    pub fn new(pages: usize) -> PageBook {
        let mut book = PageBook {
            pages: 0,
            capacity: usize::MAX,
            free: Vec::new(),
            holders: Vec::new(),
            registered: Vec::new(),
            by_key: HashMap::new(),
            by_previous: HashMap::new(),
            cached: 0,
            idle: BTreeMap::new(),
            idle_since: Vec::new(),
            clock: 0,
            evictions: 0,
            queried_tokens: 0,
            hit_tokens: 0,
        };
        book.add_pages(pages);
        book
    }

    /// Grow by doubling up to `pages`; past it, only by what a step needs.
    pub fn set_capacity(&mut self, pages: usize) {
        self.capacity = pages;
    }

    /// How many pages the storage should hold before `take(count)`: below
    /// the capacity the pool grows by doubling rather than evict a cached
    /// prefix; at it, idle cached pages are taken back first, and it grows
    /// only by what is still missing.
    pub fn grow_target(&self, count: usize) -> usize {
        let pages = self.pages;
        let doubled = if self.free.len() < count && pages < self.capacity {
            (pages * 2).max(pages + count - self.free.len()).min(self.capacity)
        } else {
            pages
        };
        doubled.max(pages + self.shortfall(count))
    }

    /// The cache's counters and sizes, for pages of `page_bytes` bytes.
    pub fn stats(&self, page_bytes: u64) -> PrefixCacheStats {
        let held = self.pages - self.free.len() - self.idle.len();
        PrefixCacheStats {
            queried_tokens: self.queried_tokens,
            hit_tokens: self.hit_tokens,
            cached_pages: self.cached_count() as u64,
            cached_bytes: self.cached_count() as u64 * page_bytes,
            evictions: self.evictions,
            pool_bytes: self.pages as u64 * page_bytes,
            held_bytes: held as u64 * page_bytes,
        }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Pages neither held nor idle.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Pages held by no sequence but kept for their prefix.
    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }

    /// Pages registered under a prefix (held or idle, full or tail).
    pub fn cached_count(&self) -> usize {
        self.cached
    }

    /// How many sequences hold `page`.
    pub fn holders(&self, page: u32) -> u32 {
        self.holders[page as usize]
    }

    /// The storage grew to `pages` pages: the new ones are free.
    pub fn add_pages(&mut self, pages: usize) {
        if pages <= self.pages {
            return;
        }
        self.free.extend((self.pages as u32..pages as u32).rev());
        self.holders.resize(pages, 0);
        self.registered.resize_with(pages, || None);
        self.idle_since.resize(pages, 0);
        self.pages = pages;
    }

    /// How many of `count` new pages the storage must grow by before `take` can give them.
    pub fn shortfall(&self, count: usize) -> usize {
        count.saturating_sub(self.free.len() + self.idle.len())
    }

    /// `count` pages for one sequence to write, held by it: free ones first,
    /// then the idle ones used longest ago (forgetting their prefix). The
    /// caller grows the storage first by `shortfall(count)`.
    pub fn take(&mut self, count: usize) -> Vec<u32> {
        assert!(self.shortfall(count) == 0, "the storage must grow first");
        let from_free = count.min(self.free.len());
        let mut taken = self.free.split_off(self.free.len() - from_free);
        while taken.len() < count {
            let (_, page) = self.idle.pop_first().expect("counted in shortfall");
            self.forget(page);
            self.evictions += 1;
            taken.push(page);
        }
        // Ascending, so that a chunk's pages are often one run.
        taken.sort_unstable();
        for &page in &taken {
            self.holders[page as usize] = 1;
        }
        taken
    }

    fn forget(&mut self, page: u32) {
        if let Some(r) = self.registered[page as usize].take() {
            self.cached -= 1;
            if r.is_full() {
                self.by_key.remove(&r.key);
            }
            if let Some(pages) = self.by_previous.get_mut(&r.previous) {
                pages.retain(|&p| p != page);
                if pages.is_empty() {
                    self.by_previous.remove(&r.previous);
                }
            }
        }
    }

    /// A sequence lets go of its pages: each held by nobody after it is free,
    /// or idle if it holds a prefix.
    pub fn release(&mut self, pages: &[u32]) {
        for &page in pages {
            let holders = &mut self.holders[page as usize];
            *holders -= 1;
            if *holders == 0 {
                if self.registered[page as usize].is_some() {
                    self.clock += 1;
                    self.idle.insert(self.clock, page);
                    self.idle_since[page as usize] = self.clock;
                } else {
                    self.free.push(page);
                }
            }
        }
    }

    /// The registered pages of the longest prefix of `pages` (each a page's
    /// worth of tokens, keyed by `keys`), now held by the caller too.
    pub fn hold_prefix(&mut self, keys: &[u64], pages: &[&[u32]]) -> Vec<u32> {
        let mut held = Vec::new();
        for (key, tokens) in keys.iter().zip(pages) {
            let Some(&page) = self.by_key.get(key) else { break };
            let same = self.registered[page as usize].as_ref().is_some_and(|r| r.tokens == *tokens);
            if !same {
                break;
            }
            self.hold(page);
            held.push(page);
        }
        held
    }

    /// One more holder of `page` (out of the idle ones if it was idle).
    pub fn hold(&mut self, page: u32) {
        if self.holders[page as usize] == 0 {
            self.idle.remove(&self.idle_since[page as usize]);
        }
        self.holders[page as usize] += 1;
    }

    /// Of the registered pages that follow the prefix keyed `previous`, the
    /// one whose tokens agree longest with the start of `next`, and for how
    /// many tokens (at least one).
    pub fn best_continuation(&self, previous: u64, next: &[u32]) -> Option<(u32, usize)> {
        let candidates = self.by_previous.get(&previous)?;
        candidates
            .iter()
            .map(|&page| {
                let tokens = &self.registered[page as usize].as_ref().expect("listed pages are registered").tokens;
                (page, tokens.iter().zip(next).take_while(|(a, b)| a == b).count())
            })
            .filter(|&(_, agree)| agree > 0)
            .max_by_key(|&(page, agree)| (agree, std::cmp::Reverse(page)))
    }

    /// `page`, now full of `tokens` after the prefix keyed `previous`, is
    /// registered under its key (unless another page already is).
    pub fn register(&mut self, page: u32, previous: u64, key: u64, tokens: &[u32]) {
        if self.by_key.contains_key(&key) || self.registered[page as usize].is_some() {
            return;
        }
        self.by_key.insert(key, page);
        self.enlist(page, Registered { key, previous, tokens: tokens.to_vec() });
    }

    /// A finished sequence's last page, partly written with `tokens` after
    /// the prefix keyed `previous`, is kept for a prompt that goes on the
    /// same way (call before `release`; only for a page the caller alone holds).
    pub fn keep_tail(&mut self, page: u32, previous: u64, tokens: &[u32]) {
        if tokens.is_empty() || self.registered[page as usize].is_some() || self.holders[page as usize] != 1 {
            return;
        }
        // A page that already holds these tokens (or more of them) serves as well.
        if self.best_continuation(previous, tokens).is_some_and(|(_, agree)| agree == tokens.len()) {
            return;
        }
        let key = chain_key(previous, tokens);
        self.enlist(page, Registered { key, previous, tokens: tokens.to_vec() });
    }

    fn enlist(&mut self, page: u32, registered: Registered) {
        self.by_previous.entry(registered.previous).or_default().push(page);
        self.registered[page as usize] = Some(registered);
        self.cached += 1;
    }
}

/// What one sequence needs to match its prompt against the cache and to
/// register the full pages it fills: the key of its last full page and the
/// tokens of the page it is filling.
#[derive(Default)]
pub struct SeqPrefix {
    /// The keys of the sequence's first pages, full and registered or
    /// matched, in order (the last one is the chain the next page extends).
    keys: Vec<u64>,
    /// The tokens of the positions after the registered pages.
    partial: Vec<u32>,
}

/// What a new sequence takes from the cache: whole pages it holds, and the
/// rows of one more page it copies into a page of its own.
pub struct CacheHit {
    /// Registered pages of the prompt's prefix, now held by the sequence.
    pub held: Vec<u32>,
    /// (page, rows): copy the first `rows` positions of `page` (held until
    /// the copy is made: release it then) into the sequence's next page.
    pub copy: Option<(u32, usize)>,
}

impl CacheHit {
    /// Positions the hit covers.
    pub fn positions(&self) -> usize {
        self.held.len() * PAGE_POSITIONS + self.copy.map_or(0, |(_, rows)| rows)
    }
}

impl SeqPrefix {
    /// A sequence about to prefill `prompt` holds the registered pages of
    /// the longest prefix `book` has of it, and copies the rows of the page
    /// that agrees longest with what follows, leaving at least the prompt's
    /// last token to compute (for its logits).
    pub fn hold_longest(book: &mut PageBook, prompt: &[u32]) -> (SeqPrefix, CacheHit) {
        book.queried_tokens += prompt.len() as u64;
        let usable = prompt.len().saturating_sub(1);
        let matchable = &prompt[..usable / PAGE_POSITIONS * PAGE_POSITIONS];
        let keys = chain_keys(matchable);
        let pages: Vec<&[u32]> = matchable.chunks_exact(PAGE_POSITIONS).collect();
        let held = book.hold_prefix(&keys, &pages);
        let chain = held.len().checked_sub(1).map_or(0, |last| keys[last]);
        let covered = held.len() * PAGE_POSITIONS;
        let next = &prompt[covered..usable.max(covered)];
        let copy = book.best_continuation(chain, &next[..next.len().min(PAGE_POSITIONS)]);
        if let Some((page, _)) = copy {
            book.hold(page);
        }
        let partial = copy.map_or(Vec::new(), |(_, rows)| next[..rows].to_vec());
        let hit = CacheHit { held, copy };
        book.hit_tokens += hit.positions() as u64;
        (SeqPrefix { keys: keys[..hit.held.len()].to_vec(), partial }, hit)
    }

    /// The key of the last registered page (0 before the first).
    fn chain(&self) -> u64 {
        self.keys.last().copied().unwrap_or(0)
    }

    /// The hit's copied rows could not be copied: they are computed instead.
    pub fn forget_copy(&mut self) {
        self.partial.clear();
    }

    /// The sequence, whose pages are `pages` in position order, wrote
    /// `tokens` at its next positions: each page they filled is registered
    /// under its prefix.
    pub fn filled(&mut self, book: &mut PageBook, pages: &[u32], tokens: &[u32]) {
        for &t in tokens {
            self.partial.push(t);
            if self.partial.len() == PAGE_POSITIONS {
                let (previous, key) = (self.chain(), chain_key(self.chain(), &self.partial));
                book.register(pages[self.keys.len()], previous, key, &self.partial);
                self.keys.push(key);
                self.partial.clear();
            }
        }
    }

    /// The sequence is cut back to its first `kept.len()` positions, whose
    /// tokens `kept` are (a probe rolled back): the pages past them are let
    /// go, and the page the next position falls in, if it is registered or
    /// shared, must not be written again. Returns that page's index in
    /// `pages`: the caller copies its first `kept.len() % PAGE_POSITIONS`
    /// rows into a page of its own (copy on write) before the next step.
    /// With `track` (the pool's prefix cache is on), the registered pages
    /// past the cut are forgotten by this sequence, not by the cache: their
    /// keys and values are right for the tokens they were registered under.
    pub fn truncate(&mut self, book: &mut PageBook, pages: &mut Vec<u32>, kept: &[u32], track: bool) -> Option<usize> {
        let len = kept.len();
        let whole = len / PAGE_POSITIONS;
        if pages.len() > len.div_ceil(PAGE_POSITIONS) {
            book.release(&pages[len.div_ceil(PAGE_POSITIONS)..]);
            pages.truncate(len.div_ceil(PAGE_POSITIONS));
        }
        if track {
            if self.keys.len() > whole {
                self.keys.truncate(whole);
                self.partial = kept[whole * PAGE_POSITIONS..].to_vec();
            } else {
                self.partial.truncate(len - self.keys.len() * PAGE_POSITIONS);
            }
        }
        let open = pages.get(whole).filter(|_| !len.is_multiple_of(PAGE_POSITIONS))?;
        (book.registered[*open as usize].is_some() || book.holders(*open) > 1).then_some(whole)
    }

    /// The sequence is done with `pages`: its partly written last page is
    /// kept as a tail (`PageBook::keep_tail`), then every page is let go.
    /// (Without a prefix cache nothing was recorded, so it only lets go.)
    pub fn release(&self, book: &mut PageBook, pages: &[u32]) {
        if let Some(&tail) = pages.get(self.keys.len()) {
            book.keep_tail(tail, self.chain(), &self.partial);
        }
        book.release(pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(t: u32) -> Vec<u32> {
        vec![t; PAGE_POSITIONS]
    }

    #[test]
    fn a_registered_prefix_is_shared_then_idle_then_evicted_oldest_first() {
        let mut book = PageBook::new(4);
        let (a, b) = (page_of(1), page_of(2));
        let keys = chain_keys(&[a.clone(), b.clone()].concat());
        let first = book.take(2);
        book.register(first[0], 0, keys[0], &a);
        book.register(first[1], keys[0], keys[1], &b);
        // A second sequence with the same two pages holds the very same ones.
        let shared = book.hold_prefix(&keys, &[&a, &b]);
        assert_eq!(shared, first);
        assert_eq!(book.holders(first[0]), 2);
        // A third whose second page differs shares only the first.
        let other = chain_keys(&[a.clone(), page_of(3)].concat());
        assert_eq!(book.hold_prefix(&other, &[&a, &page_of(3)]), vec![first[0]]);
        // Everyone lets go: both pages stay cached, idle.
        book.release(&first);
        book.release(&shared);
        book.release(&[first[0]]);
        assert_eq!((book.idle_count(), book.cached_count(), book.free_count()), (2, 2, 2));
        // Taking three pages uses the two free ones, then evicts the oldest idle one.
        let taken = book.take(3);
        assert_eq!(taken.len(), 3);
        assert_eq!((book.evictions, book.cached_count()), (1, 1));
        // What is still cached is matched again; what was evicted is not.
        assert_eq!(book.hold_prefix(&keys, &[&a, &b]).len(), usize::from(book.by_key.contains_key(&keys[0])));
    }

    #[test]
    fn a_tail_is_kept_once_matched_token_by_token_and_evicted_like_any_page() {
        let mut book = PageBook::new(3);
        let (full, rest) = (page_of(1), vec![5, 6, 7, 8]);
        let key = chain_keys(&full)[0];
        let pages = book.take(2);
        let mut prefix = SeqPrefix::default();
        prefix.filled(&mut book, &pages, &[full.clone(), rest.clone()].concat());
        prefix.release(&mut book, &pages);
        assert_eq!((book.cached_count(), book.idle_count()), (2, 2), "the full page and the tail");
        // The tail is found after its full page, for as many tokens as agree.
        assert_eq!(book.best_continuation(key, &[5, 6, 9]), Some((pages[1], 2)));
        assert_eq!(book.best_continuation(key, &[4]), None);
        assert_eq!(book.best_continuation(0, &[1, 1, 2]), Some((pages[0], 2)), "a full page agrees in part too");
        // A second sequence that wrote no more than the tail holds adds no page.
        let again = book.take(1);
        book.keep_tail(again[0], key, &rest[..3]);
        book.release(&again);
        assert_eq!(book.cached_count(), 2);
        // Taking every page evicts the tail like any idle page, and forgets it.
        book.take(3);
        assert_eq!((book.cached_count(), book.best_continuation(key, &rest)), (0, None));
    }

    #[test]
    fn a_colliding_key_with_other_tokens_is_a_miss() {
        let mut book = PageBook::new(2);
        let page = book.take(1)[0];
        book.register(page, 0, 42, &page_of(1));
        assert!(book.hold_prefix(&[42], &[&page_of(2)]).is_empty());
        assert_eq!(book.hold_prefix(&[42], &[&page_of(1)]), vec![page]);
    }

    #[test]
    fn shortfall_counts_free_and_idle_pages() {
        let mut book = PageBook::new(2);
        assert_eq!(book.shortfall(3), 1);
        let pages = book.take(2);
        book.register(pages[0], 0, 7, &page_of(0));
        book.release(&pages);
        assert_eq!((book.free_count(), book.idle_count(), book.shortfall(2)), (1, 1, 0));
        book.add_pages(4);
        assert_eq!(book.shortfall(4), 0);
    }
}
