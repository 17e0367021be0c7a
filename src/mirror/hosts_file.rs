//! pullgate's own entry in a containerd `hosts.toml`: one `[host."URL"]` table between two marker
//! comments, placed before every other host so containerd asks pullgate first and the
//! administrator's mirrors (P2P, caches) and the registry after it, in their order.
//!
//! Everything outside the markers is the administrator's and is kept byte for byte; adding is
//! idempotent and [`without_mirror`] gives back the file as it was. Like Spegel, pullgate edits
//! these files itself: containerd re-reads them on every pull, so no restart is needed.

const BEGIN: &str =
    "# >>> pullgate mirror: managed by pullgate, `pullgate mirror-hosts --remove` takes it out";
const END: &str = "# <<< pullgate mirror";

/// The block naming `url` (e.g. `http://127.0.0.1:5077`) as a pull host. Not a resolve host:
/// containerd resolves tags at the administrator's hosts and the registry, as without pullgate,
/// so a failing pull gets the registry's own answer (containerd 2.x reports a mirror's 404 ahead
/// of a later host's authorization or connection error). Manifests by digest and blobs come
/// through the mirror.
fn block(url: &str) -> String {
    format!(
        "{BEGIN}\n[host.{}]\n  capabilities = [\"pull\"]\n{END}\n",
        toml_string(url)
    )
}

/// `text` with pullgate's block (for `url`) as its first host, replacing any block written
/// before (another port, an older layout). Top-level keys must stay above every table, so the
/// block goes right before the first table header, or at the end when there is none.
///
/// A last top-level line without a newline gets one. The result is checked the way containerd
/// will read it: a file this cannot edit safely (not TOML, or hosts written as inline tables or
/// dotted keys, whose order a `[host."URL"]` table cannot be placed before) is an error, and the
/// caller leaves it as it is.
pub fn with_mirror(text: &str, url: &str) -> Result<String, String> {
    let rest = without_mirror(text);
    if let Err(e) = rest.parse::<toml::Table>() {
        return Err(format!("not valid TOML: {}", e.message()));
    }
    let at = first_table(&rest).unwrap_or(rest.len());
    let (head, tail) = rest.split_at(at);
    let mut out = String::with_capacity(rest.len() + 128);
    out.push_str(head);
    if !head.is_empty() && !head.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&block(url));
    out.push_str(tail);
    let table = out.parse::<toml::Table>().map_err(|e| {
        format!(
            "adding a [host] table breaks it ({}): are its hosts inline tables?",
            e.message()
        )
    })?;
    if !first_host_is(&table, url) {
        return Err(
            "pullgate's host would not be the first one: are hosts defined with dotted \
                    keys above the first table?"
                .into(),
        );
    }
    Ok(out)
}

/// `text` without pullgate's block.
pub fn without_mirror(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if !inside && trimmed == BEGIN {
            inside = true;
        } else if inside && trimmed == END {
            inside = false;
        } else if !inside {
            out.push_str(line);
        }
    }
    out
}

/// True when `text` parses and `url` is its first host (where [`with_mirror`] puts it).
pub fn mirror_is_first(text: &str, url: &str) -> bool {
    text.parse::<toml::Table>()
        .is_ok_and(|table| first_host_is(&table, url))
}

/// The crate's `toml` keeps keys in the order they are defined (`preserve_order`), which is the
/// order containerd tries the hosts in.
fn first_host_is(table: &toml::Table, url: &str) -> bool {
    let Some((first, host)) = table
        .get("host")
        .and_then(|h| h.as_table())
        .and_then(|h| h.iter().next())
    else {
        return false;
    };
    first == url
        && host
            .get("capabilities")
            .and_then(|c| c.as_array())
            .is_some_and(|c| c.iter().any(|v| v.as_str() == Some("pull")))
}

/// Byte offset of the first line that starts a table (`[x]` or `[[x]]`) outside a multi-line
/// string.
fn first_table(text: &str) -> Option<usize> {
    table_headers(text).next().map(|(at, _)| at)
}

