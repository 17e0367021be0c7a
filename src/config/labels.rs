//! Node label names, checked where the config names them (`[[prewarm]] label`).

/// A label name's length limit (the part after the prefix).
pub const MAX_LABEL_NAME: usize = 63;

/// `Err` says why `name` cannot be a label name (1–63 of `A-Z a-z 0-9 - _ .`, starting and
/// ending with a letter or digit).
pub fn check_label_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > MAX_LABEL_NAME {
        return Err(format!("{name:?} must be 1 to {MAX_LABEL_NAME} characters"));
    }
    if !name.chars().all(ok_char) || !ends(name.chars().next()) || !ends(name.chars().last()) {
        return Err(format!(
            "{name:?} is not a label name (letters, digits, '-', '_', '.'; a letter or digit \
             at both ends)"
        ));
    }
    Ok(())
}
