//! Whether containerd reads the hosts.toml files pullgate keeps: its CRI registry `config_path`
//! (containerd ignores `hosts.toml` without it) must name `mirror.hosts_dir`.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// containerd's config as containerd itself reads it: the file, then each file its `imports`
/// names (paths relative to the importing file, glob patterns, nested imports), later files
/// replacing top-level keys and whole `plugins.<name>` sections, as containerd's `mergeConfig`
/// does.
pub fn load(file: &Path) -> Result<toml::Table, String> {
    let mut seen = Vec::new();
    load_into(file, &mut toml::Table::new(), &mut seen)
}

fn load_into(
    file: &Path,
    into: &mut toml::Table,
    seen: &mut Vec<PathBuf>,
) -> Result<toml::Table, String> {
    // containerd refuses an import cycle; a bound keeps a pathological tree finite too.
    let real = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    if seen.contains(&real) || seen.len() >= 64 {
        return Ok(std::mem::take(into));
    }
    seen.push(real);
    let text = crate::small_file::read_to_string(file)
        .map_err(|e| format!("cannot read containerd's config {}: {e}", file.display()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        format!("{} is not valid TOML: {}", file.display(), e.message())
    })?;
    let imports: Vec<String> = table
        .get("imports")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    merge(into, table);
    let base = file.parent().unwrap_or(Path::new("/"));
    for pattern in imports {
        let full = base.join(&pattern);
        let matches = glob::glob(&full.to_string_lossy())
            .map_err(|e| format!("{}: imports pattern {pattern:?}: {e}", file.display()))?;
        let mut found: Vec<PathBuf> = matches.filter_map(|m| m.ok()).collect();
        found.sort();
        for f in found {
            let merged = load_into(&f, into, seen)?;
            *into = merged;
        }
    }
    Ok(std::mem::take(into))
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (k.as_str(), v, into.get_mut("plugins")) {
            ("plugins", toml::Value::Table(plugins), Some(toml::Value::Table(have))) => {
                for (name, section) in plugins {
                    have.insert(name, section);
                }
            }
            (_, v, _) => {
                into.insert(k, v);
            }
        }
    }
}

/// The CRI registry `config_path` of a containerd config file: version 2 configs (containerd 1.x,
/// and 2.x reading them) under `io.containerd.grpc.v1.cri`, version 3 under
/// `io.containerd.cri.v1.images`.
fn config_path(table: &toml::Table) -> Option<&str> {
    let plugins = table.get("plugins")?.as_table()?;
    ["io.containerd.cri.v1.images", "io.containerd.grpc.v1.cri"]
        .iter()
        .find_map(|p| {
            plugins
                .get(*p)?
                .get("registry")?
                .get("config_path")?
                .as_str()
        })
}

/// The snapshotter containerd's CRI unpacks images into: `snapshotter` of the CRI containerd
/// table (version 2 configs) or of the images plugin (version 3); containerd's default,
/// overlayfs, when the file does not set it. `None` when the file cannot be read.
pub fn snapshotter(file: &Path) -> Option<String> {
    let table = load(file).ok()?;
    let plugins = table.get("plugins").and_then(|p| p.as_table());
    let set = plugins.and_then(|p| {
        p.get("io.containerd.cri.v1.images")
            .and_then(|t| t.get("snapshotter"))
            .or_else(|| {
                p.get("io.containerd.grpc.v1.cri")?
                    .get("containerd")?
                    .get("snapshotter")
            })
            .and_then(|v| v.as_str())
    });
    Some(set.unwrap_or("overlayfs").to_string())
}

/// containerd's CRI `image_pull_progress_timeout` (containerd 1.7 and later): a pull whose
/// streams read nothing for this long is cancelled. `None`: not set (containerd's default, 5
/// minutes, where it has the setting), unreadable, or 0 (disabled).
pub fn progress_timeout(file: &Path) -> Option<Duration> {
    let table = load(file).ok()?;
    let plugins = table.get("plugins")?.as_table()?;
    let text = ["io.containerd.cri.v1.images", "io.containerd.grpc.v1.cri"]
        .iter()
        .find_map(|p| {
            plugins
                .get(*p)?
                .get("image_pull_progress_timeout")?
                .as_str()
        })?;
    go_duration(text).filter(|d| !d.is_zero())
}

/// A Go `time.Duration` string as containerd writes it (`5m0s`, `1m30s`, `500ms`, `1.5s`).
fn go_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text.trim();
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

