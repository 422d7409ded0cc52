//! Fair scheduling of Data between streams: deficit round-robin by payload bytes.
//!
//! Each stream with sendable data waits in one queue. At its turn it gains a quantum of credit
//! and sends frames while the next one fits its credit; then it goes to the back. A bulk
//! download therefore sends one chunk per turn while an interactive stream's small frames go out
//! at their first turn: the bulk stream cannot starve it. Control messages never wait here;
//! the session sends them first.

use std::collections::{HashMap, VecDeque};

/// The round-robin queue, with each queued stream's credit.
#[derive(Debug, Default)]
pub(crate) struct Scheduler {
    active: VecDeque<i64>,
    credits: HashMap<i64, Credit>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Credit {
    turn_open: bool,
    deficit: usize,
}

impl Scheduler {
    /// Puts a stream in the queue if it is not there.
    pub(crate) fn activate(&mut self, id: i64) {
        if let std::collections::hash_map::Entry::Vacant(entry) = self.credits.entry(id) {
            entry.insert(Credit::default());
            self.active.push_back(id);
        }
    }

    /// The stream whose frame goes next, charged for it. `next_len` gives the payload length of
    /// a stream's next frame, or `None` when it cannot send now (paused, drained or gone); such
    /// streams leave the queue until activated again.
    pub(crate) fn next(
        &mut self,
        quantum: usize,
        mut next_len: impl FnMut(i64) -> Option<usize>,
    ) -> Option<i64> {
        // Each stream is visited at most twice per call (to close its turn, then to open the
        // next), so the loop ends even if no frame fits.
        let mut visits = 2 * self.active.len() + 1;
        while let Some(&id) = self.active.front() {
            visits = visits.checked_sub(1)?;
            let Some(len) = next_len(id) else {
                self.active.pop_front();
                self.credits.remove(&id);
                continue;
            };
            let credit = self.credits.entry(id).or_default();
            if !credit.turn_open {
                credit.turn_open = true;
                credit.deficit += quantum;
            }
            if len <= credit.deficit {
                credit.deficit -= len;
                return Some(id);
            }
            credit.turn_open = false;
            self.active.rotate_left(1);
        }
        None
    }

    /// Streams waiting for a turn.
    pub(crate) fn len(&self) -> usize {
        self.active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(streams: Vec<(i64, Vec<usize>)>, quantum: usize, steps: usize) -> Vec<i64> {
        let mut sched = Scheduler::default();
        let mut frames: HashMap<i64, VecDeque<usize>> = HashMap::new();
        for (id, f) in streams {
            frames.insert(id, f.into());
            sched.activate(id);
        }
        let mut order = Vec::new();
        for _ in 0..steps {
            let Some(id) = sched.next(quantum, |id| frames.get(&id)?.front().copied()) else {
                break;
            };
            frames.get_mut(&id).unwrap().pop_front();
            order.push(id);
        }
        order
    }

    #[test]
    fn bulk_and_interactive_alternate() {
        let order = run(vec![(1, vec![32; 6]), (2, vec![1, 1, 1])], 32, 9);
        assert_eq!(order, [1, 2, 2, 2, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn equal_bulk_streams_take_turns() {
        let order = run(vec![(1, vec![32; 3]), (2, vec![32; 3])], 32, 6);
        assert_eq!(order, [1, 2, 1, 2, 1, 2]);
    }

    #[test]
    fn credit_carries_over_for_large_frames() {
        // Frames of 48 with a quantum of 32: the big stream sends every other turn at most.
        let order = run(vec![(1, vec![48; 2]), (2, vec![16; 4])], 32, 6);
        assert_eq!(order, [2, 2, 1, 2, 2, 1]);
    }

    #[test]
    fn drained_stream_leaves_and_can_return() {
        let mut sched = Scheduler::default();
        sched.activate(7);
        assert_eq!(sched.next(32, |_| None), None);
        assert_eq!(sched.len(), 0);
        sched.activate(7);
        assert_eq!(sched.next(32, |_| Some(10)), Some(7));
    }
}
