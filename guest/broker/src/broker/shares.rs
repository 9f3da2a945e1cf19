//! Shared-subscription groups (`$share/{name}/{filter}`, MQTT 5 4.8.2): how
//! many members each has, and whose turn is next.
//!
//! Owns the round-robin position of every group, and forgets a group with
//! its last member, so subscribing and leaving under ever new share names
//! leaves nothing behind.

use alloc::collections::BTreeMap;
use alloc::string::String;

struct Group {
    members: usize,
    turn: usize,
}

#[derive(Default)]
pub(super) struct SharedGroups {
    by_key: BTreeMap<String, Group>,
}

impl SharedGroups {
    /// A member joined the group `key` (not a replaced subscription).
    pub(super) fn joined(&mut self, key: &str) {
        match self.by_key.get_mut(key) {
            Some(group) => group.members += 1,
            None => {
                self.by_key.insert(key.into(), Group { members: 1, turn: 0 });
            }
        }
    }

    /// A member left the group `key`.
    pub(super) fn left(&mut self, key: &str) {
        if let Some(group) = self.by_key.get_mut(key) {
            group.members = group.members.saturating_sub(1);
            if group.members == 0 {
                self.by_key.remove(key);
            }
        }
    }

    /// Which of `count` matching members gets the next message.
    pub(super) fn next(&mut self, key: &str, count: usize) -> usize {
        let Some(group) = self.by_key.get_mut(key) else { return 0 };
        let chosen = group.turn % count.max(1);
        group.turn = group.turn.wrapping_add(1);
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_rotate_per_group_and_empty_groups_are_forgotten() {
        let mut groups = SharedGroups::default();
        groups.joined("$share/g/t");
        groups.joined("$share/g/t");
        groups.joined("$share/h/t");
        let turns: alloc::vec::Vec<usize> = (0..4).map(|_| groups.next("$share/g/t", 2)).collect();
        assert_eq!(turns, [0, 1, 0, 1]);
        assert_eq!(groups.next("$share/h/t", 1), 0);
        for key in ["$share/g/t", "$share/g/t", "$share/h/t"] {
            groups.left(key);
        }
        assert!(groups.by_key.is_empty());
        // A member that never joined leaves nothing odd behind.
        groups.left("$share/x/t");
        assert_eq!(groups.next("$share/x/t", 3), 0);
        assert!(groups.by_key.is_empty());
    }
}