/// containerd 2.x's download slots shared by every pull on the node: the transfer service's
/// `max_concurrent_downloads` (containerd's default, 3, when the file does not set it or cannot
/// be read: the side that hands prewarm back). `None` when the CRI plugin pulls on its own
/// (`use_local_image_pull = true`), which limits each pull by itself as containerd 1.x does.
pub fn shared_download_slots(file: &Path) -> Option<usize> {
    const CONTAINERD_DEFAULT: usize = 3;
    let Ok(table) = load(file) else {
        return Some(CONTAINERD_DEFAULT);
    };
    let plugin = |name: &str| table.get("plugins")?.get(name);
    let local = plugin("io.containerd.cri.v1.images")
        .and_then(|t| t.get("use_local_image_pull"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if local {
        return None;
    }
    let set = plugin("io.containerd.transfer.v1.local")
        .and_then(|t| t.get("max_concurrent_downloads"))
        .and_then(|v| v.as_integer())
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n > 0);
    Some(set.unwrap_or(CONTAINERD_DEFAULT))
}

/// How often a paused prewarm stream sends containerd a few bytes: a third of containerd's
/// progress timeout (it checks every 10 s at most), at most a minute.
pub fn keepalive(file: &Path) -> Duration {
    let timeout = progress_timeout(file).unwrap_or(Duration::from_secs(300));
    (timeout / 3).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// `Err` says why containerd will not fetch through pullgate's mirror.
pub fn check(file: &Path, hosts_dir: &Path) -> Result<(), String> {
    let table = load(file)?;
    let want = hosts_dir.display().to_string();
    match config_path(&table) {
        None | Some("") => Err(format!(
            "{} (with its imports) sets no CRI registry config_path: containerd ignores \
             hosts.toml files and never fetches through pullgate's mirror; set config_path = {want:?}",
            file.display()
        )),
        Some(p) if p.split(':').any(|d| Path::new(d) == hosts_dir) => Ok(()),
        Some(p) => Err(format!(
            "{}: containerd's registry config_path is {p:?}, not mirror.hosts_dir {want:?}: \
             containerd does not read the hosts.toml files pullgate keeps",
            file.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_followed_as_containerd_merges_them() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("config.toml");
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            &main,
            "version = 2\nimports = [\"conf.d/*.toml\"]\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/wrong\"\n",
        )
        .unwrap();
        let hosts = Path::new("/etc/containerd/certs.d");
        assert!(check(&main, hosts).unwrap_err().contains("/wrong"));
        // A drop-in replaces the whole CRI plugin section, as containerd does.
        std::fs::write(
            dir.path().join("conf.d/10-registry.toml"),
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n\
             config_path = \"/etc/containerd/certs.d\"\n",
        )
        .unwrap();
        assert_eq!(check(&main, hosts), Ok(()));
        // A later drop-in that takes the section over without config_path wins.
        std::fs::write(
            dir.path().join("conf.d/20-other.toml"),
            "imports = [\"../config.toml\"]\n[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"x\"\n",
        )
        .unwrap();
        let e = check(&main, hosts).unwrap_err();
        assert!(e.contains("sets no CRI registry"), "{e}");
        // A config file that is a device is an error, not a read of gigabytes.
        assert!(check(Path::new("/dev/zero"), hosts).is_err());
    }

    fn check_text(text: &str) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        std::fs::write(&f, text).unwrap();
        check(&f, Path::new("/etc/containerd/certs.d"))
    }

    #[test]
    fn the_snapshotter_is_read_from_either_config_version() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        for (text, want) in [
            ("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"native\"\n", "native"),
            ("version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\nsnapshotter = \"stargz\"\n", "stargz"),
            ("version = 2\n", "overlayfs"),
        ] {
            std::fs::write(&f, text).unwrap();
            assert_eq!(snapshotter(&f).as_deref(), Some(want), "{text}");
        }
        assert_eq!(snapshotter(&dir.path().join("absent.toml")), None);
    }

    #[test]
    fn progress_timeout_and_keepalive_follow_containerds_setting() {
        assert_eq!(go_duration("5m0s"), Some(Duration::from_secs(300)));
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("5 minutes"), None);
        assert_eq!(go_duration("m"), None);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        std::fs::write(&f, "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\nimage_pull_progress_timeout = \"6s\"\n").unwrap();
        assert_eq!(progress_timeout(&f), Some(Duration::from_secs(6)));
        assert_eq!(keepalive(&f), Duration::from_secs(2));
        std::fs::write(&f, "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\nimage_pull_progress_timeout = \"0s\"\n").unwrap();
        assert_eq!(progress_timeout(&f), None);
        assert_eq!(keepalive(&f), Duration::from_secs(60));
        assert_eq!(
            keepalive(&dir.path().join("missing")),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn shared_download_slots_are_the_transfer_services_limit() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        let transfer = "[plugins.\"io.containerd.transfer.v1.local\"]\n";
        for (text, want) in [
            ("version = 3\n".to_string(), Some(3)),
            (format!("version = 3\n{transfer}max_concurrent_downloads = 16\n"), Some(16)),
            // 0 is not a limit containerd would start with: its default is assumed.
            (format!("version = 3\n{transfer}max_concurrent_downloads = 0\n"), Some(3)),
            (
                "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\nuse_local_image_pull = true\n"
                    .to_string(),
                None,
            ),
            ("not [toml".to_string(), Some(3)),
        ] {
            std::fs::write(&f, &text).unwrap();
            assert_eq!(shared_download_slots(&f), want, "{text}");
        }
        assert_eq!(shared_download_slots(&dir.path().join("absent")), Some(3));
    }

    #[test]
    fn config_path_is_found_in_both_config_versions() {
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        let v3 = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
        assert_eq!(check_text(v2), Ok(()));
        assert_eq!(check_text(v3), Ok(()));
        let unset = check_text("version = 2\n").unwrap_err();
        assert!(
            unset.contains("sets no CRI registry config_path"),
            "{unset}"
        );
        let other = check_text(&v2.replace("/etc/containerd/certs.d", "/srv/certs")).unwrap_err();
        assert!(other.contains("\"/srv/certs\""), "{other}");
        assert!(check_text("not [toml")
            .unwrap_err()
            .contains("not valid TOML"));
    }
}
