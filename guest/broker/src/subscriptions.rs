//! The subscription index: a trie over topic levels, with `+` and `#` edges.
//!
//! Owns which session subscribed to which filter with which options, and
//! answers "who receives a message on this topic" in time proportional to
//! the topic's depth and the matching branches, not to the number of
//! subscriptions. Tested against the reference matcher in `topic`.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::packet::SubscriptionOptions;
use crate::topic::ParsedFilter;

/// Sessions are known by a number the broker assigns.
pub type SessionKey = u64;

/// One subscription as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub session: SessionKey,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
    /// For a shared subscription, the whole `$share/{share name}/{filter}`:
    /// one member among those with equal keys receives each message.
    pub share_key: Option<String>,
}

impl Subscription {
    /// `session`'s subscription to `filter` (shared if it names a share).
    pub fn new(
        session: SessionKey,
        filter: &ParsedFilter,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    ) -> Subscription {
        Subscription { session, options, identifier, share_key: share_key(filter) }
    }
}

/// The key that tells shared subscriptions apart: share name and filter.
pub fn share_key(filter: &ParsedFilter) -> Option<String> {
    filter.share_name.map(|name| format!("$share/{name}/{}", filter.filter))
}

#[derive(Debug, Default)]
struct Node {
    children: BTreeMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    hash: Vec<Subscription>,
    here: Vec<Subscription>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.hash.is_empty() && self.here.is_empty()
    }
}

/// All subscriptions of one broker.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    root: Node,
    count: usize,
}

fn same_slot(a: &Subscription, session: SessionKey, share: Option<&str>) -> bool {
    a.session == session && a.share_key.as_deref() == share
}

impl SubscriptionIndex {
    /// Number of stored subscriptions.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces `session`'s subscription to `filter`. Returns true if
    /// it replaced an existing one.
    pub fn insert(&mut self, filter: ParsedFilter, sub: Subscription) -> bool {
        let mut node = &mut self.root;
        let mut levels = filter.filter.split('/').peekable();
        let list = loop {
            let Some(level) = levels.next() else { break &mut node.here };
            match level {
                "#" => break &mut node.hash,
                "+" => node = node.plus.get_or_insert_with(Box::default),
                _ => node = node.children.entry(Box::from(level)).or_default(),
            }
        };
        let share = sub.share_key.clone();
        if let Some(existing) = list.iter_mut().find(|s| same_slot(s, sub.session, share.as_deref())) {
            *existing = sub;
            true
        } else {
            list.push(sub);
            self.count += 1;
            false
        }
    }

    /// Removes `session`'s subscription to `filter`; true if there was one.
    pub fn remove(&mut self, filter: ParsedFilter, session: SessionKey) -> bool {
        let levels: Vec<&str> = filter.filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, session, share_key(&filter).as_deref());
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Calls `f` for every subscription matching topic `name`.
    pub fn for_each_match(&self, name: &str, mut f: impl FnMut(&Subscription)) {
        let levels: Vec<&str> = name.split('/').collect();
        // Wildcards at the first level do not match `$` topics.
        let dollar = name.starts_with('$');
        walk(&self.root, &levels, dollar, &mut f);
    }
}

fn remove_at(node: &mut Node, levels: &[&str], session: SessionKey, share: Option<&str>) -> bool {
    let Some((&level, rest)) = levels.split_first() else {
        return take(&mut node.here, session, share);
    };
    match level {
        "#" => take(&mut node.hash, session, share),
        "+" => {
            let Some(child) = node.plus.as_mut() else { return false };
            let removed = remove_at(child, rest, session, share);
            if child.is_empty() {
                node.plus = None;
            }
            removed
        }
        _ => {
            let Some(child) = node.children.get_mut(level) else { return false };
            let removed = remove_at(child, rest, session, share);
            if child.is_empty() {
                node.children.remove(level);
            }
            removed
        }
    }
}

fn take(list: &mut Vec<Subscription>, session: SessionKey, share: Option<&str>) -> bool {
    let before = list.len();
    list.retain(|s| !same_slot(s, session, share));
    list.len() != before
}

fn walk(node: &Node, levels: &[&str], dollar_first: bool, f: &mut impl FnMut(&Subscription)) {
    // `#` also matches the parent level ("a/#" matches "a").
    if !dollar_first {
        node.hash.iter().for_each(&mut *f);
    }
    let Some((&level, rest)) = levels.split_first() else {
        node.here.iter().for_each(f);
        return;
    };
    if let Some(child) = node.children.get(level) {
        walk(child, rest, false, f);
    }
    if let Some(plus) = node.plus.as_ref().filter(|_| !dollar_first) {
        walk(plus, rest, false, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::QoS;
    use crate::topic::{TopicLimits, matches, parse_filter};
    use alloc::vec;

    fn sub(session: SessionKey) -> Subscription {
        let options = SubscriptionOptions {
            qos: QoS::AtMostOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        };
        Subscription { session, options, identifier: None, share_key: None }
    }

    fn matching(index: &SubscriptionIndex, name: &str) -> Vec<SessionKey> {
        let mut out = Vec::new();
        index.for_each_match(name, |s| out.push(s.session));
        out.sort_unstable();
        out
    }

    #[test]
    fn insert_replace_remove() {
        let mut index = SubscriptionIndex::default();
        let f = parse_filter("a/+/c", TopicLimits::default()).unwrap();
        assert!(!index.insert(f, sub(1)));
        assert!(index.insert(f, sub(1)));
        assert_eq!(index.len(), 1);
        assert_eq!(matching(&index, "a/b/c"), vec![1]);
        assert!(index.remove(f, 1));
        assert!(!index.remove(f, 1));
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "empty branches are pruned");
    }

    #[test]
    fn dollar_topics_skip_leading_wildcards() {
        let mut index = SubscriptionIndex::default();
        for (i, f) in ["#", "+/x", "$SYS/#", "$SYS/+"].iter().enumerate() {
            index.insert(parse_filter(f, TopicLimits::default()).unwrap(), sub(i as u64));
        }
        assert_eq!(matching(&index, "$SYS/x"), vec![2, 3]);
        assert_eq!(matching(&index, "a/x"), vec![0, 1]);
    }

    /// The index must agree with the reference matcher on random filters
    /// and topics built from a small alphabet (so that they collide often).
    #[test]
    fn agrees_with_the_reference_matcher() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % n as u64).unwrap()
        };
        let words = ["a", "b", "", "$s"];
        for round in 0..200 {
            let mut index = SubscriptionIndex::default();
            let mut filters = Vec::new();
            for session in 0..8u64 {
                let depth = 1 + next(4);
                let mut levels = Vec::new();
                for d in 0..depth {
                    levels.push(match next(6) {
                        0 => "+",
                        1 if d == depth - 1 => "#",
                        _ => words[next(3)],
                    });
                }
                let mut filter = levels.join("/");
                if filter.is_empty() {
                    filter.push('a'); // "" is not a valid filter
                }
                index.insert(parse_filter(&filter, TopicLimits::default()).unwrap(), sub(session));
                filters.push(filter);
            }
            for _ in 0..20 {
                let depth = 1 + next(4);
                let name = (0..depth).map(|_| words[next(4)]).collect::<Vec<_>>().join("/");
                if name.is_empty() {
                    continue; // "" is not a valid topic name
                }
                let mut expected: Vec<u64> =
                    (0..8u64).filter(|&s| matches(&filters[usize::try_from(s).unwrap()], &name)).collect();
                expected.sort_unstable();
                assert_eq!(matching(&index, &name), expected, "round {round}: {name:?} vs {filters:?}");
            }
        }
    }
}