fn table_headers(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut at = 0;
    let mut in_multiline: Option<&str> = None;
    text.split_inclusive('\n').filter_map(move |line| {
        let start = at;
        at += line.len();
        let trimmed = line.trim_start();
        if let Some(delim) = in_multiline {
            if line.matches(delim).count() % 2 == 1 {
                in_multiline = None;
            }
            return None;
        }
        for delim in ["\"\"\"", "'''"] {
            if line.matches(delim).count() % 2 == 1 {
                in_multiline = Some(delim);
            }
        }
        trimmed.starts_with('[').then_some((start, trimmed))
    })
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://127.0.0.1:5077";

    /// What an administrator might have: a server, a P2P mirror, a comment, odd spacing.
    const ADMIN: &str = r#"# registry.example.com: P2P first, then the registry
server = "https://registry.example.com"
capabilities = ["pull", "resolve"]

[host."http://127.0.0.1:65001"]   # dragonfly
  capabilities = ["pull", "resolve"]
  [host."http://127.0.0.1:65001".header]
    X-Dragonfly-Registry = ["https://registry.example.com"]

[host."https://cache.example.com"]
  capabilities = ["pull"]
  ca = "/etc/certs/cache.pem"
"#;

    fn hosts_in_order(text: &str) -> Vec<String> {
        let dir = std::path::Path::new("/etc/containerd/certs.d/registry.example.com");
        crate::registry::hosts::parse_hosts_toml(
            text,
            dir,
            &dir.join("hosts.toml"),
            "registry.example.com",
        )
        .unwrap()
        .iter()
        .map(|h| format!("{}://{}", h.scheme(), h.authority()))
        .collect()
    }

    #[test]
    fn goes_first_and_keeps_everything_else() {
        let out = with_mirror(ADMIN, URL).unwrap();
        assert_eq!(
            hosts_in_order(&out),
            [
                URL,
                "http://127.0.0.1:65001",
                "https://cache.example.com",
                "https://registry.example.com"
            ]
        );
        assert!(mirror_is_first(&out, URL));
        assert!(!mirror_is_first(ADMIN, URL));
        // The administrator's keys stay top level (above the first table).
        let table: toml::Table = out.parse().unwrap();
        assert_eq!(
            table["server"].as_str(),
            Some("https://registry.example.com")
        );
        assert_eq!(without_mirror(&out), ADMIN);
    }

    #[test]
    fn is_idempotent_and_moves_with_the_address() {
        let once = with_mirror(ADMIN, URL).unwrap();
        assert_eq!(with_mirror(&once, URL).unwrap(), once);
        let moved = with_mirror(&once, "http://127.0.0.1:6000").unwrap();
        assert_eq!(moved.matches(BEGIN).count(), 1);
        assert!(mirror_is_first(&moved, "http://127.0.0.1:6000"));
        assert!(!mirror_is_first(&moved, URL));
        assert_eq!(without_mirror(&moved), ADMIN);
    }

    #[test]
    fn files_without_hosts_or_without_anything() {
        // Only a server: the block goes after it.
        let server = "server = \"https://r.example\"";
        let out = with_mirror(server, URL).unwrap();
        assert_eq!(hosts_in_order(&out), [URL, "https://r.example"]);
        // Empty (a `_default` written by pullgate): only pullgate, then containerd's default.
        let out = with_mirror("", URL).unwrap();
        assert!(mirror_is_first(&out, URL));
        assert_eq!(without_mirror(&out), "");
        // A last line without its newline gets one (found by the hosts_toml fuzz target).
        let out = with_mirror("  ", URL).unwrap();
        assert_eq!(without_mirror(&out), "  \n");
        assert!(mirror_is_first(&out, URL));
    }

    #[test]
    fn a_bracket_inside_a_multiline_string_is_not_a_table() {
        let text = "server = \"https://r.example\"\nnote = \"\"\"\n[not a table]\n\"\"\"\n[host.\"https://m.example\"]\n  capabilities = [\"pull\"]\n";
        let out = with_mirror(text, URL).unwrap();
        assert!(out.contains("note = \"\"\"\n[not a table]\n\"\"\"\n# >>> pullgate"));
        assert!(mirror_is_first(&out, URL));
    }

    #[test]
    fn files_it_cannot_edit_safely_are_refused() {
        for text in [
            "server = \"https://r.example\"\nhost = { \"https://m.example\" = { capabilities = [\"pull\"] } }\n",
            "host.\"https://m.example\".capabilities = [\"pull\"]\n",
            "server = [unclosed\n",
        ] {
            assert!(with_mirror(text, URL).is_err(), "{text}");
        }
    }
}
