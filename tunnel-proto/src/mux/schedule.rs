//! Fair scheduling of Data between streams: deficit round-robin by payload bytes.
//!
//! Each stream with sendable data waits in one queue. At its turn it gains a quantum of credit
//! and sends frames while the next one fits its credit; then it goes to the back. A bulk
//! download therefore sends one chunk per turn while an interactive stream's small frames go out
//! at their first turn: the bulk stream cannot starve it. Control messages never wait here;
//! the session sends them first.
//!
//! With credit windows negotiated the session also asks for small frames first
//! ([`Scheduler::next`]'s `small_first`): a frame no larger than that jumps the queue, so a
//! keystroke or a 1 KiB request does not wait for the turns of the streams ahead of it. Jumps
//! are bounded: once a quantum of small bytes has jumped, one frame goes in the normal order,
//! so even a flood of small frames cannot starve a bulk stream of its turns.

use std::collections::{HashMap, VecDeque};

/// The round-robin queue, with each queued stream's credit.
#[derive(Debug, Default)]
pub(crate) struct Scheduler {
    active: VecDeque<i64>,
    credits: HashMap<i64, Credit>,
    /// Bytes of small frames that jumped the queue since a frame went in the normal order.
    jumped: usize,
}

/// Most queued streams looked at for a small frame (the scan is per frame sent).
const SMALL_SCAN: usize = 64;

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
    ///
    /// `small_first` (0: off) lets a stream whose next frame is at most that long go ahead of
    /// the queue, without using its turn, while fewer than `quantum` such bytes have jumped
    /// since the last frame sent in order.
    pub(crate) fn next(
        &mut self,
        quantum: usize,
        small_first: usize,
        mut next_len: impl FnMut(i64) -> Option<usize>,
    ) -> Option<i64> {
        if small_first > 0 && self.jumped < quantum {
            let small = self.active.iter().take(SMALL_SCAN).find_map(|&id| {
                next_len(id)
                    .filter(|&len| len <= small_first)
                    .map(|len| (id, len))
            });
            if let Some((id, len)) = small {
                self.jumped += len;
                return Some(id);
            }
        }
        let id = self.next_in_turn(quantum, next_len)?;
        self.jumped = 0;
        Some(id)
    }

    fn next_in_turn(
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
        run_small_first(streams, quantum, 0, steps)
    }

    fn run_small_first(
        streams: Vec<(i64, Vec<usize>)>,
        quantum: usize,
        small_first: usize,
        steps: usize,
    ) -> Vec<i64> {
        let mut sched = Scheduler::default();
        let mut frames: HashMap<i64, VecDeque<usize>> = HashMap::new();
        for (id, f) in streams {
            frames.insert(id, f.into());
            sched.activate(id);
        }
        let mut order = Vec::new();
        for _ in 0..steps {
            let Some(id) = sched.next(quantum, small_first, |id| frames.get(&id)?.front().copied())
            else {
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
        assert_eq!(sched.next(32, 0, |_| None), None);
        assert_eq!(sched.len(), 0);
        sched.activate(7);
        assert_eq!(sched.next(32, 0, |_| Some(10)), Some(7));
    }

    #[test]
    fn small_frames_jump_the_queue() {
        // Three bulk streams ahead of a small one: without small-first it waits three turns.
        let streams = || {
            vec![
                (1, vec![32; 3]),
                (2, vec![32; 3]),
                (3, vec![32; 3]),
                (4, vec![4]),
            ]
        };
        assert_eq!(run(streams(), 32, 4), [1, 2, 3, 4]);
        assert_eq!(run_small_first(streams(), 32, 8, 4), [4, 1, 2, 3]);
    }

    #[test]
    fn a_small_frame_flood_cannot_starve_bulk() {
        // Stream 2 only ever has small frames: after each quantum of them that jumped, one
        // frame goes in turn order, and the bulk stream keeps its turns.
        let order = run_small_first(vec![(1, vec![32; 3]), (2, vec![8; 12])], 32, 8, 15);
        assert_eq!(order, [2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1]);
    }
}
