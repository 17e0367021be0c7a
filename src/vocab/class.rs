//! Who is waiting for a pull: the one distinction every layer of pullgate acts on.

use std::fmt;

/// Who is waiting for a pull.
/// `Ord`: prewarm < urgent (the scheduler serves the greater first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Class {
    #[default]
    /// Nobody is blocked: pre-pulls by kruise-daemon, CRI clients without a pod, pullgate's own.
    Prewarm,
    /// A pod is waiting for this image (kubelet's pull with a sandbox config).
    Urgent,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Urgent => "urgent",
            Class::Prewarm => "prewarm",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
