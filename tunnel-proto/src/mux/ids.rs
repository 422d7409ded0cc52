//! Stream id allocation.
//!
//! Go servers allocate 2, 3, 4, ... and Go clients 1, 2, 3, ..., from separate counters into one
//! map per session, so streams opened from both ends collide (spec §4.5). This side allocates
//! only negative ids, which no Go version ever picks: odd ones (-1, -3, ...) as a client and
//! even ones (-2, -4, ...) as a server, so two ends of this project never collide either.

use crate::config::Role;

/// Hands out this side's stream ids.
#[derive(Debug, Clone)]
pub(crate) struct IdAllocator {
    next: i64,
}

impl IdAllocator {
    pub(crate) fn new(role: Role) -> Self {
        Self {
            next: match role {
                Role::Client => -1,
                Role::Server => -2,
            },
        }
    }

    /// The next id for which `in_use` is false.
    pub(crate) fn allocate(&mut self, in_use: impl Fn(i64) -> bool) -> i64 {
        loop {
            let id = self.next;
            // Two apart keeps the parity; wrapping after 2^62 streams restarts near zero.
            self.next = match self.next.checked_sub(2) {
                Some(next) => next,
                None => self.next.rem_euclid(2) - 2,
            };
            if !in_use(id) {
                return id;
            }
        }
    }

    /// Whether `id` is one this side would allocate (used to spot a peer misusing our range).
    #[cfg(test)]
    pub(crate) fn is_local(role: Role, id: i64) -> bool {
        id < 0
            && match role {
                Role::Client => id % 2 != 0,
                Role::Server => id % 2 == 0,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_and_sign_by_role() {
        let mut client = IdAllocator::new(Role::Client);
        let mut server = IdAllocator::new(Role::Server);
        let c: Vec<i64> = (0..3).map(|_| client.allocate(|_| false)).collect();
        let s: Vec<i64> = (0..3).map(|_| server.allocate(|_| false)).collect();
        assert_eq!(c, [-1, -3, -5]);
        assert_eq!(s, [-2, -4, -6]);
        assert!(c.iter().all(|&id| IdAllocator::is_local(Role::Client, id)));
        assert!(s.iter().all(|&id| !IdAllocator::is_local(Role::Client, id)));
    }

    #[test]
    fn skips_ids_in_use() {
        let mut alloc = IdAllocator::new(Role::Client);
        assert_eq!(alloc.allocate(|id| id == -1 || id == -3), -5);
    }
}
