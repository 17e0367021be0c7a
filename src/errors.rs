//! Error formatting shared by pullgate's clients.

/// An error with its whole `source()` chain, "outer: inner: root cause": transport errors keep
/// the useful part (ENOENT, connection refused) in their sources.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
