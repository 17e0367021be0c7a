//! Error formatting shared by pullgate's clients.
//!
//! A leaf: imports nothing of the crate.

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

/// The message a panic was raised with (`panic!("...")`, `expect`, an overflow), for the log.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&'static str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}
