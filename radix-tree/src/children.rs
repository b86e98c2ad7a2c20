//! A node's children keyed by the edge key of their first page: a sorted
//! vector while few (compact, cache friendly), a hash map once many (a root
//! with thousands of prompts must not pay a vector shift per insert).

use crate::hash::PassThroughBuild;
use std::collections::HashMap;

/// Above this many children the map form is used.
const LARGE: usize = 32;

#[derive(Debug, Default)]
pub(crate) enum Children {
    #[default]
    None,
    Small(Vec<(u64, u32)>),
    Large(Box<LargeChildren>),
}

#[derive(Debug, Default)]
pub(crate) struct LargeChildren {
    map: HashMap<u64, u32, PassThroughBuild>,
    /// Children whose key equals another's (different first pages whose
    /// edge keys collide): rare, scanned linearly.
    collided: Vec<(u64, u32)>,
}

impl Children {
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Children::None => 0,
            Children::Small(v) => v.len(),
            Children::Large(l) => l.map.len() + l.collided.len(),
        }
    }

    /// Children whose edge key is `key` (usually at most one).
    pub(crate) fn with_key(&self, key: u64) -> impl Iterator<Item = u32> + '_ {
        type Entries<'a> = &'a [(u64, u32)];
        let (small, first, collided): (Entries<'_>, Option<u32>, Entries<'_>) = match self {
            Children::None => (&[], None, &[]),
            Children::Small(v) => {
                let start = v.partition_point(|(k, _)| *k < key);
                let end = start + v[start..].iter().take_while(|(k, _)| *k == key).count();
                (&v[start..end], None, &[])
            }
            Children::Large(l) => (&[], l.map.get(&key).copied(), &l.collided),
        };
        small.iter().map(|&(_, c)| c).chain(first).chain(
            collided
                .iter()
                .filter(move |(k, _)| *k == key)
                .map(|&(_, c)| c),
        )
    }

    pub(crate) fn insert(&mut self, key: u64, child: u32) {
        match self {
            Children::None => {
                // Room for two: a node's first child usually comes from a
                // split, and its second from the insert that split it.
                let mut v = Vec::with_capacity(2);
                v.push((key, child));
                *self = Children::Small(v);
            }
            Children::Small(v) => {
                let at = v.partition_point(|(k, _)| *k <= key);
                v.insert(at, (key, child));
                if v.len() > LARGE {
                    let mut large = LargeChildren::default();
                    for &(k, c) in v.iter() {
                        large.insert(k, c);
                    }
                    *self = Children::Large(Box::new(large));
                }
            }
            Children::Large(l) => l.insert(key, child),
        }
    }

    pub(crate) fn remove(&mut self, key: u64, child: u32) {
        match self {
            Children::None => {}
            Children::Small(v) => {
                if let Some(i) = v.iter().position(|&(k, c)| k == key && c == child) {
                    v.remove(i);
                }
                if v.is_empty() {
                    *self = Children::None;
                }
            }
            Children::Large(l) => {
                if l.map.get(&key) == Some(&child) {
                    l.map.remove(&key);
                    // Promote a collided child with the same key, if any.
                    if let Some(i) = l.collided.iter().position(|(k, _)| *k == key) {
                        let (_, c) = l.collided.swap_remove(i);
                        l.map.insert(key, c);
                    }
                } else if let Some(i) = l.collided.iter().position(|&(k, c)| k == key && c == child)
                {
                    l.collided.swap_remove(i);
                }
            }
        }
    }

    /// The child `old` (with edge key `key`) is now `new`.
    pub(crate) fn replace(&mut self, key: u64, old: u32, new: u32) {
        match self {
            Children::None => {}
            Children::Small(v) => {
                for slot in v.iter_mut().filter(|(k, c)| *k == key && *c == old) {
                    slot.1 = new;
                }
            }
            Children::Large(l) => {
                if let Some(c) = l.map.get_mut(&key).filter(|c| **c == old) {
                    *c = new;
                }
                for slot in l
                    .collided
                    .iter_mut()
                    .filter(|(k, c)| *k == key && *c == old)
                {
                    slot.1 = new;
                }
            }
        }
    }

    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = (u64, u32)> + '_> {
        match self {
            Children::None => Box::new(std::iter::empty()),
            Children::Small(v) => Box::new(v.iter().copied()),
            Children::Large(l) => Box::new(
                l.map
                    .iter()
                    .map(|(&k, &c)| (k, c))
                    .chain(l.collided.iter().copied()),
            ),
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Children::None => 0,
            Children::Small(v) => v.capacity() * std::mem::size_of::<(u64, u32)>(),
            Children::Large(l) => {
                std::mem::size_of::<LargeChildren>()
                    + l.map.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
                    + l.collided.capacity() * std::mem::size_of::<(u64, u32)>()
            }
        }
    }
}

impl LargeChildren {
    fn insert(&mut self, key: u64, child: u32) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.map.entry(key) {
            e.insert(child);
        } else {
            self.collided.push((key, child));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_forms_agree() {
        let mut c = Children::default();
        for i in 0..100u32 {
            c.insert(u64::from(i % 70), i);
            assert_eq!(c.len(), i as usize + 1);
        }
        assert!(matches!(c, Children::Large(_)));
        // Keys 0..30 have two children each (i and i + 70).
        let mut two: Vec<u32> = c.with_key(5).collect();
        two.sort_unstable();
        assert_eq!(two, vec![5, 75]);
        assert_eq!(c.with_key(69).collect::<Vec<_>>(), vec![69]);
        c.remove(5, 5);
        assert_eq!(c.with_key(5).collect::<Vec<_>>(), vec![75]);
        c.replace(75 % 70, 75, 175);
        assert_eq!(c.with_key(5).collect::<Vec<_>>(), vec![175]);
        assert_eq!(c.iter().count(), 99);
        let mut s = Children::default();
        s.insert(3, 1);
        s.insert(1, 2);
        s.insert(3, 4);
        assert_eq!(s.iter().map(|(k, _)| k).collect::<Vec<_>>(), vec![1, 3, 3]);
        s.remove(3, 1);
        s.remove(1, 2);
        s.remove(3, 4);
        assert!(s.is_empty() && matches!(s, Children::None));
    }
}
