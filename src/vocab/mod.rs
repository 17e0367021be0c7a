//! The shared vocabulary: the nouns every layer speaks (who waits for a pull, in which order work
//! is served, where a job came from and where it stands). Owns plain data types and their
//! orderings only; imports nothing of the crate, so any module may import it.

mod class;
mod job;
mod priority;

pub use class::Class;
pub use job::{JobState, Origin};
pub use priority::Priority;
