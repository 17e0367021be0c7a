//! The order in which work is served: urgent (a pod waits) above prewarm, then a numeric level,
//! higher first.

use std::fmt;

use crate::pull::Class;

/// A job's or a requester's priority. `Ord`: greater is served first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Priority {
    /// Field order matters for `Ord`: the class before the level.
    pub class: ClassRank,
    pub level: i32,
}

/// [`Class`] ranked for ordering (prewarm < urgent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum ClassRank {
    #[default]
    Prewarm,
    Urgent,
}

impl Priority {
    pub fn new(class: Class, level: i32) -> Self {
        let class = match class {
            Class::Urgent => ClassRank::Urgent,
            Class::Prewarm => ClassRank::Prewarm,
        };
        Priority { class, level }
    }

    pub fn urgent(level: i32) -> Self {
        Priority::new(Class::Urgent, level)
    }

    pub fn prewarm(level: i32) -> Self {
        Priority::new(Class::Prewarm, level)
    }

    pub fn class(&self) -> Class {
        match self.class {
            ClassRank::Urgent => Class::Urgent,
            ClassRank::Prewarm => Class::Prewarm,
        }
    }

    pub fn is_urgent(&self) -> bool {
        self.class == ClassRank::Urgent
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.class(), self.level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urgent_beats_any_prewarm_level() {
        assert!(Priority::urgent(-100) > Priority::prewarm(i32::MAX));
        assert!(Priority::prewarm(2) > Priority::prewarm(1));
        assert!(Priority::urgent(1) > Priority::urgent(0));
    }
}
