//! The order in which work is served: urgent (a pod waits) above prewarm, then a numeric level,
//! higher first.

use std::fmt;

use super::Class;

/// A job's or a requester's priority. `Ord`: greater is served first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Priority {
    /// Field order matters for `Ord`: the class before the level.
    pub class: Class,
    pub level: i32,
}

impl Priority {
    pub fn new(class: Class, level: i32) -> Self {
        Priority { class, level }
    }

    pub fn urgent(level: i32) -> Self {
        Priority::new(Class::Urgent, level)
    }

    pub fn prewarm(level: i32) -> Self {
        Priority::new(Class::Prewarm, level)
    }

    pub fn class(&self) -> Class {
        self.class
    }

    pub fn is_urgent(&self) -> bool {
        self.class == Class::Urgent
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.class, self.level)
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
