//! Where the config file sets a key: its line and its value as written, from the TOML parser's
//! own spans, so `[schedule] # note`, inline tables, dotted and quoted keys all point at the
//! right line.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The parsed file, kept for locating keys in error messages.
pub struct Spans<'t> {
    text: &'t str,
    /// `None` when the text does not parse (the deserializer reports that error itself).
    root: Option<Spanned<DeTable<'t>>>,
}

impl<'t> Spans<'t> {
    pub fn new(text: &'t str) -> Spans<'t> {
        Spans {
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    /// The bytes of the value at `dotted` (`schedule.bandwidth`; a number indexes an array of
    /// tables: `prewarm.0.image`).
    fn span(&self, dotted: &str) -> Option<Range<usize>> {
        let mut parts = dotted.split('.');
        let root = self.root.as_ref()?.get_ref();
        let mut at = root.get(parts.next()?)?;
        for part in parts {
            at = match at.get_ref() {
                DeValue::Table(t) => t.get(part)?,
                DeValue::Array(a) => a.get(part.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(at.span()).filter(|s| s.end <= self.text.len() && s.start <= s.end)
    }

    /// "line N: " for where `dotted` is set, or "" when the file does not set it.
    pub fn line(&self, dotted: &str) -> String {
        self.span(dotted)
            .map(|s| {
                let n = self.text[..s.start].matches('\n').count() + 1;
                format!("line {n}: ")
            })
            .unwrap_or_default()
    }

    /// The value at `dotted` as the file writes it (a string without its quotes), so an error
    /// can echo the operator's own spelling (`"90s"`, not `90s` turned into `1m 30s`).
    pub fn written(&self, dotted: &str) -> Option<String> {
        let raw = &self.text[self.span(dotted)?];
        Some(raw.trim().trim_matches(['"', '\'']).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::Spans;

    #[test]
    fn keys_are_found_where_the_parser_sees_them() {
        let text = "\
# pullgate
[schedule] # a note after the header
bandwidth = \"100MB\"

[mirror]
\"retries\" = 3
parts = { range_part = '2MiB' }

[[prewarm]]
image = \"a:1\"

[[prewarm]]
image = \"b:1\"
server.nice = 5
";
        let s = Spans::new(text);
        assert_eq!(s.line("schedule.bandwidth"), "line 3: ");
        assert_eq!(s.written("schedule.bandwidth").as_deref(), Some("100MB"));
        assert_eq!(s.line("mirror.retries"), "line 6: ");
        assert_eq!(s.written("mirror.retries").as_deref(), Some("3"));
        assert_eq!(s.line("mirror.parts.range_part"), "line 7: ");
        assert_eq!(
            s.written("mirror.parts.range_part").as_deref(),
            Some("2MiB")
        );
        assert_eq!(s.line("prewarm.1.image"), "line 13: ");
        assert_eq!(s.line("prewarm.1.server.nice"), "line 14: ");
        assert_eq!(
            s.line("server.nice"),
            "",
            "only a top-level [server] would set it"
        );
        assert_eq!(s.line("schedule.prewarm_floor"), "");
        assert_eq!(s.line("prewarm.7.image"), "");
        assert_eq!(s.written("nowhere"), None);
    }

    #[test]
    fn text_that_does_not_parse_locates_nothing() {
        let s = Spans::new("[schedule\nbandwidth = 1");
        assert_eq!(s.line("schedule.bandwidth"), "");
    }
}
