//! Keys of earlier versions, refused with what replaced them (the byte path moved from
//! pullgate's own fetcher, which wrote into containerd's content store, to pullgate's registry
//! mirror, which containerd fetches through).

/// `(key, what to do instead)`.
const REPLACED: &[(&str, &str)] = &[
    ("fetch.enabled", "use mirror.enabled"),
    ("fetch.hosts_dir", "use mirror.hosts_dir"),
    ("fetch.mirror_credentials", "use mirror.mirror_credentials"),
    ("fetch.request_timeout", "use mirror.request_timeout"),
    ("fetch.retries", "use mirror.retries"),
    (
        "fetch.no_progress_timeout",
        "remove it: mirror.request_timeout bounds the wait for each chunk, and containerd's \
         image_pull_progress_timeout the pull",
    ),
    (
        "fetch.parallel_blobs",
        "remove it: containerd's max_concurrent_downloads sets the blobs fetched at once",
    ),
    (
        "fetch.range_chunk_mib",
        "remove it: the mirror streams each blob as containerd asks for it",
    ),
    (
        "fetch.range_connections",
        "remove it: the mirror streams each blob as containerd asks for it",
    ),
    (
        "fetch.lease_expiry",
        "remove it: containerd keeps its own leases for the pulls it makes",
    ),
    (
        "fetch.unpack_ahead",
        "remove it: containerd unpacks as layers arrive, into its own snapshotter",
    ),
    (
        "fetch.snapshotter",
        "remove it: containerd unpacks into its own snapshotter",
    ),
    (
        "schedule.prewarm_write_rate",
        "remove it: containerd writes what the mirror delivers, so schedule.prewarm_bandwidth \
         bounds prewarm's disk writes too",
    ),
    (
        "schedule.max_unpacks",
        "remove it: containerd unpacks as part of its own pull",
    ),
];

/// The first key of an earlier version in `table`, with its replacement.
pub fn check(table: &toml::Table) -> Result<(), (String, &'static str)> {
    if let Some(fetch) = table.get("fetch") {
        let Some(fetch) = fetch.as_table() else {
            return Err(("fetch".into(), "rename the [fetch] section to [mirror]"));
        };
        if fetch.is_empty() {
            return Err(("fetch".into(), "remove the empty [fetch] section"));
        }
    }
    for (dotted, instead) in REPLACED {
        let (section, key) = dotted.split_once('.').expect("dotted");
        let found = table
            .get(section)
            .and_then(|s| s.as_table())
            .is_some_and(|s| s.contains_key(key));
        if found {
            return Err((dotted.to_string(), instead));
        }
    }
    if let Some(fetch) = table.get("fetch").and_then(|f| f.as_table()) {
        if let Some(key) = fetch.keys().next() {
            return Err((
                format!("fetch.{key}"),
                "the [fetch] section is gone: see [mirror]",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_old_key_names_its_replacement() {
        for (dotted, instead) in REPLACED {
            let (section, key) = dotted.split_once('.').unwrap();
            let t: toml::Table = format!("[{section}]\n{key} = 1\n").parse().unwrap();
            assert_eq!(check(&t), Err((dotted.to_string(), *instead)));
        }
        let t: toml::Table = "[schedule]\nbandwidth = \"1MB\"\n[mirror]\n"
            .parse()
            .unwrap();
        assert_eq!(check(&t), Ok(()));
        let t: toml::Table = "[fetch]\n".parse().unwrap();
        assert!(check(&t).is_err());
    }
}
